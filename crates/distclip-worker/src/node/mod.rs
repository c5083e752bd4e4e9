//! The worker process: joins the coordinator, runs the step loop of DESIGN.md ("One training
//! step") with the coordinator's quorum and commit votes around each step, streams leased
//! shards through the data loader, and serves its state to peers that heal from it.
//!
//! The step itself (forward, collectives, backward, AdamW) is [`crate::Trainer`]; this module is
//! the wiring: coordinator RPCs, the data-plane ring, the loader and the lease relay.

//!
//! - [`control`]: the coordinator link (connect, calls that ride out a restart, heartbeats);
//! - [`feed`]: each epoch's loader and the lease thread that feeds it;
//! - [`ring`]: a quorum's data-plane ring and the step's collectives over it;
//! - [`heal`]: state from a peer or from the checkpoint the run resumed from;
//! - [`setup`]: the trainer and loader settings built from the run config;
//! - [`rank0`]: checkpoints and evaluation;
//! - [`step_loop`]: the loop around each step; [`retry`]: the one backoff helper.

mod control;
mod feed;
mod heal;
mod rank0;
mod retry;
mod ring;
mod setup;
mod step_loop;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distclip_comm::{CommOptions, PeerServer};
use distclip_config::RunConfig;
use distclip_data::{RetryPolicy, ShardOpener};
use distclip_proto::v1 as pb;

use control::{Heartbeat, Link};
use feed::FeedSource;
use step_loop::{Context, End, StepLoop};

/// How a worker process is started (`distclip worker` flags).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Coordinator URL, e.g. `http://10.0.0.1:7070`.
    pub coordinator: String,
    /// Where the data-plane (peer) service binds.
    pub listen: SocketAddr,
    /// The address peers should dial, when `listen` is a wildcard (`0.0.0.0`).
    pub advertise: Option<String>,
    /// `flex`, `cpu` or `cuda:N`.
    pub device: String,
    /// Compute threads (rayon / libtorch).
    pub threads: Option<usize>,
    /// Decode threads of the data loader.
    pub data_threads: usize,
    /// Run token sent on every RPC.
    pub token: Option<String>,
    /// TLS for the coordinator calls (an `https://` URL) and the data plane; None: plaintext.
    pub tls: Option<distclip_proto::tls::Tls>,
    /// Stable worker id (default: host, pid and a random suffix).
    pub worker_id: Option<String>,
    /// The rank its launcher gave it (see `JoinRequest.rank_hint`), if any.
    pub rank_hint: Option<u32>,
    /// Where rank 0 also writes the final model (`model.safetensors`), besides the final
    /// checkpoint.
    pub save_dir: Option<PathBuf>,
    /// Where rank 0 writes checkpoints, when the coordinator's `RUN/checkpoints` is not
    /// reachable under the same path from this machine.
    pub checkpoint_dir: Option<PathBuf>,
    /// Set (by a SIGTERM handler, say) to leave the run gracefully: the step in flight
    /// finishes, then the worker calls `Leave`, so its leases go back to the pool and the
    /// others form a new quorum at once instead of after the heartbeat timeout.
    pub leave: Arc<AtomicBool>,
}

/// What a finished worker reports.
#[derive(Debug, Clone)]
pub struct WorkerOutcome {
    /// Steps committed.
    pub steps: u64,
    /// Rank in the last quorum.
    pub rank: usize,
    /// Checksum of the final parameters.
    pub params_checksum: String,
    /// The worker left before the run finished, because [`WorkerOptions::leave`] was set.
    pub left: bool,
}

/// Worker failures.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator could not be reached or answered with an error.
    #[error("coordinator {url}: {message}")]
    Coordinator {
        /// Its URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// The run configuration received from the coordinator is unusable here.
    #[error("run configuration: {0}")]
    Config(String),
    /// Model, data or data-plane setup failed.
    #[error("{0}")]
    Setup(String),
}

