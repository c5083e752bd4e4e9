//! The gRPC shell: a thin async layer around [`Machine`]. One mutex holds the machine; every
//! call runs it synchronously, writes what the outbox asks for (state before any answer), and
//! wakes blocked `Quorum`/`Commit` calls through a watch channel. A background task ticks the
//! machine (expiry, timeouts) and ends the run when it is finished and every worker has left.

use crate::dataset::samples_from_sizes;
use crate::error::CoordinatorError;
use crate::ledger::ShardInfo;
use crate::machine::{Machine, MachineConfig, MachineError, Phase};
use crate::journal::Journal;
use crate::persist::RunDir;
use crate::progress::Progress;
use distclip_config::RunConfig;
use distclip_proto::v1::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use distclip_proto::v1::{
    CommitRequest, CommitResponse, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse,
    LeaseRequest, LeaseResponse, LeaveRequest, LeaveResponse, QuorumRequest, QuorumResponse,
    RecordRequest, RecordResponse, RunStatus, StatusRequest,
};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

/// Largest control-plane message accepted or sent. Commits carry every consumed position of a
/// batch, and a shard report every skipped index: far above tonic's 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// The resolved run configuration.
    pub config: RunConfig,
    /// The expanded dataset spec (`data.train`), in spec order: a shard's index here is its
    /// identity in leases and sample positions. Expand it with `distclip_data::ShardList`.
    pub shards: Vec<ShardInfo>,
    /// The run directory (created if missing; resumed if it holds `state.json`).
    pub run_dir: PathBuf,
    /// Address to listen on, e.g. `0.0.0.0:7070`, or `127.0.0.1:0` for a free port.
    pub listen: String,
    /// Address of the HTTP endpoint (`GET /metrics`, `GET /healthz`), e.g. `0.0.0.0:7071`;
    /// port 0 picks a free one (written to `RUN_DIR/coordinator.http`). None: no HTTP.
    pub http_listen: Option<String>,
    /// Run token every RPC must carry as `authorization: Bearer <token>`; None: no check.
    pub token: Option<String>,
    /// After the run finished (or failed), how long to wait for workers to leave before
    /// exiting anyway. None: twice the heartbeat timeout, at least 5 s.
    pub exit_grace: Option<Duration>,
    /// How often the background task expires members and checks timeouts.
    pub tick: Duration,
    /// Resume from a checkpoint: `latest` (the newest good one in `RUN/checkpoints`) or a
    /// checkpoint directory. The run state comes from the checkpoint, not `state.json`, and
    /// workers load its weights and optimizer state.
    pub resume: Option<String>,
    /// TLS on the gRPC port (mutual when the settings say so); None: plaintext. The HTTP
    /// endpoint stays plaintext: it serves metrics and status, not the run.
    pub tls: Option<distclip_proto::tls::Tls>,
    /// After the run ends, keep serving (status page, metrics, health, the outcome to workers
    /// that come late) until `shutdown`, instead of exiting once the workers have left: what a
    /// Kubernetes Deployment needs, whose pod would otherwise be restarted.
    pub keep_serving: bool,
}

