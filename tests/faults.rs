//! Faults a run must survive or stop on cleanly, through `distclip launch`.

mod common;
use common::{jsonl, synth, tmp, wait_until};
use std::path::Path;
use std::process::{Child, Command, Stdio};

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

/// `distclip launch` of `workers` tiny-model workers in the background, stdout piped (for
/// `finished_json`), stderr into `log`.
fn spawn_launch(workers: usize, spec: &str, run: &Path, log: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_distclip"))
        .args(["launch", "--workers", &workers.to_string(), "--data", spec, "--run-dir", run.to_str().unwrap()])
        .args(["--model", "tiny"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Metric rows (committed steps) written so far.
fn rows(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0)
}

/// The first `quorum` event after the first event `is_cause` picks, and its members.
fn quorum_after(events: &[Value], is_cause: impl Fn(&Value) -> bool) -> (&Value, Vec<&str>) {
    let q = events
        .iter()
        .skip_while(|e| !is_cause(e))
        .find(|e| e["kind"] == "quorum")
        .unwrap_or_else(|| panic!("no quorum after the event: {events:?}"));
    (q, q["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect())
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
/// that the run takes in; kill -9 the coordinator and launch restarts it on the same address,
/// where it continues from its run state and the workers join it again. No sample is lost or
/// repeated, and events.jsonl tells the story.
#[test]
fn launch_outlives_kill_9_of_a_worker_and_of_the_coordinator() {
    let dir = tmp("launch-kill");
    // 6 shards of 16: 6 steps per epoch at 2 workers x 8, 8 epochs.
    let spec = synth(&dir, 96, 16);
    let run = dir.join("run");
    let log = dir.join("launch.log");
    let launch = spawn_launch(2, &spec, &run, &log, &[
        "--threads", "1", "--batch-size", "8", "--epochs", "8", "--seed", "2",
        "--set", "cluster.heartbeat_interval_ms=200", "--set", "cluster.heartbeat_timeout_ms=2000",
    ]);
    let pid = launch.id();
    let steps = || rows(&run);
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
    // `pkill -f worker` must not hit the coordinator (issue 21's run was lost that way).
    let argv = std::fs::read(format!("/proc/{}/cmdline", coordinator[0])).unwrap();
    assert!(!String::from_utf8_lossy(&argv).contains("worker"), "{}", String::from_utf8_lossy(&argv));
    kill9(coordinator[0]);
    wait_until("the coordinator's restart", LIMIT, &log, || log_text().contains("restarting it on"));
    let launched = common::finished_json(launch, "launch", &log);
    assert_eq!(launched["status"], "finished", "{launched}");
    assert_eq!(launched["restarts"], 2, "a worker and the coordinator: {launched}");

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

/// Issue 21, driven as it was reported: 3 workers over 8 shards of 256 samples, 60 steps of 16,
/// and kill -9 of one worker after 10 metric rows. The two survivors form a new quorum and train
/// on (launch adds a replacement), the run ends where it was planned to, exit 0, and the ledger
/// shows no sample lost or counted twice.
#[test]
fn launch_trains_on_when_one_of_three_workers_is_killed() {
    let dir = tmp("launch-kill-one");
    let spec = synth(&dir, 2048, 256);
    let run = dir.join("run");
    let log = dir.join("launch.log");
    let launch = spawn_launch(3, &spec, &run, &log, &["--max-steps", "60", "--batch-size", "16"]);
    let pid = launch.id();
    wait_until("10 metric rows", LIMIT, &log, || rows(&run) >= 10);
    let workers = children(pid, "worker");
    assert_eq!(workers.len(), 3, "{workers:?}");
    assert!(Command::new("kill").args(["-9", &workers[1].to_string()]).status().unwrap().success());
    let killed_at = rows(&run);
    let launched = common::finished_json(launch, "launch", &log);
    assert_eq!(launched["status"], "finished", "{launched}");
    assert_eq!(launched["restarts"], 1, "one replacement: {launched}");

    let metrics = jsonl(&run.join("metrics.jsonl"));
    let steps: Vec<u64> = metrics.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..steps.len() as u64).collect::<Vec<_>>(), "one metrics line per committed step");
    assert!(steps.len() > killed_at, "no step after the kill at row {killed_at}");
    let events = jsonl(&run.join("events.jsonl"));
    let of = |kind: &str| events.iter().filter(|e| e["kind"] == kind).collect::<Vec<_>>();
    assert_eq!(of("checksum_mismatch").len(), 0, "{events:?}");

    // The plan: 60 steps, or the end of the one epoch if the data runs out first.
    let audit: Value = serde_json::from_str(&std::fs::read_to_string(run.join("ledger/epoch-0.json")).unwrap()).unwrap();
    let finish = of("finish");
    assert_eq!(finish.len(), 1, "{events:?}");
    match finish[0]["reason"].as_str().unwrap() {
        "train.max_steps reached" => assert_eq!(steps.len(), 60),
        "train.epochs done" => {
            assert_eq!(audit["exactly_once"], true, "{audit}");
            assert_eq!(audit["samples_committed"], 2048, "{audit}");
        }
        other => panic!("the run ended for {other:?}: {events:?}"),
    }
    // Nothing lost, nothing twice: every sample a metrics row counts is in the ledger once.
    let trained: u64 = metrics.iter().map(|m| m["samples"].as_u64().unwrap()).sum();
    assert_eq!(audit["at_most_once"], true, "{audit}");
    assert_eq!(audit["samples_committed"], trained, "{audit}");
    assert_eq!(metrics.last().unwrap()["samples_seen"], trained);

    // The survivors: both workers that were not killed are in the quorum formed after the death,
    // and that quorum committed steps.
    let death = of("death");
    assert_eq!(death.len(), 1, "{events:?}");
    let dead = death[0]["worker"].as_str().unwrap();
    let first: Vec<&str> = of("quorum")[0]["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert_eq!(first.len(), 3, "{first:?}");
    let (after, members) = quorum_after(&events, |e| e["kind"] == "death");
    for w in first.iter().filter(|w| **w != dead) {
        assert!(members.contains(w), "survivor {w} is not in {members:?}");
    }
    let q = after["quorum_id"].as_u64().unwrap();
    assert!(metrics.iter().any(|m| m["quorum_id"].as_u64() >= Some(q)), "no step committed after the death");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGTERM (what Kubernetes, Slurm and `docker stop` send) makes a worker leave gracefully: it
/// finishes the step in flight, calls Leave and exits 143. Its leases go back to the pool at
/// once and the other two form a new quorum without waiting for the heartbeat timeout, which
/// is set far beyond this test's limit, so only the leave can have let the run go on (with
/// `--min-workers 2` and no replacement).
#[test]
fn sigterm_makes_a_worker_leave_and_the_others_train_on_at_once() {
    let dir = tmp("sigterm-leave");
    // A small shuffle buffer: each worker leases a shard just ahead of its reading, so the
    // worker that leaves surely holds one (with the default buffer one worker can lease all 8).
    let spec = synth(&dir, 512, 64);
    let run = dir.join("run");
    let log = dir.join("launch.log");
    let launch = spawn_launch(3, &spec, &run, &log, &[
        "--threads", "1", "--batch-size", "8", "--max-steps", "40", "--max-restarts", "0", "--min-workers", "2",
        "--set", "data.shuffle_buffer=16", "--set", "cluster.heartbeat_timeout_ms=3600000",
    ]);
    let pid = launch.id();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("3 metric rows", LIMIT, &log, || rows(&run) >= 3);
    let workers = children(pid, "worker");
    assert_eq!(workers.len(), 3, "{workers:?}");
    assert!(Command::new("kill").args(["-TERM", &workers[2].to_string()]).status().unwrap().success());
    let signalled_at = rows(&run);
    let launched = common::finished_json(launch, "launch", &log);
    assert_eq!(launched["status"], "finished", "{launched}");
    assert_eq!(launched["restarts"], 0, "{launched}");
    assert!(log_text().contains("SIGTERM: leaving the run after the step in flight"), "{}", log_text());
    assert!(log_text().contains("did not exit cleanly: worker-"), "launch names the worker that left: {}", log_text());

    let events = jsonl(&run.join("events.jsonl"));
    let of = |kind: &str| events.iter().filter(|e| e["kind"] == kind).collect::<Vec<_>>();
    assert!(of("death").is_empty(), "a graceful leave is not a death: {events:?}");
    let leave: Vec<_> = of("leave").into_iter().filter(|e| e["reason"].as_str().unwrap().contains("asked to leave (SIGTERM")).collect();
    assert_eq!(leave.len(), 1, "{events:?}");
    let gone = leave[0]["worker"].as_str().unwrap();
    let released = leave[0]["released_shards"].as_array().unwrap();
    assert!(!released.is_empty(), "the leaving worker's lease goes back: {}", leave[0]);
    assert_eq!(leave[0]["members"], 2, "{}", leave[0]);
    // The next quorum has the two others, and it committed steps.
    let (after, members) = quorum_after(&events, |e| e["kind"] == "leave" && e["worker"] == gone);
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(!members.contains(&gone), "{members:?}");
    let q = after["quorum_id"].as_u64().unwrap();
    let metrics = jsonl(&run.join("metrics.jsonl"));
    assert!(metrics.len() > signalled_at, "no step after the SIGTERM at row {signalled_at}");
    assert!(metrics.iter().any(|m| m["quorum_id"].as_u64() == Some(q)), "quorum {q} committed nothing");
    // The released shard was read on by the others: nothing lost, nothing twice.
    let audit: Value = serde_json::from_str(&std::fs::read_to_string(run.join("ledger/epoch-0.json")).unwrap()).unwrap();
    let trained: u64 = metrics.iter().map(|m| m["samples"].as_u64().unwrap()).sum();
    assert_eq!(audit["at_most_once"], true, "{audit}");
    assert_eq!(audit["samples_committed"], trained, "{audit}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A spec whose shards do not exist is refused before any worker starts; shards that exist
/// but hold no readable sample end the run with an error instead of "finished".
#[test]
fn a_run_with_no_readable_sample_fails_instead_of_finishing() {
    let dir = tmp("nosamples");
    let run = dir.join("run");
    let missing = format!("{}/nowhere/{{0..3}}.tar", dir.display());
    let stderr = common::err_text(&[
        "launch", "--workers", "2", "--data", &missing, "--run-dir", run.to_str().unwrap(), "--model", "tiny",
        "--threads", "1",
    ]);
    assert!(stderr.contains("no shard of the dataset spec"), "{stderr}");
    assert!(stderr.contains("4 of 4 checked are missing"), "{stderr}");
    assert!(stderr.contains("nowhere/0.tar"), "{stderr}");
    assert!(!run.join("metrics.jsonl").exists(), "no worker trained");

    // Two files that exist but are not tar archives.
    let data = dir.join("garbage");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..2 {
        std::fs::write(data.join(format!("{i}.tar")), vec![0xAB; 700]).unwrap();
    }
    let spec = format!("{}/{{0..1}}.tar", data.display());
    let run = dir.join("run2");
    let stderr = common::err_text(&[
        "launch", "--workers", "2", "--data", &spec, "--run-dir", run.to_str().unwrap(), "--model", "tiny",
        "--threads", "1", "--min-workers", "2",
    ]);
    assert!(stderr.contains("epoch 0 ended without a single sample trained"), "{stderr}");
    assert!(stderr.contains("2 failed to open or read"), "{stderr}");
    let events = jsonl(&run.join("events.jsonl"));
    assert!(events.iter().any(|e| e["kind"] == "failed"), "{events:?}");
    assert!(!events.iter().any(|e| e["kind"] == "finish"), "{events:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