/// Join the run at `opts.coordinator` and train until the coordinator says it is finished.
pub fn run_worker(opts: WorkerOptions) -> Result<WorkerOutcome, WorkerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("distclip-net")
        .build()
        .map_err(|e| WorkerError::Setup(format!("cannot start the network runtime: {e}")))?;
    let url = opts.coordinator.clone();
    let comm = CommOptions { token: opts.token.clone(), tls: opts.tls.clone(), ..CommOptions::default() };
    let server = rt
        .block_on(PeerServer::bind(opts.listen, comm.clone()))
        .map_err(|e| WorkerError::Setup(format!("data-plane service on {}: {e}", opts.listen)))?;
    let bound = server.local_addr();
    let peer_address = opts.advertise.clone().unwrap_or_else(|| {
        if bound.ip().is_unspecified() { format!("{}:{}", hostname(), bound.port()) } else { bound.to_string() }
    });
    let worker_id = opts.worker_id.clone().unwrap_or_else(|| {
        format!("{}-{}-{:04x}", hostname(), std::process::id(), rand::random::<u16>())
    });
    let mut client = rt.block_on(control::connect(&url, opts.token.as_deref(), opts.tls.as_ref()))?;
    let join_req = pb::JoinRequest {
        worker_id: worker_id.clone(),
        peer_address: peer_address.clone(),
        device: opts.device.clone(),
        threads: opts.threads.unwrap_or(0) as u32,
        step: 0,
        rank_hint: opts.rank_hint,
    };
    let join = rt.block_on(client.join(join_req.clone())).map_err(control::rpc_err(&url, "join"))?.into_inner();
    let config = RunConfig::from_toml(&join.config_toml, Some("the coordinator's run config"))
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    tracing::info!(worker = %worker_id, run = %join.run_id, "joined; data plane at {peer_address}");
    let heartbeat = Heartbeat::spawn(&rt, client.clone(), worker_id.clone(), join.heartbeat_interval_ms);
    let setup = setup::Setup::new(&opts, &config, &join)?;

    let snapshot: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
    {
        let snapshot = snapshot.clone();
        server.set_state_provider(Arc::new(move || {
            snapshot
                .lock()
                .map_err(|_| "state lock poisoned".to_owned())?
                .clone()
                .ok_or_else(|| "this worker has no committed state to share yet".to_owned())
        }));
    }
    let ctx = Context {
        rt: &rt,
        server: &server,
        comm: &comm,
        heartbeat: &heartbeat,
        worker_id: &worker_id,
        leave: &opts.leave,
        feeds: FeedSource {
            list: setup.list,
            opener: ShardOpener::new(RetryPolicy::default()),
            loader: setup.loader,
            client: client.clone(),
            handle: rt.handle().clone(),
            worker_id: worker_id.clone(),
        },
        snapshot,
        accum: config.train.accum_freq.max(1),
        log_every: config.log.every_steps,
    };
    let link = Link::new(client.clone(), url, join_req);
    let mut steps = StepLoop::new(ctx, link, setup.trainer, setup.rank0);
    let end = steps.run()?;

    let left = matches!(end, End::Left);
    heartbeat.set_state(steps.trainer.step(), if left { "leaving" } else { "finished" });
    let outcome = WorkerOutcome {
        steps: steps.trainer.step(),
        rank: steps.rank,
        params_checksum: format!("{:016x}", steps.trainer.checksum()),
        left,
    };
    match end {
        End::Left => {
            let req = pb::LeaveRequest { worker_id: worker_id.clone(), reason: "asked to leave (SIGTERM or SIGINT)".into() };
            match rt.block_on(client.leave(req)) {
                Ok(_) => tracing::info!("left the run; its leases are back in the pool"),
                Err(e) => tracing::warn!("could not tell the coordinator this worker left ({}); it will time out instead", e.message()),
            }
        }
        End::Finished { final_writer, run_state } => {
            if final_writer {
                steps.rank0.at_finish(&rt, &mut client, &worker_id, &steps.trainer, &run_state);
                if let Some(dir) = &opts.save_dir {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| WorkerError::Setup(format!("creating {}: {e}", dir.display())))?;
                    steps
                        .trainer
                        .save_safetensors(&dir.join("model.safetensors"))
                        .map_err(|e| WorkerError::Setup(format!("saving the model in {}: {e}", dir.display())))?;
                }
            }
            let _ = rt.block_on(client.leave(pb::LeaveRequest { worker_id: worker_id.clone(), reason: "run finished".into() }));
        }
    }
    drop(steps);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(outcome)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
