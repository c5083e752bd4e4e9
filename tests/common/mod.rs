//! Helpers shared by the end-to-end tests of the `distclip` binary.

// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Run the binary under test.
pub fn distclip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distclip")).args(args).output().expect("run distclip")
}

/// Run it, require success, and parse the last stdout line as JSON.
pub fn ok_json(args: &[&str]) -> Value {
    let out = distclip(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "distclip {args:?} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no JSON line on stdout; stderr:\n{stderr}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"))
}

/// Run it, require failure, and return stderr.
pub fn err_text(args: &[&str]) -> String {
    let out = distclip(args);
    assert!(!out.status.success(), "distclip {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// Synthetic shards: `n` samples, `per_shard` per shard, 32 px (the tiny model's size).
pub fn synth(dir: &Path, n: usize, per_shard: usize) -> String {
    let out = dir.join("data");
    let s = ok_json(&[
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--samples",
        &n.to_string(),
        "--samples-per-shard",
        &per_shard.to_string(),
        "--image-size",
        "32",
        "--quiet",
    ]);
    s["train_spec"].as_str().expect("synth reports train_spec").to_owned()
}

pub fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display())))
        .collect()
}

pub fn launch(workers: usize, spec: &str, run_dir: &Path, extra: &[&str]) -> Value {
    let w = workers.to_string();
    let mut args = vec![
        "launch",
        "--workers",
        &w,
        "--data",
        spec,
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--model",
        "tiny",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    ok_json(&args)
}

pub fn no_checksum_mismatch(run_dir: &Path) {
    let events = jsonl(&run_dir.join("events.jsonl"));
    let bad: Vec<&Value> = events.iter().filter(|e| e["kind"] == "checksum_mismatch").collect();
    assert!(bad.is_empty(), "ranks diverged: {bad:?}");
}

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distclip-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tensors of a safetensors file by name: shape and f32 values.
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

/// Parameters of a safetensors file, sorted by name.
pub fn load(path: &Path) -> Vec<(String, Vec<f32>)> {
    tensors(path).into_iter().map(|(name, (_, v))| (name, v)).collect()
}

/// Two trained models (`a`, `b`, from the same `init`) made the same update, up to float
/// summation order. AdamW amplifies rounding where a gradient is near its epsilon; one slice
/// is special: the key third of `attn.in_proj_bias` has an exactly zero gradient (it shifts
/// every logit of a softmax row equally), so AdamW turns pure rounding noise into steps of up
/// to lr/10 there, differently in every summation order; it is held to an absolute bound of
/// 0.2 x the summed lr instead (as in the step-parity test against OpenCLIP).
pub fn assert_same_update(a: &Path, b: &Path, init: &Path, lr_sum: f32, what: &str) {
    let (a, b, c) = (load(a), load(b), load(init));
    assert_eq!(a.len(), b.len());
    let mut moved = false;
    let (mut max_diff, mut max_abs) = (0f32, 0f32);
    let mut worst = (0f32, String::new());
    for (((name, x), (_, y)), (_, z)) in a.iter().zip(&b).zip(&c) {
        let key_slice = if name.ends_with("attn.in_proj_bias") {
            let d = x.len() / 3;
            d..2 * d
        } else {
            0..0
        };
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        max_abs = max_abs.max(scale);
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            let diff = (p - q).abs();
            if key_slice.contains(&i) {
                assert!(diff <= 0.2 * lr_sum, "{what}: {name}[{i}] (key bias) differs by {diff}");
                continue;
            }
            max_diff = max_diff.max(diff);
            if diff / scale > worst.0 {
                worst = (diff / scale, name.clone());
            }
        }
        moved |= x.iter().zip(z).any(|(p, q)| p != q);
    }
    // Over the whole model: the largest difference relative to the largest parameter.
    assert!(max_diff / max_abs <= 1e-5, "{what}: max difference {max_diff} against max |param| {max_abs}");
    // Per tensor, rounding in near-zero gradients (attention q/v biases) reaches a few 1e-4 of a
    // tensor's scale after AdamW's division by sqrt(v) + eps; a real mismatch (one sample
    // different) moves every tensor by 1e-2 or more.
    assert!(worst.0 <= 1e-3, "{what}: {} differs by {} of its scale", worst.1, worst.0);
    eprintln!("{what}: max |diff| {max_diff:e} over max |param| {max_abs}; worst tensor {} at {:e} of its scale", worst.1, worst.0);
    assert!(moved, "{what}: training changed no parameter");
}

/// A TOML string literal (for `--set key="value"` with paths).
pub fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Wait (at most 300 s) for a spawned `distclip` process with piped stdout to exit, require
/// success, and parse its last stdout line as JSON; `log` is its stderr file, shown on failure.
pub fn finished_json(mut child: std::process::Child, what: &str, log: &Path) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what} did not finish within 300 s; its log:\n{tail}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tail = std::fs::read_to_string(log).unwrap_or_default();
    assert!(out.status.success(), "{what} failed ({}); its log:\n{tail}", out.status);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{what}: no JSON ({e}): {stdout}"))
}

/// Poll `done` every 20 ms until it holds; after `limit` fail, naming `what` and showing the
/// log file of the process being waited for.
pub fn wait_until(what: &str, limit: std::time::Duration, log: &Path, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {limit:?}; the log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
