//! Faults a run must survive or stop on cleanly, through `distclip launch`.

mod common;
use common::{jsonl, synth, tmp};

use serde_json::Value;

/// A learning rate of 1e30 blows the weights up after the first step, so every later loss is
/// not finite: each such step is dropped on both ranks, and `train.max_non_finite_steps` of
/// them in a row end the run with an error that names the cause and the knobs.
#[test]
fn non_finite_losses_drop_steps_and_then_stop_the_run() {
    let dir = tmp("nonfinite");
    let spec = synth(&dir, 64, 16);
    let run = dir.join("run");
    let args = [
        "launch", "--workers", "2", "--data", &spec, "--run-dir", run.to_str().unwrap(), "--model", "tiny",
        "--threads", "1", "--batch-size", "4", "--epochs", "2", "--lr", "1e30", "--warmup", "1",
        "--set", "train.max_non_finite_steps=3",
    ];
    let stderr = common::err_text(&args);
    assert!(stderr.contains("3 consecutive steps had a non-finite loss or gradient"), "{stderr}");
    assert!(stderr.contains("train.max_non_finite_steps"), "{stderr}");

    // Step 0 committed (its loss was finite); then three drops of step 1, counted 1, 2, 3.
    let metrics = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 1, "{metrics:?}");
    assert!(metrics[0]["loss"].as_f64().is_some_and(f64::is_finite), "{metrics:?}");
    let events = jsonl(&run.join("events.jsonl"));
    let non_finite: Vec<&Value> = events.iter().filter(|e| e["kind"] == "step_non_finite").collect();
    let counted: Vec<(u64, u64)> =
        non_finite.iter().map(|e| (e["failed_step"].as_u64().unwrap(), e["consecutive"].as_u64().unwrap())).collect();
    assert_eq!(counted, [(1, 1), (1, 2), (1, 3)], "{non_finite:?}");
    assert!(events.iter().any(|e| e["kind"] == "failed"), "{events:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
