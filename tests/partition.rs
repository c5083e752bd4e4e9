//! A network partition: the coordinator and three workers as separate hosts, each in a
//! network namespace of its own joined by veth pairs to a bridge in a hub namespace (all made
//! and removed by the test; addresses 10.77.0.0/24 exist only inside them). Cutting one
//! worker's link leaves its connections open but silent, unlike a kill; the others must treat
//! it as a death: drop the step, form a new quorum within twice the heartbeat timeout, and
//! finish the run with every sample once and equal parameters.
//!
//! Needs root (CAP_SYS_ADMIN for `ip netns`); without it the test says so and passes.

mod common;
use common::{finished_json, jsonl, synth, tmp};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const HEARTBEAT_TIMEOUT_S: f64 = 2.0;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run `ip` (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The namespaces: `hosts[0]` for the coordinator, the others for workers, all bridged in `hub`.
struct Net {
    hub: String,
    hosts: Vec<String>,
    hub_ends: Vec<String>,
}

impl Net {
    fn new(hosts: usize) -> Net {
        let tag = format!("{:x}", std::process::id() % 0xffff);
        let hub = format!("dc{tag}hub");
        let mut net = Net { hub: hub.clone(), hosts: Vec::new(), hub_ends: Vec::new() };
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let (host, a, b) = (format!("dc{tag}h{i}"), format!("dc{tag}a{i}"), format!("dc{tag}b{i}"));
            ip(&["netns", "add", &host]);
            net.hosts.push(host.clone());
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
            ip(&["link", "set", &a, "netns", &hub]);
            ip(&["link", "set", &b, "netns", &host]);
            ip(&["-n", &hub, "link", "set", &a, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &a, "up"]);
            ip(&["-n", &host, "addr", "add", &format!("{}/24", Self::addr(i)), "dev", &b]);
            ip(&["-n", &host, "link", "set", &b, "up"]);
            ip(&["-n", &host, "link", "set", "lo", "up"]);
            net.hub_ends.push(a);
        }
        net
    }

    fn addr(i: usize) -> String {
        format!("10.77.0.{}", 10 + i)
    }

    /// Run `args` in host `i`.
    fn spawn(&self, i: usize, bin: &str, args: &[&str], log: &std::path::Path) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[i], bin])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }

    /// Take host `i`'s link down at the bridge: its packets go nowhere, nothing is closed.
    fn cut(&self, i: usize) {
        ip(&["-n", &self.hub, "link", "set", &self.hub_ends[i], "down"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it.
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Kills the processes when the test ends, passed or not.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Effective uid 0, from /proc (no unsafe, no extra dependency).
fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1).map(str::to_owned));
    uid.as_deref() == Some("0")
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn a_cut_link_is_handled_like_a_death() {
    if !is_root() {
        println!("skipped: not root; a network partition needs `ip netns` (CAP_SYS_ADMIN)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_distclip");
    let dir = tmp("partition");
    // 12 shards of 40: 40 steps per epoch at 3 workers x 4, 60 at 2.
    let spec = synth(&dir, 480, 40);
    let run = dir.join("run");
    let net = Net::new(4);
    let coord_addr = format!("{}:7070", Net::addr(0));
    let coord_log = dir.join("coordinator.log");
    let mut coordinator = net.spawn(
        0,
        bin,
        &[
            "coordinator", "--data", &spec, "--run-dir", run.to_str().unwrap(), "--listen", &coord_addr,
            "--http-listen", "off", "--min-workers", "2", "--model", "tiny", "--batch-size", "4", "--epochs", "2",
            "--lr", "1e-3", "--warmup", "5", "--seed", "4",
            "--set", "cluster.heartbeat_interval_ms=200", "--set", "cluster.heartbeat_timeout_ms=2000",
        ],
        &coord_log,
    );
    let url = format!("http://{coord_addr}");
    let mut workers = Procs(Vec::new());
    for i in 1..4 {
        let listen = format!("{}:0", Net::addr(i));
        let id = format!("w{i}");
        let args = ["worker", "--coordinator", &url, "--listen", &listen, "--threads", "1", "--data-threads", "1", "--worker-id", &id];
        workers.0.push(net.spawn(i, bin, &args, &dir.join(format!("{id}.log"))));
    }

    // Cut worker 3's link once 10 steps are committed.
    let metrics = run.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(&metrics).map(|s| s.lines().count()).unwrap_or(0) < 10 {
        assert!(coordinator.try_wait().unwrap().is_none(), "the coordinator ended early");
        assert!(Instant::now() < deadline, "no 10 steps within 300 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let cut_at = now_s();
    net.cut(3);

    let outcome = finished_json(coordinator, "the coordinator", &coord_log);
    assert_eq!(outcome["state"], "finished", "{outcome}");
    // The survivors finish and agree; the cut-off worker is stopped by the test.
    let mut isolated = workers.0.pop().unwrap();
    let _ = isolated.kill();
    let _ = isolated.wait();
    let mut checksums = Vec::new();
    for (i, w) in workers.0.drain(..).enumerate() {
        let out = finished_json(w, &format!("worker w{}", i + 1), &dir.join(format!("w{}.log", i + 1)));
        checksums.push(out["params_checksum"].as_str().unwrap().to_owned());
    }
    assert_eq!(checksums.len(), 2);
    assert_eq!(checksums[0], checksums[1], "the survivors differ");

    let events = jsonl(&run.join("events.jsonl"));
    let death = events
        .iter()
        .find(|e| e["kind"] == "death" && e["worker"] == "w3")
        .unwrap_or_else(|| panic!("no death of w3: {events:?}"));
    assert!(death["reason"].as_str().unwrap().contains("heartbeat"), "{death}");
    let regrouped = events
        .iter()
        .find(|e| {
            let mut members: Vec<&str> = e["members"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            members.sort_unstable();
            e["kind"] == "quorum" && e["time"].as_f64().unwrap() > cut_at && members == ["w1", "w2"]
        })
        .unwrap_or_else(|| panic!("no quorum of w1 and w2 after the cut: {events:?}"));
    let took = regrouped["time"].as_f64().unwrap() - cut_at;
    assert!(took < 2.0 * HEARTBEAT_TIMEOUT_S, "new quorum {took:.2} s after the cut (heartbeat timeout {HEARTBEAT_TIMEOUT_S} s)");
    println!("new quorum {took:.2} s after the cut");
    for epoch in 0..2 {
        let audit: Value = serde_json::from_str(&std::fs::read_to_string(run.join(format!("ledger/epoch-{epoch}.json"))).unwrap()).unwrap();
        assert_eq!(audit["exactly_once"], true, "epoch {epoch}: {audit}");
        assert_eq!(audit["samples_committed"], 480, "epoch {epoch}: {audit}");
    }
    drop(net);
    std::fs::remove_dir_all(&dir).unwrap();
}