impl CoordinatorOptions {
    /// Options with defaults: listen on `127.0.0.1:0`, no HTTP endpoint, no token.
    pub fn new(config: RunConfig, shards: Vec<ShardInfo>, run_dir: impl Into<PathBuf>) -> Self {
        Self {
            config,
            shards,
            run_dir: run_dir.into(),
            listen: "127.0.0.1:0".into(),
            http_listen: None,
            token: None,
            exit_grace: None,
            tick: Duration::from_millis(100),
            resume: None,
            tls: None,
            keep_serving: false,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// The run's id.
    pub run_id: String,
    /// "finished", "failed", or "waiting"/"training" when stopped by the shutdown signal.
    pub state: String,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Steps committed.
    pub step: u64,
    /// The epoch it ended in.
    pub epoch: u64,
    /// Samples committed over the run.
    pub samples_seen: u64,
}

impl RunOutcome {
    /// Whether the run completed.
    pub fn finished(&self) -> bool {
        self.state == "finished"
    }
}

struct Shared {
    machine: Mutex<Machine>,
    changed: watch::Sender<u64>,
    dir: RunDir,
    /// The run state on disk; locked only while `machine` is.
    journal: Mutex<Journal>,
    token: Option<String>,
    closing: AtomicBool,
    wait_limit: Duration,
    progress: Mutex<Progress>,
    /// Curves and latest events for the status page.
    recent: Mutex<crate::status::Recent>,
    latency: crate::metrics::Latency,
    /// `RUN/tensorboard/` event file, with `log.report_to = ["tensorboard"]`.
    tensorboard: Option<Mutex<crate::tensorboard::EventFile>>,
    /// Wakes the remote sync (`log.remote_sync`) when a checkpoint is written.
    sync_now: Option<Arc<tokio::sync::Notify>>,
}

impl Shared {
    /// Run `f` on the machine, then perform its side effects before anyone sees the result:
    /// persist state, append events and metrics, write audits, wake waiters.
    fn with<R>(&self, f: impl FnOnce(&mut Machine, Instant) -> R) -> R {
        let mut m = self.machine.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut m, Instant::now());
        self.flush(&mut m);
        out
    }

    fn flush(&self, m: &mut Machine) {
        // Twice at most: a failed state write fails the run, which is itself an outbox entry.
        for _ in 0..2 {
            let mut out = m.take_outbox();
            for (epoch, audit) in &out.audits {
                if let Err(e) = self.dir.write_audit(*epoch, audit) {
                    tracing::error!("{e}");
                }
            }
            if let Some(step) = out.rewind_metrics
                && let Err(e) = self.dir.truncate_metrics(step)
            {
                tracing::error!("{e}");
            }
            if let Err(e) = self.dir.append_metrics(&mut out.metrics) {
                tracing::error!("{e}");
            }
            if let Some(tb) = &self.tensorboard
                && let Ok(mut tb) = tb.lock()
                && let Err(e) = tb.write_metrics(out.metrics.iter().map(|l| &l.fields), crate::persist::unix_time())
            {
                tracing::error!("appending to {}: {e}", tb.path().display());
            }
            if let Ok(mut p) = self.progress.lock() {
                let now = Instant::now();
                for line in out.metrics.iter().filter_map(|m| p.observe(&m.fields, now)) {
                    tracing::info!(target: "distclip::progress", "{line}");
                }
            }
            if let Some(now) = &self.sync_now
                && out.events.iter().any(|e| e.kind == "checkpoint")
            {
                now.notify_one();
            }
            for ev in &out.events {
                log_event(ev);
            }
            if let Ok(mut r) = self.recent.lock() {
                if let Some(step) = out.rewind_metrics {
                    r.rewind(step);
                }
                out.metrics.iter().for_each(|l| r.metrics_line(&l.fields));
                let time = crate::persist::unix_time();
                out.events.iter().for_each(|e| r.event(e.line(time)));
            }
            if let Err(e) = self.dir.append_events(&out.events) {
                tracing::error!("{e}");
            }
            let mut failed = false;
            if out.state_changed
                && let Err(e) = self.persist(m)
            {
                tracing::error!("{e}");
                // A commit that is not on disk must not be acknowledged as durable.
                m.fail_external(format!("{e}"));
                failed = true;
            }
            // Blocked calls poll again only when an answer may have changed: with a thousand
            // members, waking all of them on every request would cost a million polls a step.
            if m.generation() != *self.changed.borrow() {
                self.changed.send_replace(m.generation());
            }
            if !failed {
                break;
            }
        }
    }

    /// Write the state's changes to the journal; a snapshot when the segment is due for one
    /// (in the background) or the run has ended (now, so `state.json` tells the outcome).
    fn persist(&self, m: &mut Machine) -> Result<(), CoordinatorError> {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        // Taken on every path, a snapshot's too: the next journal line starts from this point.
        let changes = m.take_changes();
        if matches!(m.phase(), Phase::Finished | Phase::Failed(_)) {
            journal.snapshot_now(&m.snapshot())
        } else if journal.wants_snapshot() {
            journal.snapshot_in_background(m.snapshot())
        } else {
            journal.append(&changes)
        }
    }

    fn read<R>(&self, f: impl FnOnce(&Machine) -> R) -> R {
        let m = self.machine.lock().unwrap_or_else(|e| e.into_inner());
        f(&m)
    }

    fn authorize<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let Err(refusal) = distclip_proto::auth::check(req.metadata(), token) else {
            return Ok(());
        };
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let reason = refusal.as_str();
        // Never log the presented token: it may be a near-miss of the real one.
        tracing::warn!(rpc, peer, reason, "refused a call without the run token");
        let ev = crate::machine::Event {
            kind: "auth_refused",
            fields: serde_json::json!({"rpc": rpc, "peer": peer, "reason": reason})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        };
        let _ = self.dir.append_events(&[ev]);
        Err(Status::unauthenticated(
            "missing or wrong run token: send the run's token as `authorization: Bearer <token>`",
        ))
    }

