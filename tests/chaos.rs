//! The chaos test: 4 workers and a coordinator as separate processes on loopback, a seeded
//! schedule of worker kills (SIGKILL), fresh workers joining later, and one SIGKILL and restart
//! of the coordinator on the same run directory and address. The run must finish with every
//! sample of every epoch committed exactly once, finite losses, one metrics line per step, and
//! identical parameters on every surviving rank.
//!
//! The schedule comes from `DISTCLIP_CHAOS_SEED` (default 1) and is printed, so a failure
//! reproduces with the same seed.

mod common;
use common::{finished_json, jsonl, synth, tmp};

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// splitmix64: a seeded schedule without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    /// SIGKILL the worker in this slot (0..4).
    KillWorker(usize),
    /// Start a fresh worker (new id) in this slot.
    StartWorker(usize),
    /// SIGKILL the coordinator and start it again on the same run directory and address.
    RestartCoordinator,
}

/// Three kills of distinct workers, each followed 3 to 12 steps later by a fresh worker in its
/// slot, and one coordinator restart; all within the first 75 steps (the run has about 120
/// with 4 workers, more with fewer). At most two workers are down at once, so the run never
/// falls below `cluster.min_workers = 2`.
fn schedule(seed: u64) -> Vec<(u64, Action)> {
    let mut rng = Rng(seed);
    let mut events = Vec::new();
    let mut slots: Vec<usize> = (0..4).collect();
    // Kill i falls in steps [5 + 20i, 20 + 20i) and its replacement starts 3 to 12 steps later,
    // so no more than two workers are ever down at once.
    for i in 0..3 {
        let slot = slots.remove(rng.range(0, slots.len() as u64) as usize);
        let at = rng.range(5 + 20 * i, 20 + 20 * i);
        events.push((at, Action::KillWorker(slot)));
        events.push((at + rng.range(3, 13), Action::StartWorker(slot)));
    }
    events.push((rng.range(20, 75), Action::RestartCoordinator));
    events.sort_by_key(|(at, a)| (*at, matches!(a, Action::StartWorker(_))));
    events
}

struct Cluster {
    bin: &'static str,
    run: PathBuf,
    spec: String,
    addr: Option<String>,
    coordinator: Option<Child>,
    workers: Vec<Option<(String, Child)>>,
    started: usize,
}

impl Cluster {
    fn start_coordinator(&mut self) {
        let listen = self.addr.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.run.with_extension("coordinator.log")).unwrap();
        let child = Command::new(self.bin)
            .args(["coordinator", "--data", &self.spec, "--run-dir", self.run.to_str().unwrap(), "--listen", &listen])
            .args(["--http-listen", "off", "--min-workers", "2", "--model", "tiny", "--batch-size", "4", "--epochs", "4"])
            .args(["--lr", "1e-3", "--warmup", "5", "--seed", "3"])
            .args(["--set", "cluster.heartbeat_interval_ms=200", "--set", "cluster.heartbeat_timeout_ms=2000"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
        if self.addr.is_none() {
            let file = self.run.join("coordinator.addr");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !file.exists() {
                assert!(Instant::now() < deadline, "the coordinator wrote no coordinator.addr");
                std::thread::sleep(Duration::from_millis(10));
            }
            self.addr = Some(std::fs::read_to_string(&file).unwrap().trim().to_owned());
        }
    }

    fn start_worker(&mut self, slot: usize) {
        let id = format!("w{}", self.started);
        self.started += 1;
        let log = std::fs::File::create(self.run.with_extension(format!("{id}.log"))).unwrap();
        let child = Command::new(self.bin)
            .args(["worker", "--coordinator", &format!("http://{}", self.addr.as_ref().unwrap())])
            .args(["--listen", "127.0.0.1:0", "--threads", "1", "--data-threads", "1", "--worker-id", &id])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        self.workers[slot] = Some((id, child));
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::KillWorker(slot) => {
                let (_, mut child) = self.workers[slot].take().expect("a live worker in the slot");
                child.kill().unwrap();
                child.wait().unwrap();
            }
            Action::StartWorker(slot) => self.start_worker(slot),
            Action::RestartCoordinator => {
                let mut child = self.coordinator.take().unwrap();
                child.kill().unwrap();
                child.wait().unwrap();
                self.start_coordinator();
            }
        }
    }

