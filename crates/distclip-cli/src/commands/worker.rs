//! `distclip worker`: one training process. It joins the coordinator, receives the run's
//! configuration from it, and trains until the coordinator says the run is finished. SIGTERM
//! or SIGINT (Kubernetes, Slurm, `docker stop`, Ctrl-C) makes it leave gracefully after the step
//! in flight.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::Context;
use distclip_worker::node::{WorkerOptions, run_worker};

use super::cluster_env::ClusterEnv;

/// Arguments of `distclip worker`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Coordinator URL, e.g. `http://10.0.0.1:7070` (`http://`, or `https://` under TLS, is
    /// added when missing). Default: `DISTCLIP_COORDINATOR`, else `MASTER_ADDR:MASTER_PORT`
    /// (torchrun, Kubeflow; port 7070 without MASTER_PORT).
    #[arg(long, env = "DISTCLIP_COORDINATOR")]
    coordinator: Option<String>,
    /// Address of this worker's data-plane service (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    /// Address peers dial to reach this worker when `--listen` is a wildcard (default: this
    /// host's name with the bound port).
    #[arg(long)]
    advertise: Option<String>,
    /// `flex` (pure Rust), `cpu` (libtorch) or `cuda:N` (libtorch); `cuda` alone is the GPU
    /// of this process's local rank (LOCAL_RANK, SLURM_LOCALID; 0 without one).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Compute threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Decode threads of the data loader.
    #[arg(long, default_value_t = 2)]
    data_threads: usize,
    /// Run token (also `DISTCLIP_TOKEN`).
    #[arg(long, env = "DISTCLIP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the run token from this file (first line) instead.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// TLS for the coordinator calls and the data plane.
    #[command(flatten)]
    tls: super::security::TlsArgs,
    /// Stable worker id (default: host, pid and a random suffix).
    #[arg(long)]
    worker_id: Option<String>,
    /// Rank hint: workers with hints take ranks in hint order. Default: RANK, SLURM_PROCID,
    /// JOB_COMPLETION_INDEX (Kubernetes Indexed Job), OMPI_COMM_WORLD_RANK or PMI_RANK.
    #[arg(long)]
    rank: Option<u32>,
    /// Where rank 0 also writes the final model as `model.safetensors` (the final checkpoint
    /// is in the run directory's checkpoints/final either way).
    #[arg(long)]
    save_dir: Option<PathBuf>,
    /// Where rank 0 writes checkpoints, if the coordinator's RUN_DIR/checkpoints is not
    /// reachable under the same path here; resuming reads from the coordinator's path.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
}

/// Run the worker until the run finishes.
pub fn run(args: Args) -> anyhow::Result<()> {
    super::set_threads(args.threads)?;
    let tls = args.tls.load()?;
    let env = ClusterEnv::read(|k| std::env::var(k).ok())?;
    let given = match (&args.coordinator, &env.coordinator) {
        (Some(c), _) => c.clone(),
        (None, Some((c, var))) => {
            tracing::info!("coordinator {c} from {var}");
            c.clone()
        }
        (None, None) => anyhow::bail!(
            "no coordinator: pass --coordinator HOST:PORT, or set DISTCLIP_COORDINATOR, or MASTER_ADDR (and MASTER_PORT)"
        ),
    };
    let coordinator = if given.contains("://") {
        given
    } else if tls.is_some() {
        format!("https://{given}")
    } else {
        format!("http://{given}")
    };
    let rank_hint = args.rank.or(env.rank.map(|(r, _)| r));
    if let (Some((n, var)), None) = (env.world_size, args.rank) {
        tracing::info!("{var}={n}: the coordinator decides the world size (cluster.min_workers, elastic membership)");
    }
    let device = if args.device == "cuda" {
        format!("cuda:{}", env.local_rank.map_or(0, |(r, _)| r))
    } else {
        args.device
    };
    let leave = leave_on_signal()?;
    let outcome = run_worker(WorkerOptions {
        coordinator,
        listen: args.listen,
        advertise: args.advertise,
        device,
        threads: args.threads,
        data_threads: args.data_threads,
        token: super::security::token(args.token, args.token_file.as_deref())?,
        tls,
        worker_id: args.worker_id,
        rank_hint,
        save_dir: args.save_dir,
        checkpoint_dir: args.checkpoint_dir,
        leave: leave.flag.clone(),
    })
    .context("worker failed")?;
    super::print_json(&serde_json::json!({
        "steps": outcome.steps,
        "rank": outcome.rank,
        "params_checksum": outcome.params_checksum,
        "left": outcome.left,
    }))?;
    if outcome.left {
        // What a process ended by the signal reports (143 for SIGTERM, 130 for Ctrl-C), so
        // supervisors do not count it as a worker that finished the run.
        std::process::exit(128 + leave.signal.load(Ordering::Relaxed));
    }
    Ok(())
}

/// The first SIGTERM or SIGINT (Kubernetes, Slurm, `docker stop`, Ctrl-C) asks the worker to
/// leave gracefully; a second one ends the process at once (a supervisor that will not wait).
struct LeaveOnSignal {
    /// Set by the first signal; read by the worker between steps.
    flag: Arc<AtomicBool>,
    /// Its number (15 or 2), for the exit code.
    signal: Arc<AtomicI32>,
}

/// Install the handlers before the worker starts, so that no signal falls on the default action
/// (an abrupt exit) in between.
fn leave_on_signal() -> anyhow::Result<LeaveOnSignal> {
    use tokio::signal::unix::{SignalKind, signal};
    let leave = LeaveOnSignal { flag: Arc::new(AtomicBool::new(false)), signal: Arc::new(AtomicI32::new(0)) };
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().context("signal runtime")?;
    let (mut term, mut int) = rt
        .block_on(async { Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)) })
        .context("installing the SIGTERM and SIGINT handlers")?;
    let (flag, number) = (leave.flag.clone(), leave.signal.clone());
    std::thread::Builder::new()
        .name("distclip-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut next = async || tokio::select! {
                    _ = term.recv() => ("SIGTERM", 15),
                    _ = int.recv() => ("SIGINT", 2),
                };
                let (name, n) = next().await;
                number.store(n, Ordering::Relaxed);
                flag.store(true, Ordering::Relaxed);
                tracing::warn!("{name}: leaving the run after the step in flight (send it again to stop at once)");
                let (name, _) = next().await;
                eprintln!("second signal ({name}): stopping now");
                std::process::exit(128 + n);
            })
        })
        .context("starting the signal thread")?;
    Ok(leave)
}