    /// Wait until `poll` answers, the run closes, or the wait limit passes.
    async fn wait_for<R>(
        &self,
        mut poll: impl FnMut(&Machine) -> Result<Option<R>, MachineError>,
    ) -> Result<R, Status> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.wait_limit;
        loop {
            if let Some(r) = self.read(&mut poll).map_err(to_status)? {
                return Ok(r);
            }
            if self.closing.load(Ordering::SeqCst) {
                return Err(Status::unavailable(
                    "the coordinator is shutting down: reconnect and join again",
                ));
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("the coordinator is shutting down")),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "no answer within {} s: ask again",
                        self.wait_limit.as_secs()
                    )));
                }
            }
        }
    }
}

fn log_event(ev: &crate::machine::Event) {
    let fields = serde_json::Value::Object(ev.fields.clone());
    match ev.kind {
        "failed" | "commit_refused" | "failed_shard" | "checksum_mismatch" | "ledger_conflict" => {
            tracing::warn!(kind = ev.kind, %fields, "event")
        }
        _ => tracing::info!(kind = ev.kind, %fields, "event"),
    }
}

fn to_status(e: MachineError) -> Status {
    use crate::membership::JoinError;
    match e {
        MachineError::UnknownWorker(_) => Status::not_found(e.to_string()),
        MachineError::Join(JoinError::Full { .. }) => Status::resource_exhausted(e.to_string()),
        MachineError::Join(JoinError::EmptyId) => Status::invalid_argument(e.to_string()),
        MachineError::RunFailed(_) => Status::failed_precondition(e.to_string()),
        MachineError::Superseded(_) => Status::cancelled(e.to_string()),
    }
}

