//! End-to-end tests of the `distclip` binary's contracts (JSON on stdout, errors that name the
//! problem), driven as a user would, on the committed OpenCLIP fixtures.

mod common;
use common::{err_text, ok_json};

use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../..")
}

fn parity() -> PathBuf {
    root().join("tests/fixtures/parity")
}




fn expected(name: &str) -> Value {
    let path = parity().join(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn max_abs_diff(a: &Value, b: &Value) -> f64 {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "shape mismatch");
            x.iter().zip(y).map(|(p, q)| max_abs_diff(p, q)).fold(0.0, f64::max)
        }
        (Value::Number(x), Value::Number(y)) => (x.as_f64().unwrap() - y.as_f64().unwrap()).abs(),
        other => panic!("not numbers: {other:?}"),
    }
}

#[test]
fn tokenize_prints_openclip_token_rows() {
    let e = expected("tiny");
    let texts: Vec<&str> = e["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let mut args = vec!["tokenize", "--context-length", "16"];
    args.extend(&texts);
    let got = ok_json(&args);
    assert_eq!(got["tokens"], e["tokens"]);
    let default = ok_json(&["tokenize", "a photo of a cat"]);
    let row = default["tokens"][0].as_array().unwrap();
    assert_eq!(row.len(), 77);
    assert_eq!(&row[..7], &[49406, 320, 1125, 539, 320, 2368, 49407].map(Value::from)[..]);
}

#[test]
fn embed_reproduces_openclip_embeddings_and_zero_shot_probs() {
    for name in ["tiny", "tiny-variant"] {
        let e = expected(name);
        let dir = parity().join(name);
        let config = dir.join("config.json");
        let ckpt = dir.join("open_clip_model.safetensors");
        let mut args: Vec<String> = vec!["embed".into(), "--model".into(), config.display().to_string()];
        args.extend(["--checkpoint".into(), ckpt.display().to_string()]);
        for f in e["image_files"].as_array().unwrap() {
            args.extend(["--image".into(), parity().join(f.as_str().unwrap()).display().to_string()]);
        }
        for t in e["texts"].as_array().unwrap() {
            args.extend(["--text".into(), t.as_str().unwrap().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let got = ok_json(&args);
        assert!(max_abs_diff(&got["image_embeddings"], &e["image_embeddings"]) < 1e-4, "{name} images");
        assert!(max_abs_diff(&got["text_embeddings"], &e["text_embeddings"]) < 1e-4, "{name} texts");
        assert!(max_abs_diff(&got["probs"], &e["probs"]) < 1e-4, "{name} probs");
        let scale = got["logit_scale"].as_f64().unwrap();
        assert!((scale.ln() - e["logit_scale"].as_f64().unwrap()).abs() < 1e-5, "{name} scale {scale}");
    }
}

#[test]
fn init_writes_openclip_keys_and_shapes_and_embed_loads_it() {
    let dir = std::env::temp_dir().join(format!("distclip-cli-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("tiny.safetensors");
    let config = parity().join("tiny/config.json");
    let report = ok_json(&["init", "--model", config.to_str().unwrap(), "--out", out.to_str().unwrap(), "--seed", "3"]);
    assert_eq!(report["params"].as_u64().unwrap() as usize, {
        let keys: Value = serde_json::from_str(&std::fs::read_to_string(parity().join("tiny/keys.json")).unwrap()).unwrap();
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).product::<usize>())
            .sum::<usize>()
    });
    // Every key and shape OpenCLIP's state_dict() has, and nothing else.
    let keys: Value = serde_json::from_str(&std::fs::read_to_string(parity().join("tiny/keys.json")).unwrap()).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let state = distclip_model_state(&bytes);
    let want: Vec<(String, Vec<usize>)> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key"].as_str().unwrap().to_string(),
                k["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .collect();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(state, want_sorted);
    // Same seed, same file; another seed, another model.
    let again = dir.join("again.safetensors");
    ok_json(&["init", "--model", config.to_str().unwrap(), "--out", again.to_str().unwrap(), "--seed", "3"]);
    assert_eq!(std::fs::read(&again).unwrap(), bytes);
    let embedded = ok_json(&["embed", "--model", config.to_str().unwrap(), "--checkpoint", out.to_str().unwrap(), "--text", "a cat"]);
    let row = embedded["text_embeddings"][0].as_array().unwrap();
    let norm: f64 = row.iter().map(|v| v.as_f64().unwrap().powi(2)).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "embedding norm {norm}");
    std::fs::remove_dir_all(&dir).ok();
}

/// (key, shape) pairs of a safetensors file, sorted, read from its JSON header.
fn distclip_model_state(bytes: &[u8]) -> Vec<(String, Vec<usize>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out: Vec<(String, Vec<usize>)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32", "{k}");
            (k.clone(), v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn models_lists_presets_with_parameter_counts() {
    let got = ok_json(&["models"]);
    let rows = got["models"].as_array().unwrap();
    let find = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap_or_else(|| panic!("{n} missing"));
    assert_eq!(find("ViT-B-32")["params"], 151_277_313);
    for name in ["ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14", "tiny", "bench-s"] {
        assert!(find(name)["params"].as_u64().unwrap() > 0);
    }
    // ViT-bigG-14 is the 2.5B-parameter tower family multimodal LLMs start from.
    assert!(find("ViT-bigG-14")["params"].as_u64().unwrap() > 2_500_000_000);
}

#[test]
fn config_prints_a_documented_default_file_that_loads_back() {
    let out = common::distclip(&["config", "--model", "tiny"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("`cosine` | `const` | `const-cooldown`"), "{text}");
    assert!(text.contains("# max_steps = "), "optional keys are shown commented out: {text}");
    // Written to a file, it loads as the run config the coordinator would use: the defaults
    // with the chosen model.
    let dir = std::env::temp_dir().join(format!("distclip-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("run.toml");
    std::fs::write(&file, &text).unwrap();
    let loaded = distclip_config::RunConfig::load(Some(&file), &[]).unwrap();
    let mut expected = distclip_config::RunConfig::default();
    expected.model.name = "tiny".into();
    assert_eq!(loaded, expected);

    // --out writes the same text, and will not replace a file without --force.
    let again = dir.join("again.toml");
    let got = ok_json(&["config", "--model", "tiny", "--out", again.to_str().unwrap()]);
    assert_eq!(got["model"], "tiny");
    assert_eq!(std::fs::read_to_string(&again).unwrap(), text);
    let e = err_text(&["config", "--model", "tiny", "--out", again.to_str().unwrap()]);
    assert!(e.contains("--force"), "{e}");
    ok_json(&["config", "--model", "ViT-B-32", "--out", again.to_str().unwrap(), "--force"]);
    assert!(std::fs::read_to_string(&again).unwrap().contains("name = \"ViT-B-32\""));
    std::fs::remove_dir_all(&dir).ok();

    // An unknown model is refused with the list of presets.
    let e = err_text(&["config", "--model", "ViT-Q-99"]);
    assert!(e.contains("ViT-Q-99") && e.contains("tiny") && e.contains("ViT-B-32"), "{e}");
}

#[test]
fn bench_train_reports_throughput_and_a_falling_loss() {
    let got = ok_json(&["bench", "train", "--model", "tiny", "--batch", "8", "--steps", "4", "--threads", "1"]);
    assert!(got["samples_per_s"].as_f64().unwrap() > 0.0);
    assert!(got["step_s"].as_f64().unwrap() > 0.0);
    // Six AdamW steps on one fixed random batch must lower its contrastive loss.
    assert!(got["loss_last"].as_f64().unwrap() < got["loss_first"].as_f64().unwrap(), "{got}");
}

#[test]
fn bad_input_gets_an_error_that_names_it() {
    let cfg = parity().join("tiny/config.json");
    let cfg = cfg.to_str().unwrap();
    let e = err_text(&["embed", "--model", cfg, "--image", "/nonexistent/cat.jpg"]);
    assert!(e.contains("/nonexistent/cat.jpg"), "{e}");
    let e = err_text(&["embed", "--model", "ViT-Q-99", "--text", "x"]);
    assert!(e.contains("ViT-Q-99") && e.contains("distclip models"), "{e}");
    let e = err_text(&["embed", "--model", cfg, "--text", "x", "--device", "tpu"]);
    assert!(e.contains("tpu") && e.contains("flex"), "{e}");
    let e = err_text(&["embed", "--model", cfg]);
    assert!(e.contains("--image") && e.contains("--text"), "{e}");
    let e = err_text(&["embed", "--model", "tiny", "--checkpoint", parity().join("tiny-variant/open_clip_model.safetensors").to_str().unwrap(), "--text", "x"]);
    assert!(e.contains("--model"), "a checkpoint of another shape: {e}");
    let e = err_text(&["tokenize", "--no-such-flag", "x"]);
    assert!(e.contains("--no-such-flag"), "{e}");
    // A corrupt image file is an error naming the file, not a crash.
    let dir = std::env::temp_dir().join(format!("distclip-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken.jpg");
    let mut jpg = std::fs::read(parity().join("images/d.jpg")).unwrap();
    jpg.truncate(jpg.len() / 2);
    std::fs::write(&bad, jpg).unwrap();
    let e = err_text(&["embed", "--model", cfg, "--image", bad.to_str().unwrap()]);
    assert!(e.contains("broken.jpg") && e.contains("truncated"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[cfg(not(feature = "tch"))]
#[test]
fn libtorch_device_without_the_feature_says_how_to_build() {
    let cfg = parity().join("tiny/config.json");
    let e = err_text(&["embed", "--model", cfg.to_str().unwrap(), "--text", "x", "--device", "cuda:0"]);
    assert!(e.contains("--features tch"), "{e}");
}

/// A small run directory as the coordinator writes it: steps 0..=5 by two workers, step 3
/// written twice (the first from before a resume), an evaluation line and events.
fn write_synthetic_run(dir: &Path) {
    let mut metrics = String::new();
    let step = |s: u64, loss: f64| {
        serde_json::json!({
            "step": s, "epoch": 0, "quorum_id": 1, "world_size": 2, "loss": loss, "lr": 1e-4,
            "logit_scale": 14.3, "grad_norm": 1.0, "samples": 16, "samples_seen": 16 * (s + 1),
            "samples_per_s": 32.0, "step_s": 0.5, "data_s": 0.1, "compute_s": 0.3, "comm_s": 0.1,
            "params_checksum": "c",
            "workers": {
                "w0": {"rank": 0, "samples": 8, "samples_per_s": 16.0, "data_s": 0.1, "compute_s": 0.3, "comm_s": 0.1, "step_s": 0.5},
                "w1": {"rank": 1, "samples": 8, "samples_per_s": 20.0, "data_s": 0.05, "compute_s": 0.3, "comm_s": 0.05, "step_s": 0.4},
            },
        })
    };
    for (s, loss) in [(0, 2.0), (1, 1.9), (2, 1.8), (3, 7.0), (3, 1.7), (4, 1.6), (5, 1.5)] {
        metrics.push_str(&format!("{}\n", step(s, loss)));
    }
    metrics.push_str(r#"{"step": 5, "epoch": 0, "eval": {"zeroshot": {"shapes": {"top1": 0.375, "top5": 0.875, "chance": 0.125, "samples": 64}}}}"#);
    metrics.push('\n');
    std::fs::write(dir.join("metrics.jsonl"), metrics).unwrap();
    std::fs::write(
        dir.join("events.jsonl"),
        "{\"time\": 1.0, \"kind\": \"join\", \"worker\": \"w0\"}\n{\"time\": 2.0, \"kind\": \"death\", \"worker\": \"w1\", \"step\": 2}\n",
    )
    .unwrap();
    std::fs::write(dir.join("config.toml"), "[model]\nname = \"tiny\"\n[train]\nbatch_size = 8\nlr = 0.0001\nepochs = 1\n")
        .unwrap();
}

#[test]
fn report_writes_plots_and_a_summary_of_a_run() {
    let dir = std::env::temp_dir().join(format!("distclip-cli-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_synthetic_run(&dir);
    let out = dir.join("out");
    let r = ok_json(&["report", dir.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(r["steps"], 6);
    assert_eq!(Path::new(r["report"].as_str().unwrap()), out.join("report.md"));
    let plots: Vec<&str> = r["plots"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let names: Vec<&str> = plots.iter().map(|p| Path::new(p).file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["loss.png", "lr.png", "logit_scale.png", "throughput.png", "step_time.png", "eval.png"]);
    for p in &plots {
        let bytes = std::fs::read(p).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5000, "{p}: {} bytes", bytes.len());
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "| model | `tiny` |",
        "| steps committed | 6 (steps 0 to 5) |",
        "| samples seen | 96 |",
        "| loss | 2 (step 0) | 1.5 (step 5) | 1.5 (step 5) | 2 (step 0) |",
        "| `w1` | 1 | 6 | 0.4 | 0.05 | 0.3 | 0.05 | 20 |",
        "| `shapes` | 0.375 | 0.875 | 0.125 | 64 |",
        "| death | 1 |",
        "![step time per worker](step_time.png)",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    // Without --out the report goes to RUN/report.
    let r = ok_json(&["report", dir.to_str().unwrap()]);
    assert_eq!(Path::new(r["report"].as_str().unwrap()), dir.join("report/report.md"));
    // A run that committed nothing is an error that says so.
    std::fs::remove_file(dir.join("metrics.jsonl")).unwrap();
    let e = err_text(&["report", dir.to_str().unwrap()]);
    assert!(e.contains("no steps in") && e.contains("metrics.jsonl") && e.contains("did the run commit any step?"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unusable_reporters_and_remotes_are_refused_before_training() {
    let dir = std::env::temp_dir().join(format!("distclip-cli-remote-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = common::synth(&dir, 8, 8);
    let run = dir.join("run");
    let base = ["coordinator", "--data", spec.as_str(), "--run-dir", run.to_str().unwrap(), "--model", "tiny", "--listen", "127.0.0.1:0"];
    let mut args = base.to_vec();
    args.extend(["--remote-sync", "https://example.com/runs/x"]);
    let e = err_text(&args);
    assert!(e.contains("log.remote_sync https://example.com/runs/x") && e.contains("not writable"), "{e}");
    assert!(!run.join("coordinator.addr").exists(), "it listened before refusing");
    let mut args = base.to_vec();
    args.extend(["--report-to", "wandb"]);
    let e = err_text(&args);
    assert!(e.contains("log.report_to") && e.contains("tensorboard"), "{e}");
    let mut args = base.to_vec();
    args.extend(["--lock-text-unlocked-layers", "1"]);
    let e = err_text(&args);
    assert!(e.contains("model.lock_text_unlocked_layers") && e.contains("lock_text = true"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
