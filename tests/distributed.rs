//! Multi-process runs on loopback, driven through `distclip launch` as an operator would: a
//! coordinator and N worker processes training the tiny model on synthetic shards.
//!
//! - a 2-worker run trains (loss falls), writes metrics and events, and every rank holds the
//!   same parameters after every step (no `checksum_mismatch` event);
//! - exactness: 2 workers × b and 1 worker × 2b reach the same parameters after 3 steps;
//! - the ledger: an epoch over several (uneven) shards with 2 and 3 workers consumes every
//!   sample exactly once, and the run directory's audit says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn distclip(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distclip")).args(args).output().expect("run distclip")
}

fn run_ok(args: &[&str]) -> Value {
    let out = distclip(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "distclip {args:?} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no JSON on stdout; stderr:\n{stderr}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"))
}

/// Synthetic shards: `n` samples, `per_shard` per shard, 32 px (the tiny model's size).
fn synth(dir: &Path, n: usize, per_shard: usize) -> String {
    let out = dir.join("data");
    let s = run_ok(&[
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

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display())))
        .collect()
}

fn launch(workers: usize, spec: &str, run_dir: &Path, extra: &[&str]) -> Value {
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
    run_ok(&args)
}

fn no_checksum_mismatch(run_dir: &Path) {
    let events = jsonl(&run_dir.join("events.jsonl"));
    let bad: Vec<&Value> = events.iter().filter(|e| e["kind"] == "checksum_mismatch").collect();
    assert!(bad.is_empty(), "ranks diverged: {bad:?}");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distclip-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn two_workers_train_and_agree() {
    let dir = tmp("train");
    let spec = synth(&dir, 192, 32);
    let run = dir.join("run");
    let out = launch(
        2,
        &spec,
        &run,
        &["--batch-size", "16", "--epochs", "4", "--lr", "2e-3", "--warmup", "2", "--seed", "1"],
    );
    assert_eq!(out["status"], "finished");
    let metrics = jsonl(&run.join("metrics.jsonl"));
    // 192 samples per epoch, 32 per global step when the two workers split the shards evenly;
    // an uneven split gives more, smaller steps, never fewer.
    assert!(metrics.len() >= 4 * 6, "only {} steps", metrics.len());
    for m in &metrics {
        assert!(m["loss"].as_f64().is_some_and(f64::is_finite), "non-finite loss in {m}");
        assert_eq!(m["world_size"], 2, "{m}");
    }
    let mean = |epoch: u64| {
        let l: Vec<f64> =
            metrics.iter().filter(|m| m["epoch"] == epoch).map(|m| m["loss"].as_f64().unwrap()).collect();
        l.iter().sum::<f64>() / l.len() as f64
    };
    let (first, last) = (mean(0), mean(3));
    assert!(last < first - 0.1, "loss did not fall: epoch 0 mean {first}, epoch 3 mean {last}");
    let samples: u64 = metrics.iter().map(|m| m["samples"].as_u64().unwrap()).sum();
    assert_eq!(samples, 4 * 192, "every sample of every epoch trained once");
    no_checksum_mismatch(&run);
    let events = jsonl(&run.join("events.jsonl"));
    assert!(events.iter().filter(|e| e["kind"] == "join").count() >= 2, "{events:?}");
    for epoch in 0..4 {
        let audit: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join(format!("ledger/epoch-{epoch}.json"))).unwrap())
                .unwrap();
        assert_eq!(audit["exactly_once"], true, "epoch {epoch}: {audit}");
        assert_eq!(audit["samples_committed"], 192);
    }
    assert!(run.join("config.toml").is_file());
    assert!(run.join("checkpoints/final/model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn load(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn two_workers_of_b_equal_one_worker_of_2b() {
    let dir = tmp("exact");
    // Two shards of 3 batches of b = 4 each: 3 steps of a global batch of 8 in both layouts.
    let spec = synth(&dir, 24, 12);
    let common = [
        "--no-shuffle",
        "--augment",
        "none",
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--seed",
        "7",
    ];
    let two = dir.join("two");
    let mut args: Vec<&str> = common.to_vec();
    // One shard per worker at a time, so each worker reads one of the two shards.
    args.extend(["--batch-size", "4", "--data-threads", "1", "--set", "data.shards_per_worker=1"]);
    launch(2, &spec, &two, &args);
    let one = dir.join("one");
    let mut args: Vec<&str> = common.to_vec();
    // Two decode threads, one shard each, interleaved: each batch holds b samples of each shard.
    args.extend(["--batch-size", "8", "--data-threads", "2", "--set", "data.shards_per_worker=2"]);
    launch(1, &spec, &one, &args);

    let a = load(&two.join("checkpoints/final/model.safetensors"));
    let b = load(&one.join("checkpoints/final/model.safetensors"));
    assert_eq!(a.len(), b.len());
    let init = dir.join("init.safetensors");
    run_ok(&["init", "--model", "tiny", "--seed", "7", "--out", init.to_str().unwrap()]);
    let c = load(&init);
    let mut moved = false;
    for (((name, x), (_, y)), (_, z)) in a.iter().zip(&b).zip(&c) {
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(diff / scale <= 1e-5, "{name}: 2x4 vs 1x8 differ by {} of scale", diff / scale);
        moved |= x.iter().zip(z).any(|(p, q)| p != q);
    }
    assert!(moved, "training changed no parameter");
    for run in [&two, &one] {
        no_checksum_mismatch(run);
        let metrics = jsonl(&run.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 3);
        assert!(metrics.iter().all(|m| m["samples"] == 8), "{metrics:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ledger_consumes_every_sample_once_with_three_workers() {
    let dir = tmp("ledger");
    // 7 shards, the last one short (150 = 6 x 22 + 18), shuffled shards and samples.
    let spec = synth(&dir, 150, 22);
    let run = dir.join("run");
    launch(3, &spec, &run, &["--batch-size", "8", "--epochs", "1", "--warmup", "1", "--seed", "3"]);
    let audit: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("ledger/epoch-0.json")).unwrap()).unwrap();
    assert_eq!(audit["exactly_once"], true, "{audit}");
    assert_eq!(audit["samples_total"], 150);
    assert_eq!(audit["samples_committed"], 150);
    assert_eq!(audit["shards_total"], 7);
    let metrics = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(metrics.iter().map(|m| m["samples"].as_u64().unwrap()).sum::<u64>(), 150);
    assert!(metrics.iter().all(|m| m["world_size"] == 3));
    no_checksum_mismatch(&run);
    std::fs::remove_dir_all(&dir).unwrap();
}
