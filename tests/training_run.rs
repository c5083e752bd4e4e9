//! A researcher's run, end to end through `distclip launch`: gradient accumulation, periodic
//! checkpoints and evaluation, and a run killed with SIGKILL and resumed from its last good
//! checkpoint that ends exactly where the uninterrupted run ends.

mod common;
use common::{assert_same_update, jsonl, launch, ok_json, synth, tensors, tmp};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn accumulation_of_k_micro_batches_equals_one_batch_of_k_b() {
    let dir = tmp("accum");
    // One shard read by one decode thread in order: both runs see the same 24 samples.
    let spec = synth(&dir, 24, 24);
    let common = ["--no-shuffle", "--augment", "none", "--max-steps", "3", "--lr", "1e-3", "--warmup", "2", "--seed", "5", "--data-threads", "1"];
    let accum = dir.join("accum");
    let mut args = common.to_vec();
    args.extend(["--batch-size", "4", "--set", "train.accum_freq=2"]);
    launch(1, &spec, &accum, &args);
    let whole = dir.join("whole");
    let mut args = common.to_vec();
    args.extend(["--batch-size", "8"]);
    launch(1, &spec, &whole, &args);

    for run in [&accum, &whole] {
        let metrics = jsonl(&run.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 3, "{metrics:?}");
        assert!(metrics.iter().all(|m| m["samples"] == 8), "the contrastive batch is k·b = 8: {metrics:?}");
    }
    // The same losses (the global batch is the same 8 pairs) ...
    let losses = |run: &Path| -> Vec<f64> { jsonl(&run.join("metrics.jsonl")).iter().map(|m| m["loss"].as_f64().unwrap()).collect() };
    for (a, b) in losses(&accum).iter().zip(losses(&whole)) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "loss with accumulation {a}, without {b}");
    }
    // ... and the same update.
    let init = dir.join("init.safetensors");
    ok_json(&["init", "--model", "tiny", "--seed", "5", "--out", init.to_str().unwrap()]);
    let model = |run: &Path| run.join("checkpoints/final/model.safetensors");
    assert_same_update(&model(&accum), &model(&whole), &init, 5e-4 + 1e-3 + 1e-3, "2x4 accumulated vs 1x8");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The options of both runs of the resume test. Bit-identical resumption needs a data order
/// that depends only on the seed and positions: one worker, one decode thread and no sample
/// shuffle buffer (shards are still shuffled per epoch, and crops are still random: both are
/// seeded by position).
const RESUME_ARGS: [&str; 18] = [
    "--batch-size", "4", "--epochs", "4", "--lr", "1e-3", "--warmup", "5", "--seed", "11",
    "--data-threads", "1", "--set", "data.shuffle_buffer=0", "--set", "log.checkpoint_every=10",
    "--set", "log.keep_checkpoints=2",
];

