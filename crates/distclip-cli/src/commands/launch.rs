//! `distclip launch`: a coordinator and N workers as separate processes on loopback, the way an
//! operator would start them on separate machines. Logs are forwarded with a prefix, Ctrl-C stops
//! every process, and the exit code says whether the run finished.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::run_args::RunArgs;

/// Arguments of `distclip launch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Worker processes to start.
    #[arg(long)]
    workers: usize,
    /// Shard spec of the training data (e.g. `/data/{00000..00099}.tar`).
    #[arg(long)]
    data: String,
    /// Run directory (config, metrics, events, ledger, checkpoints).
    #[arg(long)]
    run_dir: PathBuf,
    /// Device of every worker: `flex`, `cpu` or `cuda:N` (`cuda` alone gives worker i `cuda:i`).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Compute threads per worker.
    #[arg(long)]
    threads: Option<usize>,
    /// Decode threads per worker.
    #[arg(long)]
    data_threads: Option<usize>,
    /// Workers needed for training to go on (cluster.min_workers; default: --workers). Below
    /// it the run waits for replacements.
    #[arg(long)]
    min_workers: Option<usize>,
    /// Restarts over the whole run: a replacement for a worker that died, or the coordinator
    /// again after a kill. Unlike torchrun's --max-restarts, which restarts every worker, the
    /// others keep training meanwhile.
    #[arg(long, default_value_t = 3)]
    max_restarts: usize,
    /// Continue a run from a checkpoint: `latest` (the newest good one in RUN_DIR/checkpoints)
    /// or a checkpoint directory. Required to reuse a run directory that already holds a run.
    #[arg(long, value_name = "latest|PATH")]
    resume: Option<String>,
    /// Run configuration, options and overrides shared with `distclip coordinator`.
    #[command(flatten)]
    run: RunArgs,
    /// TLS for every process (the certificate must name 127.0.0.1, or pass --tls-server-name).
    #[command(flatten)]
    tls: super::security::TlsArgs,
}

/// How long the coordinator may take to bind and announce its address.
const COORDINATOR_START_TIMEOUT: Duration = Duration::from_secs(60);
/// After Ctrl-C or a failed coordinator, how long processes get to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    /// The threads relaying its stdout and stderr; they end when it has exited and its last
    /// line is relayed.
    relays: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Wait until everything the exited process wrote is relayed, so that its last words
    /// (often the error) come before launch's own.
    fn drain_output(&mut self) {
        for relay in self.relays.drain(..) {
            let _ = relay.join();
        }
    }
}

