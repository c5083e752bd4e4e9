//! `distclip worker`: one training process. It joins the coordinator, receives the run's
//! configuration from it, and trains until the coordinator says the run is finished.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use distclip_worker::node::{WorkerOptions, run_worker};

/// Arguments of `distclip worker`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Coordinator URL, e.g. `http://10.0.0.1:7070` (`http://` is added when missing).
    #[arg(long)]
    coordinator: String,
    /// Address of this worker's data-plane service (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    /// Address peers dial to reach this worker when `--listen` is a wildcard (default: this
    /// host's name with the bound port).
    #[arg(long)]
    advertise: Option<String>,
    /// `flex` (pure Rust), `cpu` (libtorch) or `cuda:N` (libtorch).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Compute threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Decode threads of the data loader.
    #[arg(long, default_value_t = 2)]
    data_threads: usize,
    /// Run token (also `DISTCLIP_TOKEN`).
    #[arg(long)]
    token: Option<String>,
    /// Stable worker id (default: host, pid and a random suffix).
    #[arg(long)]
    worker_id: Option<String>,
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
    let coordinator = if args.coordinator.contains("://") {
        args.coordinator.clone()
    } else {
        format!("http://{}", args.coordinator)
    };
    let outcome = run_worker(WorkerOptions {
        coordinator,
        listen: args.listen,
        advertise: args.advertise,
        device: args.device,
        threads: args.threads,
        data_threads: args.data_threads,
        token: args.token.or_else(|| std::env::var("DISTCLIP_TOKEN").ok()).filter(|t| !t.is_empty()),
        worker_id: args.worker_id,
        save_dir: args.save_dir,
        checkpoint_dir: args.checkpoint_dir,
    })
    .context("worker failed")?;
    super::print_json(&serde_json::json!({
        "steps": outcome.steps,
        "rank": outcome.rank,
        "params_checksum": outcome.params_checksum,
    }))
}
