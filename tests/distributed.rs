//! Multi-process runs on loopback, driven through `distclip launch` as an operator would: a
//! coordinator and N worker processes training the tiny model on synthetic shards.
//!
//! - a 2-worker run trains (loss falls), writes metrics and events, and every rank holds the
//!   same parameters after every step (no `checksum_mismatch` event);
//! - exactness: 2 workers × b and 1 worker × 2b reach the same parameters after 3 steps;
//! - the ledger: an epoch over several (uneven) shards with 2 and 3 workers consumes every
//!   sample exactly once, and the run directory's audit says so.

mod common;
use common::{assert_same_update, jsonl, launch, no_checksum_mismatch, ok_json, synth, tmp};

use serde_json::Value;

#[test]
fn two_workers_train_and_agree() {
    let dir = tmp("train");
    let spec = synth(&dir, 192, 32);
    let run = dir.join("run");
    let epochs = 6u64;
    let out = launch(
        2,
        &spec,
        &run,
        &["--batch-size", "16", "--epochs", "6", "--lr", "5e-4", "--warmup", "2", "--seed", "1"],
    );
    assert_eq!(out["status"], "finished");
    let metrics = jsonl(&run.join("metrics.jsonl"));
    // 192 samples per epoch, at most 32 per global step.
    assert!(metrics.len() as u64 >= epochs * 6, "only {} steps", metrics.len());
    for m in &metrics {
        assert!(m["loss"].as_f64().is_some_and(f64::is_finite), "non-finite loss in {m}");
        assert_eq!(m["world_size"], 2, "{m}");
    }
    // The global batch varies when one worker holds more shards than the other, and chance-level
    // InfoNCE is ln(batch): measure how far below chance each step's loss is.
    let below_chance = |epoch: u64| {
        let l: Vec<f64> = metrics
            .iter()
            .filter(|m| m["epoch"] == epoch)
            .map(|m| (m["samples"].as_f64().unwrap()).ln() - m["loss"].as_f64().unwrap())
            .collect();
        l.iter().sum::<f64>() / l.len() as f64
    };
    let (first, last) = (below_chance(0), below_chance(epochs - 1));
    assert!(last > first + 0.05, "loss did not fall: below chance by {first} in epoch 0, {last} in the last");
    let samples: u64 = metrics.iter().map(|m| m["samples"].as_u64().unwrap()).sum();
    assert_eq!(samples, epochs * 192, "every sample of every epoch trained once");
    no_checksum_mismatch(&run);
    let events = jsonl(&run.join("events.jsonl"));
    assert!(events.iter().filter(|e| e["kind"] == "join").count() >= 2, "{events:?}");
    for epoch in 0..epochs {
        let audit: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join(format!("ledger/epoch-{epoch}.json"))).unwrap())
                .unwrap();
        assert_eq!(audit["exactly_once"], true, "epoch {epoch}: {audit}");
        assert_eq!(audit["samples_committed"], 192);
    }
    assert!(run.join("config.toml").is_file());
    let model = run.join("checkpoints/final/model.safetensors");
    assert!(model.is_file());
    // The trained model evaluates zero-shot on the held-out shards (19 samples: a tenth).
    let zs = dir.join("data/zeroshot.json");
    let e = ok_json(&["eval", "--model", "tiny", "--checkpoint", model.to_str().unwrap(), "--zeroshot", zs.to_str().unwrap()]);
    for (task, classes) in [("shape", 4.0), ("colour", 8.0)] {
        let r = &e["zeroshot"][task];
        assert_eq!(r["samples"], 19, "{e}");
        assert_eq!(r["chance"].as_f64(), Some(1.0 / classes), "{e}");
        let (top1, top5) = (r["top1"].as_f64().unwrap(), r["top5"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&top1) && top1 <= top5, "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
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

    let init = dir.join("init.safetensors");
    ok_json(&["init", "--model", "tiny", "--seed", "7", "--out", init.to_str().unwrap()]);
    let lr_sum = 5e-4 + 1e-3 + 1e-3;
    assert_same_update(
        &two.join("checkpoints/final/model.safetensors"),
        &one.join("checkpoints/final/model.safetensors"),
        &init,
        lr_sum,
        "2x4 vs 1x8",
    );
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