/// Start the run and wait for it.
pub fn run(args: Args, log_format: &str) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let started = Instant::now();
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating run directory {}", args.run_dir.display()))?;
    let exe = std::env::current_exe().context("finding the distclip executable")?;
    if args.resume.is_none() && args.run_dir.join("state.json").exists() {
        bail!(
            "{} already holds a run; pass --resume latest to continue it from its last checkpoint, or choose a new --run-dir",
            args.run_dir.display()
        );
    }
    let addr_file = args.run_dir.join("coordinator.addr");
    // A stale address from an earlier run in the same directory must not be mistaken for ours.
    let _ = std::fs::remove_file(&addr_file);
    let http_file = args.run_dir.join("coordinator.http");
    let _ = std::fs::remove_file(&http_file);

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }

    // Check the TLS files once here, so a bad one is reported before any process starts.
    let tls = args.tls.load()?.is_some();
    let token = args.run.token();

    let min_workers = args.min_workers.unwrap_or(args.workers);
    anyhow::ensure!(
        (1..=args.workers).contains(&min_workers),
        "--min-workers {min_workers} must be between 1 and --workers {}",
        args.workers
    );
    // `listen` is port 0 the first time; a restart takes the address the workers know, and
    // continues from state.json rather than from `--resume` again.
    let coordinator_cmd = |listen: &str, resume: Option<&str>| {
        let mut cmd = Command::new(&exe);
        cmd.arg("--log-format").arg(log_format).arg("coordinator");
        cmd.arg("--data").arg(&args.data).arg("--run-dir").arg(&args.run_dir);
        cmd.arg("--listen").arg(listen);
        // A free port, so runs side by side (and tests) never collide on the default 7071.
        cmd.arg("--http-listen").arg("127.0.0.1:0");
        // Through the environment rather than --min-workers, so the word "worker" is in no
        // coordinator argv: `pkill -f worker` then hits workers only.
        cmd.env("DISTCLIP_MIN_WORKERS", min_workers.to_string());
        cmd.args(args.run.to_cli_args());
        cmd.args(args.tls.to_cli_args());
        // Through the environment, not argv: other users of the machine can read argv.
        if let Some(token) = &token {
            cmd.env("DISTCLIP_TOKEN", token);
        }
        if let Some(r) = resume {
            cmd.arg("--resume").arg(r);
        }
        cmd
    };
    let mut procs = vec![spawn("coordinator", coordinator_cmd("127.0.0.1:0", args.resume.as_deref()))?];

    let coordinator = match wait_for_address(&addr_file, &mut procs[0], &stop) {
        Ok(a) => a,
        Err(e) => {
            stop_all(&mut procs);
            return Err(e);
        }
    };
    tracing::info!("coordinator at {coordinator}; starting {} workers", args.workers);
    // Written before coordinator.addr, so it is there now.
    if let Ok(http) = std::fs::read_to_string(&http_file) {
        tracing::info!("metrics at http://{}/metrics", http.trim());
    }
    let start_worker = |i: usize| -> anyhow::Result<Proc> {
        let device = if args.device == "cuda" { format!("cuda:{i}") } else { args.device.clone() };
        let mut cmd = Command::new(&exe);
        cmd.arg("--log-format").arg(log_format).arg("worker");
        let scheme = if tls { "https" } else { "http" };
        cmd.arg("--coordinator").arg(format!("{scheme}://{coordinator}"));
        cmd.args(args.tls.to_cli_args());
        cmd.arg("--listen").arg("127.0.0.1:0").arg("--device").arg(device);
        // Slot i is rank i whenever it is in the quorum, replacements included.
        cmd.arg("--rank").arg(i.to_string());
        if let Some(t) = args.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        if let Some(t) = args.data_threads {
            cmd.arg("--data-threads").arg(t.to_string());
        }
        if let Some(token) = &token {
            cmd.env("DISTCLIP_TOKEN", token);
        }
        spawn(&format!("worker-{i}"), cmd)
    };
    for i in 0..args.workers {
        procs.push(start_worker(i)?);
    }

    // Supervise: the coordinator decides when the run is over and workers leave when it says so.
    // A worker that dies is replaced (up to --max-restarts in all); the run's elastic membership
    // takes the new one in. A coordinator killed by a signal (kill -9, the OOM killer) is
    // restarted on the address the workers know; it continues from the run state it persisted,
    // and the workers, which ride out a coordinator outage, join it again.
    let mut restarts = 0usize;
    loop {
        if stop.load(Ordering::SeqCst) {
            eprintln!("launch: interrupted, stopping every process");
            stop_all(&mut procs);
            bail!("interrupted");
        }
        for p in procs.iter_mut().filter(|p| p.status.is_none()) {
            if let Some(s) = p.child.try_wait().with_context(|| format!("waiting for {}", p.name))? {
                if !s.success() {
                    eprintln!("launch: {} exited with {s}", p.name);
                }
                p.status = Some(s);
            }
        }
        if let Some(s) = procs[0].status {
            if !killed_by_signal(s) {
                return finish_with_coordinator(&args, &mut procs, s, started, restarts);
            }
            if restarts >= args.max_restarts {
                stop_all(&mut procs);
                bail!(
                    "the coordinator was killed ({s}) and --max-restarts ({}) is spent; continue the run with the same command and --resume latest",
                    args.max_restarts
                );
            }
            restarts += 1;
            eprintln!(
                "launch: the coordinator was killed ({s}); restarting it on {coordinator} from its run state (restart {restarts} of {})",
                args.max_restarts
            );
            let _ = std::fs::remove_file(&addr_file);
            procs[0] = spawn("coordinator", coordinator_cmd(&coordinator, None))?;
            if let Err(e) = wait_for_address(&addr_file, &mut procs[0], &stop) {
                stop_all(&mut procs);
                return Err(e.context("restarting the coordinator"));
            }
        }
        for i in 0..args.workers {
            let p = &procs[i + 1];
            let died = p.status.is_some_and(|s| !s.success());
            if died && restarts < args.max_restarts {
                restarts += 1;
                eprintln!("launch: starting a replacement for {} (restart {restarts} of {})", p.name, args.max_restarts);
                procs[i + 1] = start_worker(i)?;
            }
        }
        let workers_done = procs[1..].iter().all(|p| p.status.is_some());
        if workers_done && procs[1..].iter().all(|p| !p.status.is_some_and(|s| s.success())) {
            eprintln!("launch: every worker has died and --max-restarts ({}) is spent; stopping", args.max_restarts);
            stop_all(&mut procs);
            bail!("every worker died; their logs are above");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The coordinator ended (its own exit, not a kill): give the workers the grace period to see
/// the end of the run and leave, stop what is left, and report.
fn finish_with_coordinator(
    args: &Args,
    procs: &mut [Proc],
    status: ExitStatus,
    started: Instant,
    restarts: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && procs.iter_mut().any(still_running) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_all(procs);
    if !status.success() {
        bail!("the coordinator failed ({status}); see {}", args.run_dir.join("events.jsonl").display());
    }
    report(args, procs, started, restarts)
}

/// Print the outcome of a finished run as one JSON line.
fn report(args: &Args, procs: &[Proc], started: Instant, restarts: usize) -> anyhow::Result<()> {
    let failed: Vec<String> =
        procs.iter().filter(|p| !p.status.is_some_and(|s| s.success())).map(|p| p.name.clone()).collect();
    if !failed.is_empty() {
        // The run finished (the run state says so), but a process did not exit cleanly: it was
        // killed, replaced or died; the events file tells which.
        eprintln!("launch: the run finished; processes that did not exit cleanly: {}", failed.join(", "));
    }
    super::print_json(&serde_json::json!({
        "run_dir": args.run_dir.display().to_string(),
        "status": "finished",
        "workers": args.workers,
        "restarts": restarts,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// Whether a process was ended by a signal (kill -9, OOM killer) rather than exiting.
fn killed_by_signal(s: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    s.signal().is_some()
}

fn still_running(p: &mut Proc) -> bool {
    if p.status.is_none()
        && let Ok(Some(s)) = p.child.try_wait()
    {
        p.status = Some(s);
    }
    p.status.is_none()
}

/// Spawn with piped output forwarded line by line, prefixed with the process name.
fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Proc> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        cmd.env(crate::LOG_COLOUR_ENV, "1");
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
    let mut relays = Vec::new();
    if let Some(out) = child.stdout.take() {
        relays.push(forward(name, out));
    }
    if let Some(err) = child.stderr.take() {
        relays.push(forward(name, err));
    }
    Ok(Proc { name: name.to_owned(), child, status: None, relays })
}

fn forward(name: &str, stream: impl Read + Send + 'static) -> std::thread::JoinHandle<()> {
    let prefix = format!("{name:>11} | ");
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{prefix}{line}");
        }
    })
}

/// The coordinator writes its bound address to `coordinator.addr` once it listens.
fn wait_for_address(file: &Path, coordinator: &mut Proc, stop: &AtomicBool) -> anyhow::Result<String> {
    let deadline = Instant::now() + COORDINATOR_START_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            let addr = text.trim();
            if !addr.is_empty() {
                return Ok(addr.to_owned());
            }
        }
        if let Some(s) = coordinator.child.try_wait()? {
            coordinator.status = Some(s);
            coordinator.drain_output();
            bail!("the coordinator exited ({s}) before it listened; its log is above");
        }
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!("the coordinator did not announce its address in {} within {:?}", file.display(), COORDINATOR_START_TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM everything still running, then SIGKILL what is left after the grace period.
fn stop_all(procs: &mut [Proc]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for p in procs.iter_mut() {
        if still_running(p) {
            let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && procs.iter_mut().any(still_running) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in procs.iter_mut() {
        if still_running(p) {
            eprintln!("launch: {} ignored SIGTERM; killing it", p.name);
            let _ = p.child.kill();
            p.status = p.child.wait().ok();
        }
    }
}