    /// Committed steps so far (metrics lines).
    fn steps(&self) -> u64 {
        std::fs::read_to_string(self.run.join("metrics.jsonl")).map(|s| s.lines().count() as u64).unwrap_or(0)
    }

    /// Wait until `step` steps are committed; false if the coordinator ended first.
    fn wait_for_step(&mut self, step: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.steps() < step {
            if self.coordinator.as_mut().unwrap().try_wait().unwrap().is_some() {
                return false;
            }
            assert!(Instant::now() < deadline, "no step {step} within 300 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Cluster {
    /// A failed assertion must not leave processes behind.
    fn drop(&mut self) {
        let children = self.coordinator.iter_mut().chain(self.workers.iter_mut().filter_map(|w| w.as_mut().map(|w| &mut w.1)));
        for child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_run_survives_worker_kills_and_a_coordinator_restart_exactly_once() {
    let seed: u64 = std::env::var("DISTCLIP_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let events = schedule(seed);
    println!("chaos seed {seed} (DISTCLIP_CHAOS_SEED): {events:?}");
    let dir = tmp("chaos");
    // 12 shards of 40: 30 steps per epoch at 4 workers x 4.
    let spec = synth(&dir, 480, 40);
    let mut cluster = Cluster {
        bin: env!("CARGO_BIN_EXE_distclip"),
        run: dir.join("run"),
        spec,
        addr: None,
        coordinator: None,
        workers: (0..4).map(|_| None).collect(),
        started: 0,
    };
    cluster.start_coordinator();
    for slot in 0..4 {
        cluster.start_worker(slot);
    }
    for (at, action) in &events {
        assert!(cluster.wait_for_step(*at), "seed {seed}: the run ended before step {at} ({action:?})");
        println!("step {}: {action:?}", cluster.steps());
        cluster.apply(*action);
    }

    let coordinator = cluster.coordinator.take().unwrap();
    let outcome = finished_json(coordinator, "the coordinator", &cluster.run.with_extension("coordinator.log"));
    // The workers leave once the run is finished.
    assert_eq!(outcome["state"], "finished", "{outcome}");
    let mut checksums = Vec::new();
    for (id, child) in cluster.workers.iter_mut().filter_map(Option::take) {
        let out = finished_json(child, &id, &cluster.run.with_extension(format!("{id}.log")));
        checksums.push((id, out["params_checksum"].as_str().unwrap().to_owned()));
    }
    assert_eq!(checksums.len(), 4);
    assert!(checksums.iter().all(|c| c.1 == checksums[0].1), "seed {seed}: ranks differ at the end: {checksums:?}");

    let run = &cluster.run;
    for epoch in 0..4 {
        let audit: Value = serde_json::from_str(&std::fs::read_to_string(run.join(format!("ledger/epoch-{epoch}.json"))).unwrap()).unwrap();
        assert_eq!(audit["exactly_once"], true, "seed {seed}, epoch {epoch}: {audit}");
        assert_eq!(audit["samples_committed"], 480, "seed {seed}, epoch {epoch}: {audit}");
    }
    let metrics = jsonl(&run.join("metrics.jsonl"));
    let steps: Vec<u64> = metrics.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..steps.len() as u64).collect::<Vec<_>>(), "seed {seed}: one metrics line per committed step");
    assert!(metrics.iter().all(|m| m["loss"].as_f64().is_some_and(f64::is_finite)), "seed {seed}: a loss is not finite");
    assert_eq!(outcome["step"].as_u64(), Some(steps.len() as u64), "{outcome}");

    let events = jsonl(&run.join("events.jsonl"));
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(count("resume"), 1, "seed {seed}: the restarted coordinator resumed once");
    assert_eq!(count("checksum_mismatch"), 0, "seed {seed}: ranks diverged");
    assert!(count("death") + count("commit_failed") >= 3, "seed {seed}: the kills left no trace in events.jsonl");
    std::fs::remove_dir_all(&dir).unwrap();
}