fn losses(run: &Path) -> Vec<(u64, f64, u64)> {
    jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|m| m.get("eval").is_none())
        .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap(), m["samples"].as_u64().unwrap()))
        .collect()
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Start `distclip launch` in its own process group, wait until the checkpoint after `step`
/// steps is complete, and SIGKILL the whole group (coordinator and workers with it).
fn launch_and_kill_after(spec: &str, run: &Path, step: u64, extra: &[&str]) {
    let mut args = vec!["launch", "--workers", "1", "--data", spec, "--run-dir", run.to_str().unwrap(), "--model", "tiny", "--threads", "1"];
    args.extend_from_slice(extra);
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(env!("CARGO_BIN_EXE_distclip"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let manifest = run.join(format!("checkpoints/step-{step:08}/manifest.json"));
    let deadline = Instant::now() + Duration::from_secs(300);
    while !manifest.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its checkpoint after step {step}");
        assert!(Instant::now() < deadline, "no checkpoint after step {step} within 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
}

#[test]
fn a_killed_run_resumes_from_its_last_good_checkpoint_exactly() {
    let dir = tmp("resume");
    // 4 shards of 24: 24 steps of 4 per epoch, 96 steps in all.
    let spec = synth(&dir, 96, 24);
    let zeroshot = dir.join("data/zeroshot.json");
    let eval = format!("eval.zeroshot={}", common::quoted(zeroshot.to_str().unwrap()));
    let mut args = RESUME_ARGS.to_vec();
    args.extend(["--set", &eval, "--set", "eval.every_steps=40"]);

    let whole = dir.join("whole");
    launch(1, &spec, &whole, &args);
    let expected = losses(&whole);
    assert_eq!(expected.len(), 96);
    assert_eq!(expected.iter().map(|l| l.0).collect::<Vec<_>>(), (0..96).collect::<Vec<_>>());
    // Checkpoints every 10 steps, the last 2 kept, plus the final one.
    assert_eq!(checkpoints(&whole), ["final", "step-00000080", "step-00000090"]);
    let events = jsonl(&whole.join("events.jsonl"));
    let written: Vec<u64> = events.iter().filter(|e| e["kind"] == "checkpoint").map(|e| e["after_step"].as_u64().unwrap()).collect();
    assert_eq!(written, [10, 20, 30, 40, 50, 60, 70, 80, 90, 96]);
    // Evaluation after steps 40 and 80 and at the end, in metrics.jsonl.
    let evals: Vec<Value> = jsonl(&whole.join("metrics.jsonl")).into_iter().filter(|m| m.get("eval").is_some()).collect();
    assert_eq!(evals.iter().map(|m| m["step"].as_u64().unwrap()).collect::<Vec<_>>(), [39, 79, 95]);
    for e in &evals {
        let top1 = e["eval"]["zeroshot"]["colour"]["top1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&top1), "{e}");
    }

    // Interrupted: killed (SIGKILL, every process) once the checkpoint after step 40 exists,
    // which is mid-epoch (epoch 1 runs steps 24..48).
    let broken = dir.join("broken");
    launch_and_kill_after(&spec, &broken, 40, &args);
    let before = checkpoints(&broken);
    assert!(!before.contains(&"final".to_string()), "the run finished before it was killed: {before:?}");
    // Damage the newest checkpoint: resuming must detect it and use the one before.
    let newest = before.iter().filter(|n| n.starts_with("step-")).max().unwrap().clone();
    let model = broken.join("checkpoints").join(&newest).join("model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&model).unwrap().set_len(len / 2).unwrap();
    let previous: u64 = newest.trim_start_matches("step-").parse::<u64>().unwrap() - 10;

    // Reusing the run directory without --resume is refused.
    let mut plain = vec!["launch", "--workers", "1", "--data", &spec, "--run-dir", broken.to_str().unwrap(), "--model", "tiny"];
    plain.extend_from_slice(&args);
    let refused = common::err_text(&plain);
    assert!(refused.contains("--resume latest"), "{refused}");

    let mut resumed_args = args.clone();
    resumed_args.extend(["--resume", "latest"]);
    let out = launch(1, &spec, &broken, &resumed_args);
    assert_eq!(out["status"], "finished");
    let events = jsonl(&broken.join("events.jsonl"));
    let corrupt: Vec<&Value> = events.iter().filter(|e| e["kind"] == "checkpoint_corrupt").collect();
    assert_eq!(corrupt.len(), 1, "{events:?}");
    assert!(corrupt[0]["path"].as_str().unwrap().ends_with(&newest), "{corrupt:?}");
    let resume = events.iter().find(|e| e["kind"] == "resume_from_checkpoint").expect("a resume event");
    assert_eq!(resume["after_step"].as_u64(), Some(previous), "{resume}");

    // Every step once, with the uninterrupted run's losses and sample counts, to the bit.
    let got = losses(&broken);
    assert_eq!(got.len(), 96, "one metrics line per step");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e, "step {}: resumed run (step, loss, samples) vs uninterrupted", e.0);
    }
    // The same final parameters, to the bit.
    let final_model = |run: &Path| std::fs::read(run.join("checkpoints/final/model.safetensors")).unwrap();
    assert!(final_model(&broken) == final_model(&whole), "final parameters differ after resuming");
    // And every sample of every epoch exactly once.
    for epoch in 0..4 {
        let audit: Value = serde_json::from_str(&std::fs::read_to_string(broken.join(format!("ledger/epoch-{epoch}.json"))).unwrap()).unwrap();
        assert_eq!(audit["exactly_once"], true, "epoch {epoch}: {audit}");
        assert_eq!(audit["samples_committed"], 96, "epoch {epoch}: {audit}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}


#[test]
fn lit_fine_tuning_trains_only_what_is_unlocked_with_patch_dropout() {
    let dir = tmp("lock");
    let spec = synth(&dir, 16, 16);
    let init = dir.join("init.safetensors");
    ok_json(&["init", "--model", "tiny", "--seed", "5", "--out", init.to_str().unwrap()]);
    let run = dir.join("run");
    let args = [
        "--pretrained", init.to_str().unwrap(), "--lock-image", "--lock-text", "--lock-text-unlocked-layers", "1",
        "--patch-dropout", "0.5", "--max-steps", "2", "--batch-size", "8", "--lr", "1e-3", "--warmup", "1",
    ];
    launch(1, &spec, &run, &args);
    let before = tensors(&init);
    let after = tensors(&run.join("checkpoints/final/model.safetensors"));
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    for (name, (_, b)) in &before {
        let moved = after[name].1 != *b;
        // --lock-text-unlocked-layers 1 leaves only the text projection; logit_scale is in no tower.
        let trainable = name == "text_projection" || name == "logit_scale";
        assert_eq!(moved, trainable, "{name}: moved {moved}, trainable {trainable}");
    }
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("patch_dropout = 0.5") && config.contains("lock_image = true"), "{config}");

    // Fine-tuning the same weights at another image size: 48 px is a 6x6 grid instead of 4x4.
    let mut json: Value = serde_json::from_str(include_str!("../crates/distclip-model/configs/tiny.json")).unwrap();
    json["vision_cfg"]["image_size"] = 48.into();
    let model = dir.join("tiny-48.json");
    std::fs::write(&model, json.to_string()).unwrap();
    let run48 = dir.join("run48");
    let name = format!("model.name={}", common::quoted(model.to_str().unwrap()));
    launch(1, &spec, &run48, &["--pretrained", init.to_str().unwrap(), "--set", &name, "--max-steps", "1", "--batch-size", "4"]);
    let (shape, pos) = &tensors(&run48.join("checkpoints/final/model.safetensors"))["visual.positional_embedding"];
    assert_eq!(shape, &vec![37, 64]);
    assert!(pos.iter().all(|v| v.is_finite()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tensorboard_events_and_a_remote_copy_follow_the_run() {
    let dir = tmp("report");
    let spec = synth(&dir, 24, 24);
    let run = dir.join("run");
    let remote = dir.join("remote");
    let url = format!("file://{}", remote.display());
    launch(
        1,
        &spec,
        &run,
        &["--max-steps", "4", "--batch-size", "6", "--report-to", "tensorboard", "--remote-sync", &url, "--set", "log.checkpoint_every=2"],
    );
    // TensorBoard: one train/loss per step, equal to metrics.jsonl's.
    let folder = run.join("tensorboard");
    let files: Vec<_> = std::fs::read_dir(&folder).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let scalars = distclip_coordinator::tensorboard::read_scalars(&std::fs::read(&files[0]).unwrap()).unwrap();
    let tb_loss: Vec<(u64, f32)> =
        scalars.iter().filter(|(t, _, _)| t == "train/loss").map(|(_, s, v)| (*s, *v)).collect();
    let metrics: Vec<(u64, f32)> = jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|m| m.get("eval").is_none())
        .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap() as f32))
        .collect();
    assert_eq!(metrics.len(), 4);
    assert_eq!(tb_loss, metrics);
    assert!(scalars.iter().any(|(t, _, _)| t == "train/lr"));

    // The remote copy holds every checkpoint and the final logs, byte for byte.
    for rel in ["checkpoints/step-00000002/model.safetensors", "checkpoints/final/model.safetensors", "checkpoints/final/optimizer.bin", "metrics.jsonl", "config.toml", "events.jsonl"] {
        let (a, b) = (run.join(rel), remote.join(rel));
        assert!(b.is_file(), "{rel} missing from the remote copy");
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "{rel} differs from the run directory");
    }
    assert!(remote.join("tensorboard").join(&name).is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}
