//! `distclip bench coordinator --workers 1024 --shards 231000 --steps-per-s 1`: one real
//! coordinator process (this binary, re-run with `--serve`) on loopback, driven by simulated
//! workers over real gRPC, one connection each, that do what a worker does every step: heartbeat,
//! lease, `Quorum`, `Commit` with their batch's sample positions and shard reports. Reports
//! latency percentiles per RPC, the commit latency, the coordinator's peak RSS and the bytes
//! its journal wrote per step.
//!
//! `Quorum` and `Commit` block until every member asked (voted), so their client-side time is
//! mostly waiting for the slowest worker. What the coordinator adds is measured from the moment
//! the last member's request was sent: "release" latency (every member's answer, after the
//! decision became possible). The commit latency is the deciding vote's round trip: checking
//! the step, entering its positions in the ledger, the journal line with its fsync, the answer.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use distclip_coordinator::{CoordinatorOptions, ShardInfo};
use distclip_proto::v1::coordinator_client::CoordinatorClient;
use distclip_proto::v1::{
    CommitRequest, HeartbeatRequest, JoinRequest, LeaseRequest, LeaveRequest, QuorumRequest, ShardIndices,
    ShardReport, StepAction, StepMetrics,
};
use tonic::transport::{Channel, Endpoint};

/// Arguments of `distclip bench coordinator`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Simulated workers (one gRPC connection each).
    #[arg(long, default_value_t = 1024)]
    workers: usize,
    /// Shards in the dataset (LAION-2B: 231,000).
    #[arg(long, default_value_t = 231_000)]
    shards: u64,
    /// Steps per second the workers pace themselves to.
    #[arg(long, default_value_t = 1.0)]
    steps_per_s: f64,
    /// Steps to run.
    #[arg(long, default_value_t = 30)]
    steps: u64,
    /// Samples per worker per step.
    #[arg(long, default_value_t = 32)]
    batch: u64,
    /// Samples per shard: a worker finishes, reports and leases a shard every
    /// `samples_per_shard / batch` steps.
    #[arg(long, default_value_t = 256)]
    samples_per_shard: u64,
    /// Run directory of the coordinator (default: a fresh temporary one, deleted after).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Internal: be the coordinator process.
    #[arg(long, hide = true)]
    serve: bool,
}

/// Run `distclip bench coordinator`.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers > 0 && args.shards > 0 && args.steps > 0, "--workers, --shards and --steps must be positive");
    anyhow::ensure!(args.steps_per_s > 0.0, "--steps-per-s must be positive");
    anyhow::ensure!(args.batch > 0 && args.samples_per_shard > 0, "--batch and --samples-per-shard must be positive");
    raise_fd_limit(args.workers as u64 + 256)?;
    if args.serve {
        return serve(&args);
    }
    let (run_dir, temporary) = match &args.run_dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("distclip-bench-coordinator-{}", std::process::id())), true),
    };
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let mut child = spawn_coordinator(&args, &run_dir)?;
    let result = drive(&args, &run_dir, &child);
    let _ = child.kill();
    let _ = child.wait();
    if temporary && result.is_ok() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    let report = result.with_context(|| format!("the coordinator's log is {}", run_dir.join("coordinator.log").display()))?;
    super::print_json(&report)
}

fn shard_url(i: u64) -> String {
    format!("/nonexistent/distclip-bench/{i:06}.tar")
}

fn raise_fd_limit(need: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading the open-file limit")?;
    if soft < need {
        anyhow::ensure!(
            hard >= need,
            "{need} open files are needed (one connection per worker) but the hard limit is {hard}: raise it (ulimit -Hn) or pass fewer --workers"
        );
        setrlimit(Resource::RLIMIT_NOFILE, need, hard).context("raising the open-file limit")?;
    }
    Ok(())
}

/// The coordinator process: synthetic shards, every worker in one quorum, `--steps` steps.
fn serve(args: &Args) -> anyhow::Result<()> {
    let run_dir = args.run_dir.clone().context("--serve needs --run-dir")?;
    let sets = vec![
        format!("data.train=/nonexistent/distclip-bench/{{000000..{:06}}}.tar", args.shards - 1),
        format!("train.batch_size={}", args.batch),
        format!("train.max_steps={}", args.steps),
        format!("cluster.min_workers={}", args.workers),
        format!("cluster.max_workers={}", args.workers),
        "data.shards_per_worker=2".into(),
    ];
    let config = distclip_config::RunConfig::load(None, &sets)?;
    let shards = (0..args.shards).map(|i| ShardInfo { url: shard_url(i), weight: 1.0 }).collect();
    let mut opts = CoordinatorOptions::new(config, shards, run_dir);
    opts.exit_grace = Some(Duration::from_secs(5));
    opts.http_listen = Some("127.0.0.1:0".into());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(distclip_coordinator::serve(opts, async {
        let _ = tokio::signal::ctrl_c().await;
    }))?;
    anyhow::ensure!(outcome.finished(), "the run ended {}: {:?}", outcome.state, outcome.error);
    Ok(())
}

