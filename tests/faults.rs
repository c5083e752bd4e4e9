//! Faults a run must survive or stop on cleanly, through `distclip launch`.

mod common;
use common::{jsonl, synth, tmp, wait_until};

/// How long any one stage of a test may take.
const LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

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

/// The children of `parent` whose command line holds `word` (`worker`, `coordinator`).
fn children(parent: u32, word: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name (which may hold spaces) start after its `)`.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if ppid == Some(parent) && args.contains(&word.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// `distclip launch` as an operator meets it: kill -9 a worker and launch starts a replacement
/// that the run takes in; kill -9 the coordinator and launch keeps the workers, prints how to
/// restart it, and the coordinator restarted by hand with that command finishes the run. No
/// sample is lost or repeated, and events.jsonl tells the story.
#[test]
fn launch_outlives_kill_9_of_a_worker_and_of_the_coordinator() {
    use std::process::{Command, Stdio};
    let dir = tmp("launch-kill");
    // 6 shards of 16: 6 steps per epoch at 2 workers x 8, 8 epochs.
    let spec = synth(&dir, 96, 16);
    let run = dir.join("run");
    let log = dir.join("launch.log");
    let bin = env!("CARGO_BIN_EXE_distclip");
    let launch = Command::new(bin)
        .args(["launch", "--workers", "2", "--data", &spec, "--run-dir", run.to_str().unwrap(), "--model", "tiny"])
        .args(["--threads", "1", "--batch-size", "8", "--epochs", "8", "--seed", "2"])
        .args(["--set", "cluster.heartbeat_interval_ms=200", "--set", "cluster.heartbeat_timeout_ms=2000"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = launch.id();
    let steps = || std::fs::read_to_string(run.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let kill9 = |p: u32| assert!(Command::new("kill").args(["-9", &p.to_string()]).status().unwrap().success());

    wait_until("step 5", LIMIT, &log, || steps() >= 5);
    let workers = children(pid, "worker");
    assert_eq!(workers.len(), 2, "{workers:?}");
    kill9(workers[0]);
    wait_until("a replacement worker", LIMIT, &log, || log_text().contains("starting a replacement for worker-0"));
    let at = steps();
    wait_until("progress after the replacement", LIMIT, &log, || steps() >= at + 6);

    let coordinator = children(pid, "coordinator");
    assert_eq!(coordinator.len(), 1, "{coordinator:?}");
    kill9(coordinator[0]);
    wait_until("the restart command", LIMIT, &log, || log_text().contains("Restart it on the same address"));
    let text = log_text();
    let command = text
        .lines()
        .skip_while(|l| !l.contains("Restart it on the same address"))
        .nth(1)
        .unwrap()
        .trim()
        .strip_prefix("distclip ")
        .unwrap()
        .to_owned();
    let restarted_log = dir.join("restarted.log");
    let restarted = Command::new("sh")
        .args(["-c", &format!("exec {bin} {command}")])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&restarted_log).unwrap())
        .spawn()
        .unwrap();
    let outcome = common::finished_json(restarted, "the restarted coordinator", &restarted_log);
    assert_eq!(outcome["state"], "finished", "{outcome}");
    let launched = common::finished_json(launch, "launch", &log);
    assert_eq!(launched["status"], "finished", "{launched}");
    assert_eq!(launched["restarts"], 1, "{launched}");

    for epoch in 0..8 {
        let audit: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join(format!("ledger/epoch-{epoch}.json"))).unwrap()).unwrap();
        assert_eq!(audit["exactly_once"], true, "epoch {epoch}: {audit}");
        assert_eq!(audit["samples_committed"], 96, "epoch {epoch}: {audit}");
    }
    let metrics = jsonl(&run.join("metrics.jsonl"));
    let steps: Vec<u64> = metrics.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..steps.len() as u64).collect::<Vec<_>>(), "one metrics line per committed step");
    // The story: three joins (two workers and the replacement), the killed worker's death,
    // the coordinator's resume, and the run's end.
    let events = jsonl(&run.join("events.jsonl"));
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert!(count("join") >= 3, "{events:?}");
    assert!(count("death") >= 1, "the killed worker left no trace: {events:?}");
    assert_eq!(count("resume"), 1, "{events:?}");
    assert_eq!(count("checksum_mismatch"), 0, "{events:?}");
    assert_eq!(count("finish"), 1, "{events:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
