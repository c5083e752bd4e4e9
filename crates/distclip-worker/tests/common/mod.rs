//! Shared helpers: the step fixture of `tools/parity/make_step_fixture.py`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use distclip_config::Schedule;
use distclip_model::checkpoint::{StateDict, load_state_dict, read_state_dict};
use distclip_model::{Clip, ClipConfig};
use distclip_worker::OptimConfig;
use serde_json::Value;

pub fn fixture_dir() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../../tests/fixtures/parity/step")
}

pub fn expected() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The fixture's initial model on `device`.
pub fn init_model(device: &Device) -> Clip {
    let dir = fixture_dir();
    let cfg = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let state = read_state_dict(&dir.join("init.safetensors")).unwrap();
    load_state_dict(cfg.init(device), &state).unwrap()
}

pub fn state_after(step: usize) -> StateDict {
    read_state_dict(&fixture_dir().join(format!("step_{step}.safetensors"))).unwrap()
}

/// The fixture's hyperparameters.
pub fn optim_config() -> OptimConfig {
    let h = &expected()["hparams"];
    let f = |k: &str| h[k].as_f64().unwrap();
    assert_eq!(h["schedule"], "cosine");
    OptimConfig {
        lr: f("lr"),
        warmup: h["warmup"].as_u64().unwrap(),
        schedule: Schedule::Cosine,
        cooldown_steps: 0,
        total_steps: h["total_steps"].as_u64().unwrap(),
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
        grad_clip_norm: h["grad_clip_norm"].as_f64(),
    }
}

/// One step's batch: images `[b, 3, S, S]` and tokens `[b, ctx]`, row-major.
#[derive(Clone, Debug)]
pub struct HostBatch {
    pub images: Vec<f32>,
    pub tokens: Vec<i64>,
    pub len: usize,
}

impl HostBatch {
    /// Rows `start..start + len`.
    pub fn rows(&self, start: usize, len: usize) -> HostBatch {
        let per_img = self.images.len() / self.len;
        let per_tok = self.tokens.len() / self.len;
        HostBatch {
            images: self.images[start * per_img..(start + len) * per_img].to_vec(),
            tokens: self.tokens[start * per_tok..(start + len) * per_tok].to_vec(),
            len,
        }
    }

    pub fn local(&self) -> distclip_worker::LocalBatch<'_> {
        distclip_worker::LocalBatch {
            images: &self.images,
            tokens: &self.tokens,
            len: self.len,
        }
    }
}

/// The fixture's per-step batches.
pub fn batches() -> Vec<HostBatch> {
    let bytes = std::fs::read(fixture_dir().join("batches.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let images = st.tensor("images").unwrap();
    let tokens = st.tensor("tokens").unwrap();
    let (steps, b) = (images.shape()[0], images.shape()[1]);
    let imgs: Vec<f32> = images
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let toks: Vec<i64> = tokens
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let (pi, pt) = (imgs.len() / steps, toks.len() / steps);
    (0..steps)
        .map(|k| HostBatch {
            images: imgs[k * pi..(k + 1) * pi].to_vec(),
            tokens: toks[k * pt..(k + 1) * pt].to_vec(),
            len: b,
        })
        .collect()
}

/// Differences between two state dicts.
#[derive(Debug)]
pub struct Errors {
    /// Per tensor: max |a - b| / max |b|, the error relative to the tensor's scale; sorted
    /// worst first. For `attn.in_proj_bias`, over its q and v thirds only (see `key_bias`).
    pub relative: Vec<(String, f64)>,
    /// Per `attn.in_proj_bias`: max |a - b| over its key third. Its exact gradient is zero (a
    /// key bias adds the same q·b_k to every logit of a softmax row), so what it gets is
    /// rounding noise (|g| ~ 1e-8 against ~1 for q and v), which AdamW scales by
    /// lr / (|g| + eps): each implementation moves it by noise of up to ~lr/10 per step.
    pub key_bias: Vec<(String, f64)>,
}

pub fn compare(got: &StateDict, want: &StateDict) -> Errors {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "key sets differ");
    let max_abs = |it: &mut dyn Iterator<Item = f64>| it.fold(0f64, f64::max);
    let mut relative = Vec::new();
    let mut key_bias = Vec::new();
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.data.len(), w.data.len(), "{k}: size");
        let scale = max_abs(&mut w.data.iter().map(|&x| (x as f64).abs()));
        let diff = |r: std::ops::Range<usize>| max_abs(&mut r.map(|i| (g.data[i] as f64 - w.data[i] as f64).abs()));
        let n = w.data.len();
        let d = if k.ends_with("attn.in_proj_bias") {
            let third = n / 3;
            key_bias.push((k.clone(), diff(third..2 * third)));
            diff(0..third).max(diff(2 * third..n))
        } else {
            diff(0..n)
        };
        relative.push((k.clone(), if scale > 0.0 { d / scale } else { d }));
    }
    relative.sort_by(|a, b| b.1.total_cmp(&a.1));
    key_bias.sort_by(|a, b| b.1.total_cmp(&a.1));
    Errors { relative, key_bias }
}

/// The bound for `Errors::key_bias` after steps with these learning rates: two
/// implementations each moving by at most lr/10 per step.
pub fn key_bias_bound(lrs: &[f64]) -> f64 {
    0.2 * lrs.iter().sum::<f64>()
}

pub fn init_state() -> StateDict {
    read_state_dict(&fixture_dir().join("init.safetensors")).unwrap()
}