fn spawn_coordinator(args: &Args, run_dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(run_dir.join("coordinator.log"))?;
    let exe = std::env::current_exe().context("finding this executable")?;
    Command::new(exe)
        .args(["bench", "coordinator", "--serve", "--run-dir"])
        .arg(run_dir)
        .args(["--workers", &args.workers.to_string(), "--shards", &args.shards.to_string()])
        .args(["--steps", &args.steps.to_string(), "--batch", &args.batch.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the coordinator process")
}

/// One RPC's send and receive times, with the step it belonged to.
#[derive(Clone, Copy)]
struct Call {
    step: u64,
    sent: Instant,
    got: Instant,
}

#[derive(Default)]
struct Calls {
    join: Vec<Call>,
    heartbeat: Vec<Call>,
    lease: Vec<Call>,
    quorum: Vec<Call>,
    commit: Vec<Call>,
}

async fn timed<T>(step: u64, out: &mut Vec<Call>, f: impl std::future::Future<Output = T>) -> T {
    let sent = Instant::now();
    let r = f.await;
    out.push(Call { step, sent, got: Instant::now() });
    r
}

fn drive(args: &Args, run_dir: &Path, child: &Child) -> anyhow::Result<serde_json::Value> {
    let addr_file = run_dir.join("coordinator.addr");
    let waited = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && a.ends_with('\n')
        {
            break a.trim().to_string();
        }
        anyhow::ensure!(waited.elapsed() < Duration::from_secs(120), "the coordinator did not listen within 2 minutes");
        std::thread::sleep(Duration::from_millis(20));
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let pid = child.id();
    runtime.block_on(async move {
        let start = Arc::new(tokio::sync::Barrier::new(args.workers));
        let mut tasks = Vec::new();
        for w in 0..args.workers {
            let (args, addr, start) = (args.clone(), addr.clone(), start.clone());
            tasks.push(tokio::spawn(async move { worker(&args, &addr, w, start).await }));
        }
        // The journal's segments are folded into the snapshot when the run ends: watch their
        // size while it runs.
        let journal = run_dir.join("journal");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let sampler = tokio::spawn(async move {
            let mut peak = 0;
            loop {
                peak = peak.max(dir_bytes(&journal));
                tokio::select! {
                    _ = &mut stopped => return peak,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        });
        let mut stop = Some(stop);
        let mut calls = Calls::default();
        let mut rss = None;
        let mut commit_work = Err(anyhow::anyhow!("not scraped"));
        for (i, t) in tasks.into_iter().enumerate() {
            let c = t.await.context("a simulated worker panicked")??;
            if i == 0 {
                // Every worker is done with its last step once the first has left: the
                // coordinator's high-water mark is final.
                rss = peak_rss(pid);
                commit_work = scrape_commit_seconds(run_dir).await;
                stop.take().map(|s| s.send(()));
            }
            calls.join.extend(c.join);
            calls.heartbeat.extend(c.heartbeat);
            calls.lease.extend(c.lease);
            calls.quorum.extend(c.quorum);
            calls.commit.extend(c.commit);
        }
        let journal_peak = sampler.await.unwrap_or(0);
        let commit_work = commit_work.context("reading distclip_coordinator_commit_seconds from /metrics")?;
        report(args, run_dir, &calls, rss, journal_peak, commit_work)
    })
}

/// `VmHWM` of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn worker(args: &Args, addr: &str, w: usize, start: Arc<tokio::sync::Barrier>) -> anyhow::Result<Calls> {
    let channel: Channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("worker {w} connecting to {addr}"))?;
    let mut c = CoordinatorClient::new(channel);
    let id = format!("bench-{w:05}");
    let mut calls = Calls::default();
    let joined = timed(0, &mut calls.join, c.join(JoinRequest {
        worker_id: id.clone(),
        peer_address: format!("{id}.peer:1"),
        device: "bench".into(),
        threads: 1,
        step: 0,
        rank_hint: None,
    }))
    .await
    .with_context(|| format!("{id}: join"))?
    .into_inner();
    let (hb_stop, hb_calls) = heartbeats(c.clone(), id.clone(), Duration::from_millis(joined.heartbeat_interval_ms.max(1)));
    start.wait().await;
    let t0 = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.steps_per_s);
    // Positions still to read per leased shard, in order, and the reports for shards read out.
    let mut held: VecDeque<(u64, VecDeque<u64>)> = VecDeque::new();
    let mut pending: Option<(Vec<ShardIndices>, Vec<ShardReport>)> = None;
    let mut step = 0u64;
    let mut epoch = 0u64;
    // The quorum whose member list this worker holds, as a real worker keeps it.
    let mut known = 0u64;
    loop {
        let left: usize = held.iter().map(|(_, l)| l.len()).sum();
        if pending.is_none() && (left as u64) < args.batch && held.len() < 2 {
            let r = timed(step, &mut calls.lease, c.lease(LeaseRequest {
                worker_id: id.clone(),
                epoch,
                want: 2 - held.len() as u32,
                shard_reports: vec![],
                fresh: false,
            }))
            .await
            .with_context(|| format!("{id}: lease"))?
            .into_inner();
            for l in r.leases {
                let skip: Vec<(u64, u64)> = l.skip.iter().map(|r| (r.start, r.end)).collect();
                let todo = (0..args.samples_per_shard).filter(|i| !skip.iter().any(|&(s, e)| (s..e).contains(i)));
                held.push_back((l.shard, todo.collect()));
            }
        }
        tokio::time::sleep_until((t0 + period * step as u32).into()).await;
        let q = timed(step, &mut calls.quorum, c.quorum(QuorumRequest {
            worker_id: id.clone(),
            step,
            epoch,
            has_data: pending.is_some() || !held.is_empty(),
            commit_quorum: 0,
            known_quorum: known,
        }))
        .await
        .with_context(|| format!("{id}: quorum at step {step}"))?
        .into_inner();
        match StepAction::try_from(q.action).unwrap_or(StepAction::Unspecified) {
            StepAction::Train => {
                anyhow::ensure!(q.step == step, "{id} was told step {} at step {step}", q.step);
                let (consumed, reports) = pending.take().unwrap_or_else(|| take_batch(&mut held, args, epoch));
                let quorum_id = q.quorum.as_ref().map_or(0, |q| q.quorum_id);
                if q.quorum.as_ref().is_some_and(|q| !q.members.is_empty()) {
                    known = quorum_id;
                }
                let samples: usize = consumed.iter().map(|g| g.indices.len()).sum();
                let d = timed(step, &mut calls.commit, c.commit(CommitRequest {
                    worker_id: id.clone(),
                    quorum_id,
                    step,
                    ok: true,
                    error: String::new(),
                    consumed: consumed.clone(),
                    shard_reports: reports.clone(),
                    metrics: Some(StepMetrics {
                        loss: 1.0,
                        samples: samples as u32,
                        step_s: period.as_secs_f64(),
                        ..Default::default()
                    }),
                    non_finite: false,
                }))
                .await
                .with_context(|| format!("{id}: commit at step {step}"))?
                .into_inner();
                if d.commit {
                    step += 1;
                } else {
                    pending = Some((consumed, reports));
                }
            }
            StepAction::Wait => {}
            StepAction::NextEpoch => epoch = q.epoch,
            StepAction::Finish => break,
            StepAction::Unspecified => anyhow::bail!("{id}: the coordinator answered no action"),
        }
    }
    let _ = hb_stop.send(());
    calls.heartbeat = hb_calls.await.unwrap_or_default();
    c.leave(LeaveRequest { worker_id: id.clone(), reason: "finished".into() })
        .await
        .with_context(|| format!("{id}: leave"))?;
    Ok(calls)
}

/// The next `batch` positions, and a report for every shard they finish.
fn take_batch(held: &mut VecDeque<(u64, VecDeque<u64>)>, args: &Args, epoch: u64) -> (Vec<ShardIndices>, Vec<ShardReport>) {
    let mut groups: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut reports = Vec::new();
    let mut n = 0;
    while n < args.batch {
        let Some((shard, left)) = held.front_mut() else { break };
        let shard = *shard;
        while n < args.batch {
            let Some(i) = left.pop_front() else { break };
            groups.entry(shard).or_default().push(i);
            n += 1;
        }
        if left.is_empty() {
            held.pop_front();
            reports.push(ShardReport { shard, epoch, samples: args.samples_per_shard, ..Default::default() });
        }
    }
    (groups.into_iter().map(|(shard, indices)| ShardIndices { shard, indices }).collect(), reports)
}

/// Heartbeats on their own task, as a real worker sends them, until told to stop.
fn heartbeats(
    mut c: CoordinatorClient<Channel>,
    id: String,
    period: Duration,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Vec<Call>>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut calls = Vec::new();
        loop {
            let req = HeartbeatRequest { worker_id: id.clone(), step: 0, state: "training".into() };
            if timed(0, &mut calls, c.heartbeat(req)).await.is_err() {
                calls.pop();
            }
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep(period) => {}
            }
        }
        calls
    });
    (stop, task)
}