/// The tonic service.
#[derive(Clone)]
struct Service(Arc<Shared>);

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.0.authorize(&request, "Join")?;
        let req = request.into_inner();
        self.0
            .with(|m, now| m.join(&req, now))
            .map(Response::new)
            .map_err(to_status)
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.0.authorize(&request, "Heartbeat")?;
        let req = request.into_inner();
        // Heartbeats change nothing another call waits for: no flush needed.
        let mut m = self.0.machine.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Response::new(m.heartbeat(&req, Instant::now())))
    }

    async fn quorum(
        &self,
        request: Request<QuorumRequest>,
    ) -> Result<Response<QuorumResponse>, Status> {
        self.0.authorize(&request, "Quorum")?;
        let req = request.into_inner();
        let ticket = self
            .0
            .with(|m, now| m.request_quorum(&req, now))
            .map_err(to_status)?;
        let id = req.worker_id;
        self.0
            .wait_for(|m| m.poll_quorum(&id, ticket))
            .await
            .map(Response::new)
    }

    async fn lease(
        &self,
        request: Request<LeaseRequest>,
    ) -> Result<Response<LeaseResponse>, Status> {
        self.0.authorize(&request, "Lease")?;
        let req = request.into_inner();
        self.0
            .with(|m, now| m.lease(&req, now))
            .map(Response::new)
            .map_err(to_status)
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        self.0.authorize(&request, "Commit")?;
        let req = request.into_inner();
        let key = (req.quorum_id, req.step);
        let worker = req.worker_id.clone();
        // `now` is taken once the lock is held: the time is the work, not the wait for it.
        let (decided, locked) = self.0.with(|m, now| (m.vote(req, now), now));
        if let Some(d) = decided {
            // This vote decided (or repeated a decided one): what a commit costs, the journal's
            // fsync included.
            self.0.latency.commit.observe(locked.elapsed().as_secs_f64());
            return Ok(Response::new(d));
        }
        self.0
            .wait_for(|m| Ok(m.poll_commit(key.0, key.1, &worker)))
            .await
            .map(Response::new)
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        self.0.authorize(&request, "Leave")?;
        let req = request.into_inner();
        self.0.with(|m, now| m.leave(&req, now));
        Ok(Response::new(LeaveResponse {}))
    }

    async fn record(
        &self,
        request: Request<RecordRequest>,
    ) -> Result<Response<RecordResponse>, Status> {
        self.0.authorize(&request, "Record")?;
        let req = request.into_inner();
        self.0.with(|m, _| m.record(&req));
        Ok(Response::new(RecordResponse {}))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<RunStatus>, Status> {
        self.0.authorize(&request, "Status")?;
        Ok(Response::new(self.0.read(|m| m.status(Instant::now()))))
    }
}

/// A coordinator bound to its address, ready to [`Coordinator::run`].
pub struct Coordinator {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    http: Option<crate::http::HttpListener>,
    tick: Duration,
    exit_grace: Duration,
    tls: Option<distclip_proto::tls::Tls>,
    keep_serving: bool,
    /// The remote copy of the run directory, started with the run.
    remote: Option<(distclip_data::remote_sync::RemoteSync, Duration)>,
}

fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "run-{:012x}",
        (nanos as u64) ^ ((std::process::id() as u64) << 40)
    )
}