/// p50, p99 and max in milliseconds.
fn percentiles(mut ms: Vec<f64>) -> serde_json::Value {
    if ms.is_empty() {
        return serde_json::Value::Null;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    serde_json::json!({"n": ms.len(), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ms[ms.len() - 1]})
}

fn round_trip(calls: &[Call]) -> Vec<f64> {
    calls.iter().map(|c| (c.got - c.sent).as_secs_f64() * 1e3).collect()
}

/// Per step: each member's answer after the last member's request was sent.
fn release(calls: &[Call]) -> Vec<f64> {
    let mut last: BTreeMap<u64, Instant> = BTreeMap::new();
    for c in calls {
        let e = last.entry(c.step).or_insert(c.sent);
        *e = (*e).max(c.sent);
    }
    calls.iter().map(|c| c.got.saturating_duration_since(last[&c.step]).as_secs_f64() * 1e3).collect()
}

/// The steps whose slowest answer (after the last request) took longest: (step, ms), worst first.
fn slowest_steps(calls: &[Call], n: usize) -> Vec<(u64, f64)> {
    let release = release(calls);
    let mut worst: BTreeMap<u64, f64> = BTreeMap::new();
    for (c, ms) in calls.iter().zip(release) {
        let w = worst.entry(c.step).or_default();
        *w = w.max(ms);
    }
    let mut v: Vec<(u64, f64)> = worst.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(n);
    v
}

/// Per step: the round trip of the request sent last (the one whose arrival decides).
fn deciding(calls: &[Call]) -> Vec<f64> {
    let mut last: BTreeMap<u64, Call> = BTreeMap::new();
    for c in calls {
        let e = last.entry(c.step).or_insert(*c);
        if c.sent > e.sent {
            *e = *c;
        }
    }
    last.values().map(|c| (c.got - c.sent).as_secs_f64() * 1e3).collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// `distclip_coordinator_commit_seconds` from the coordinator's `/metrics`: count, mean, and the
/// bucket bounds that hold the median and the 99th percentile, in milliseconds.
async fn scrape_commit_seconds(run_dir: &Path) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = std::fs::read_to_string(run_dir.join("coordinator.http"))?;
    let mut s = tokio::net::TcpStream::connect(addr.trim()).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let name = "distclip_coordinator_commit_seconds";
    let value = |suffix: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(&format!("{name}{suffix} ")))?;
        line.rsplit(' ').next()?.parse().ok()
    };
    let count = value("_count").context("no commit was observed")?;
    let sum = value("_sum").unwrap_or(0.0);
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|l| {
            let (le, n) = l.split_once("\"} ")?;
            Some((le.parse().ok()?, n.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let at = |q: f64| buckets.iter().find(|(_, n)| *n >= q * count).map(|(le, _)| le * 1e3);
    Ok(serde_json::json!({
        "n": count,
        "mean_ms": if count > 0.0 { sum / count * 1e3 } else { 0.0 },
        "p50_at_most_ms": at(0.5),
        "p99_at_most_ms": at(0.99),
    }))
}

fn report(
    args: &Args,
    run_dir: &Path,
    calls: &Calls,
    rss: Option<u64>,
    journal_peak: u64,
    commit_work: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let committed: std::collections::BTreeSet<u64> = calls.commit.iter().map(|c| c.step).collect();
    anyhow::ensure!(committed.len() as u64 == args.steps, "{} of {} steps committed", committed.len(), args.steps);
    let unary: Vec<Call> = [&calls.heartbeat, &calls.lease].into_iter().flatten().copied().collect();
    Ok(serde_json::json!({
        "bench": "coordinator",
        "workers": args.workers,
        "shards": args.shards,
        "steps": args.steps,
        "steps_per_s": args.steps_per_s,
        "batch_per_worker": args.batch,
        "samples_per_shard": args.samples_per_shard,
        "rpc_ms": {
            "unary": percentiles(round_trip(&unary)),
            "heartbeat": percentiles(round_trip(&calls.heartbeat)),
            "lease": percentiles(round_trip(&calls.lease)),
            "join": percentiles(round_trip(&calls.join)),
            "quorum_release": percentiles(release(&calls.quorum)),
            "commit_release": percentiles(release(&calls.commit)),
        },
        "slowest_quorum_steps_ms": slowest_steps(&calls.quorum, 3),
        "slowest_commit_steps_ms": slowest_steps(&calls.commit, 3),
        "commit_round_trip_ms": percentiles(deciding(&calls.commit)),
        "commit_work_ms": commit_work,
        "coordinator_peak_rss_bytes": rss,
        "state_json_bytes": std::fs::metadata(run_dir.join("state.json")).map(|m| m.len()).ok(),
        "journal_peak_bytes": journal_peak,
        "journal_bytes_per_step": journal_peak / args.steps,
        "events_jsonl_bytes": std::fs::metadata(run_dir.join("events.jsonl")).map(|m| m.len()).ok(),
    }))
}