impl Coordinator {
    /// Expand the dataset, open (or resume) the run directory, write `config.toml`, and bind
    /// the listen addresses. Writes `coordinator.http` and then `coordinator.addr` with the
    /// actual addresses.
    pub async fn bind(opts: CoordinatorOptions) -> Result<Self, CoordinatorError> {
        let config = opts.config;
        let shards = opts.shards;
        if shards.is_empty() {
            return Err(CoordinatorError::NoData);
        }
        let sizes = if config.data.samples_per_epoch.is_none() {
            samples_from_sizes(&shards)
        } else {
            None
        };
        let cfg = MachineConfig::from_run(&config, sizes);
        if cfg.resampled && cfg.max_steps.is_none() && cfg.samples_per_epoch.is_none() {
            return Err(CoordinatorError::ResampledWithoutEnd);
        }
        let dir = RunDir::create(&opts.run_dir)?;
        let toml = config.to_toml();
        let now = Instant::now();
        // A remote that cannot be used is refused before any worker starts.
        let remote = match &config.log.remote_sync {
            Some(url) => Some((
                distclip_data::remote_sync::RemoteSync::new(url, &[]).map_err(|e| CoordinatorError::Remote(e.to_string()))?,
                Duration::from_secs(config.log.remote_sync_frequency_s),
            )),
            None => None,
        };
        let sync_now = remote.as_ref().map(|_| Arc::new(tokio::sync::Notify::new()));
        let checkpoints = dir.checkpoints_path();
        let (machine, resume_from) = match &opts.resume {
            Some(spec) => {
                let (saved, from) = crate::resume::from_checkpoint(&dir, spec)?;
                let path = from.clone();
                let m = Machine::resume(cfg.clone(), toml.clone(), shards, saved, now)
                    .map_err(|message| CoordinatorError::State { path, message })?;
                (m, from.display().to_string())
            }
            None => match dir.load_state()? {
                Some(saved) => {
                    let m = Machine::resume(cfg.clone(), toml.clone(), shards, saved, now).map_err(
                        |message| CoordinatorError::State {
                            path: dir.state_path(),
                            message,
                        },
                    )?;
                    // metrics.jsonl is appended before state.json is written: a coordinator
                    // killed in between left a line for a step that will run again.
                    dir.truncate_metrics(m.step())?;
                    (m, String::new())
                }
                None => (Machine::new(cfg.clone(), toml.clone(), new_run_id(), shards, now), String::new()),
            },
        };
        let mut machine = machine;
        machine.set_checkpoints(checkpoints.display().to_string(), resume_from);
        dir.write_config(&toml)?;
        // The state is on disk from the start, so a restart right away resumes this run id; the
        // journal's lines start from this snapshot.
        machine.take_changes();
        let journal = Journal::open(&dir, &machine.snapshot())?;
        let listener = tokio::net::TcpListener::bind(&opts.listen)
            .await
            .map_err(|e| CoordinatorError::Bind {
                addr: opts.listen.clone(),
                message: e.to_string(),
            })?;
        let addr = listener.local_addr().map_err(|e| CoordinatorError::Bind {
            addr: opts.listen.clone(),
            message: e.to_string(),
        })?;
        // Before coordinator.addr, which launchers wait for: both are there when it is.
        let http = crate::http::bind(opts.http_listen.as_deref(), &dir).await?;
        dir.write_addr(&addr.to_string())?;
        let wait_limit = cfg.join_timeout + cfg.step_timeout + cfg.heartbeat_timeout;
        let tensorboard = if config.log.report_to.iter().any(|r| r == "tensorboard") {
            let folder = dir.root().join("tensorboard");
            let file = crate::tensorboard::EventFile::create(&folder, crate::persist::unix_time())
                .map_err(|source| CoordinatorError::Io { action: "create", path: folder, source })?;
            tracing::info!(path = %file.path().display(), "writing TensorBoard events");
            Some(Mutex::new(file))
        } else {
            None
        };
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            machine: Mutex::new(machine),
            changed,
            dir,
            journal: Mutex::new(journal),
            token: opts.token.filter(|t| !t.is_empty()),
            closing: AtomicBool::new(false),
            wait_limit,
            progress: Mutex::new(Progress::new(cfg.total_steps, cfg.epochs, config.log.every_steps)),
            recent: Mutex::new(crate::status::Recent::default()),
            latency: Default::default(),
            tensorboard,
            sync_now,
        });
        // A restarted coordinator's page starts with the run's history, not a blank.
        if let Ok(mut r) = shared.recent.lock() {
            let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
            r.seed(&read(shared.dir.metrics_path()), &read(shared.dir.events_path()));
        }
        // Events of the start (resume, say) reach events.jsonl before any answer.
        shared.with(|_, _| ());
        let exit_grace = opts
            .exit_grace
            .unwrap_or((cfg.heartbeat_timeout * 2).max(Duration::from_secs(5)));
        Ok(Self {
            listener,
            addr,
            shared,
            http,
            tick: opts.tick.max(Duration::from_millis(1)),
            exit_grace,
            tls: opts.tls,
            keep_serving: opts.keep_serving,
            remote,
        })
    }

    /// The address actually listened on (the port, when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the HTTP endpoint (`/metrics`), if it has one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|h| h.local_addr())
    }

    /// The run's id.
    pub fn run_id(&self) -> String {
        self.shared.read(|m| m.run_id().to_string())
    }

    /// Serve until the run is finished (or failed) and every worker has left (or the exit
    /// grace passed), or until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunOutcome, CoordinatorError> {
        let shared = self.shared.clone();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<CoordinatorServer<Service>>().await;
        let svc = CoordinatorServer::new(Service(shared.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let http = self.http.map(|l| crate::http::spawn(l, shared.clone()));
        let syncer = match (self.remote, &shared.sync_now) {
            (Some((sync, every)), Some(wake)) => {
                Some(crate::remote::Syncer::spawn(sync, shared.dir.root().to_path_buf(), every, wake.clone()))
            }
            _ => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(self.listener);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            builder = builder.tls_config(tls.server_config()).map_err(|e| CoordinatorError::Bind {
                addr: self.addr.to_string(),
                message: format!("TLS settings refused: {}", distclip_proto::tls::error_chain(&e)),
            })?;
        }
        let server = tokio::spawn(
            builder
                .add_service(health)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                }),
        );

        let ticker = {
            let shared = shared.clone();
            let reporter = reporter.clone();
            let (tick, grace, keep_serving) = (self.tick, self.exit_grace, self.keep_serving);
            async move {
                let mut interval = tokio::time::interval(tick);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut ended_at: Option<Instant> = None;
                let mut reported_failure = false;
                loop {
                    interval.tick().await;
                    let (done, ended, failed) = shared.with(|m, now| {
                        m.tick(now);
                        let ended = matches!(m.phase(), Phase::Finished | Phase::Failed(_));
                        (m.is_done(), ended, matches!(m.phase(), Phase::Failed(_)))
                    });
                    if failed && !reported_failure {
                        reported_failure = true;
                        reporter
                            .set_not_serving::<CoordinatorServer<Service>>()
                            .await;
                        reporter
                            .set_service_status("", ServingStatus::NotServing)
                            .await;
                    }
                    if ended && !keep_serving {
                        let at = *ended_at.get_or_insert_with(Instant::now);
                        if done || at.elapsed() > grace {
                            return;
                        }
                    }
                }
            }
        };

        let mut server = server;
        let server_error = tokio::select! {
            _ = ticker => None,
            _ = shutdown => None,
            r = &mut server => Some(r),
        };
        shared.closing.store(true, Ordering::SeqCst);
        shared.changed.send_modify(|g| *g = g.wrapping_add(1));
        let _ = stop_tx.send(());
        if let Some(http) = http {
            http.stop().await;
        }
        match server_error {
            Some(Ok(Ok(()))) | None => {}
            Some(Ok(Err(e))) => return Err(CoordinatorError::Transport(e)),
            Some(Err(join)) => {
                return Err(CoordinatorError::Bind {
                    addr: self.addr.to_string(),
                    message: format!("server task ended: {join}"),
                });
            }
        }
        // Blocked calls were woken above; do not wait long for stragglers' connections.
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        if let Some(syncer) = syncer {
            syncer.finish().await;
        }
        Ok(shared.read(|m| RunOutcome {
            run_id: m.run_id().to_string(),
            state: m.phase().name().to_string(),
            error: match m.phase() {
                Phase::Failed(e) => Some(e.clone()),
                _ => None,
            },
            step: m.step(),
            epoch: m.epoch(),
            samples_seen: m.samples_seen(),
        }))
    }
}

/// Bind and run: the whole coordinator in one call. The actual address is written to
/// `RUN_DIR/coordinator.addr`.
pub async fn serve(
    opts: CoordinatorOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<RunOutcome, CoordinatorError> {
    Coordinator::bind(opts).await?.run(shutdown).await
}

/// The HTTP endpoint reads the same machine, under the same lock.
impl crate::http::MachineView for Shared {
    fn with_machine<R>(&self, f: impl FnOnce(&Machine) -> R) -> R {
        self.read(f)
    }

    fn status(&self) -> serde_json::Value {
        let metrics = self.read(|m| m.metrics(Instant::now()));
        let (eta, rate) = match self.progress.lock() {
            Ok(p) => (p.eta_seconds(metrics.step), p.samples_per_second()),
            Err(_) => (None, None),
        };
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        crate::status::status_json(&metrics, &recent, eta, rate)
    }

    fn latency(&self) -> Option<crate::metrics::Latency> {
        Some(self.latency.clone())
    }
}
