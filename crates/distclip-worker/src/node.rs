//! The worker process: joins the coordinator, runs the step loop of DESIGN.md ("One training
//! step") with the coordinator's quorum and commit votes around each step, streams leased
//! shards through the data loader, and serves its state to peers that heal from it.
//!
//! The step itself (forward, collectives, backward, AdamW) is [`crate::Trainer`]; this module is
//! the wiring: coordinator RPCs, the data-plane ring, the loader and the lease relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use distclip_comm::{CommOptions, Group, GroupSpec, PeerServer};
use distclip_config::{Augment, RunConfig};
use distclip_data::loader::ShardSummary;
use distclip_data::{
    Augment as DataAugment, Batch, CaptionKey, Loader, LoaderConfig, Order, RetryPolicy, ShardList, ShardOpener,
    ShardTask, TransformConfig,
};
use distclip_model::ClipConfig;
use distclip_model::checkpoint::{load_state_dict, read_state_dict};
use distclip_model::device::parse_device;
use distclip_eval::{EvalOptions, Suite};
use burn::tensor::Device;
use distclip_proto::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::{Collective, CollectiveError, LocalBatch, OptimConfig, StepError, Trainer};

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

type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// Adds the run token to every control-plane call.
#[derive(Clone)]
struct TokenInterceptor(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(distclip_proto::auth::HEADER, v.clone());
        }
        Ok(req)
    }
}

/// How long a worker keeps trying to reach the coordinator before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

async fn connect(
    url: &str,
    token: Option<&str>,
    tls: Option<&distclip_proto::tls::Tls>,
) -> Result<Client, WorkerError> {
    let err = |message: String| WorkerError::Coordinator { url: url.to_owned(), message };
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| err(format!("not a valid URL ({e}); pass e.g. http://host:port")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    match (tls, endpoint.uri().scheme_str()) {
        (Some(tls), Some("https")) => {
            let host = endpoint.uri().host().unwrap_or_default().to_owned();
            endpoint = endpoint
                .tls_config(tls.client_config(&host))
                .map_err(|e| err(format!("TLS settings: {}", distclip_proto::tls::error_chain(&e))))?;
        }
        (Some(_), _) => return Err(err("TLS is on, so the coordinator URL must start with https://".into())),
        (None, Some("https")) => {
            return Err(err("an https:// URL needs TLS settings (--tls-ca, --tls-cert, --tls-key)".into()));
        }
        (None, _) => {}
    }
    let header = token
        .map(|t| distclip_proto::auth::bearer(t).map_err(err))
        .transpose()?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut backoff = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(CoordinatorClient::with_interceptor(ch, TokenInterceptor(header))
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20));
            }
            Err(e) if distclip_proto::tls::is_tls_refusal(&e) => {
                return Err(err(format!(
                    "the TLS handshake failed ({}); check that --tls-ca signed the coordinator's certificate and that it names the host dialled (or --tls-server-name)",
                    distclip_proto::tls::error_chain(&e)
                )));
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("coordinator {url} not reachable yet ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(err(format!(
                    "unreachable for {CONNECT_TIMEOUT:?} ({}); check the address and that the coordinator runs",
                    distclip_proto::tls::error_chain(&e)
                )));
            }
        }
    }
}

/// The loader of one epoch plus the relay thread that leases shards for it just in time: the
/// relay holds at most one leased shard that no decode thread has taken yet (a rendezvous
/// channel), so a worker never sits on shards it is not reading.
struct Feed {
    epoch: u64,
    loader: Loader,
    ended: bool,
    stop: Arc<AtomicBool>,
}

impl Feed {
    fn start(
        epoch: u64,
        list: Arc<ShardList>,
        opener: ShardOpener,
        mut cfg: LoaderConfig,
        client: Client,
        handle: tokio::runtime::Handle,
        worker_id: String,
    ) -> Result<Feed, WorkerError> {
        let (tx, rx) = crossbeam_channel::bounded::<ShardTask>(0);
        let stop = Arc::new(AtomicBool::new(false));
        cfg.epoch = epoch;
        cfg.order = Order::Feed(rx);
        let loader = Loader::new(list, opener, cfg)
            .map_err(|e| WorkerError::Setup(format!("data loader: {e}")))?;
        let relay_stop = stop.clone();
        std::thread::Builder::new()
            .name("distclip-lease".into())
            .spawn(move || relay(epoch, client, handle, worker_id, tx, relay_stop))
            .map_err(|e| WorkerError::Setup(format!("cannot start the lease thread: {e}")))?;
        Ok(Feed { epoch, loader, ended: false, stop })
    }

    /// The next batch, or `None` once every leased shard is read and no more will come.
    fn next_batch(&mut self) -> Result<Option<Batch>, WorkerError> {
        if self.ended {
            return Ok(None);
        }
        match self.loader.next() {
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(WorkerError::Setup(format!("data loader: {e}"))),
            None => {
                self.ended = true;
                Ok(None)
            }
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Lease one shard at a time and hand it to whichever decode thread asks first. Ends (closing
/// the channel, which lets the loader finish) when the coordinator says the epoch has no
/// unleased shard left, or when the loader is gone.
fn relay(
    epoch: u64,
    mut client: Client,
    handle: tokio::runtime::Handle,
    worker_id: String,
    tx: crossbeam_channel::Sender<ShardTask>,
    stop: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(50);
    // Until the first answer, ask the coordinator to take back what it thinks this worker
    // holds: an earlier feed of this worker may have been dropped with shards half read.
    let mut fresh = true;
    while !stop.load(Ordering::SeqCst) {
        let req = pb::LeaseRequest { worker_id: worker_id.clone(), epoch, want: 1, shard_reports: vec![], fresh };
        match handle.block_on(client.lease(req)) {
            Ok(resp) => {
                fresh = false;
                let resp = resp.into_inner();
                if resp.leases.is_empty() {
                    if resp.exhausted {
                        return;
                    }
                    // At the lease cap: shards come back as this worker reports its own.
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
                backoff = Duration::from_millis(50);
                for l in resp.leases {
                    let task = ShardTask {
                        shard: l.shard as usize,
                        start: 0,
                        skip: l.skip.iter().map(|r| r.start..r.end).collect(),
                    };
                    if tx.send(task).is_err() {
                        return; // the loader was dropped (epoch over, or shutdown)
                    }
                }
            }
            Err(status) => {
                tracing::warn!("lease request failed: {}; retrying", status.message());
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The step's collectives over the data-plane ring.
struct Ring<'a> {
    group: &'a Group,
    handle: &'a tokio::runtime::Handle,
    /// Seconds spent in collectives, for the step's metrics.
    comm_s: f64,
}

impl Ring<'_> {
    fn timed<T>(&mut self, f: impl FnOnce(&Group, &tokio::runtime::Handle) -> T) -> T {
        let t = Instant::now();
        let out = f(self.group, self.handle);
        self.comm_s += t.elapsed().as_secs_f64();
        out
    }
}

impl Collective for Ring<'_> {
    fn rank(&self) -> usize {
        self.group.rank()
    }
    fn world_size(&self) -> usize {
        self.group.world_size()
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        self.timed(|g, h| h.block_on(g.all_gather(local)))
            .map_err(|e| CollectiveError::Transport(Box::new(e)))
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.timed(|g, h| h.block_on(g.all_reduce_sum(buf)))
            .map_err(|e| CollectiveError::Transport(Box::new(e)))
    }
}

/// How long a worker rides out a coordinator it cannot reach (a restart) before it gives up.
const COORDINATOR_OUTAGE: Duration = Duration::from_secs(120);

/// The step loop's calls to the coordinator, riding out a coordinator restart: a call that
/// finds it unreachable is retried with backoff, and when the restarted coordinator no longer
/// knows this worker (NOT_FOUND: it resumed from `state.json` without its members) the worker
/// joins again with its current step and repeats the call.
struct Link {
    client: Client,
    url: String,
    join: pb::JoinRequest,
    rejoined: bool,
}

impl Link {
    /// Whether a call joined a restarted coordinator since the last time this was asked.
    fn take_rejoined(&mut self) -> bool {
        std::mem::take(&mut self.rejoined)
    }

    fn call<T, Fut>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        what: &str,
        step: u64,
        f: impl Fn(Client) -> Fut,
    ) -> Result<T, WorkerError>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + COORDINATOR_OUTAGE;
        let mut backoff = Duration::from_millis(100);
        let mut rejoin = false;
        loop {
            let result = if rejoin {
                let req = pb::JoinRequest { step, ..self.join.clone() };
                rt.block_on(self.client.join(req)).map(|_| {
                    tracing::info!(step, "joined the restarted coordinator again");
                    rejoin = false;
                    self.rejoined = true;
                })
            } else {
                match rt.block_on(f(self.client.clone())) {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(s) => Err(s),
                }
            };
            let Err(status) = result else { continue };
            // UNAVAILABLE: no connection; UNKNOWN: the connection broke mid-call (the
            // coordinator's service never answers UNKNOWN itself). Every call here is safe to
            // repeat: a repeated vote gets the decision already made, or a refusal from a
            // coordinator that restarted.
            let retry = matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::NotFound);
            if !retry || Instant::now() >= deadline {
                let what = if rejoin { "joining again" } else { what };
                return Err(rpc_err(&self.url, what)(status));
            }
            if status.code() == tonic::Code::NotFound {
                rejoin = true;
            }
            tracing::warn!("coordinator {}: {what}: {} ({:?}); retrying in {backoff:?}", self.url, status.message(), status.code());
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

fn rpc_err(url: &str, what: &str) -> impl FnOnce(tonic::Status) -> WorkerError {
    let url = url.to_owned();
    let what = what.to_owned();
    move |s| {
        // A broken connection's status says only "transport error": its cause is in the sources.
        let mut detail = s.message().to_owned();
        if let Some(cause) = std::error::Error::source(&s) {
            let cause = distclip_proto::tls::error_chain(cause);
            detail = if cause.starts_with(&detail) { cause } else { format!("{detail}: {cause}") };
        }
        if distclip_proto::tls::is_tls_refusal(&s) {
            detail.push_str(
                "; the TLS session was refused: under --tls-mutual every worker presents --tls-cert and --tls-key signed by the run's --tls-ca",
            );
        }
        WorkerError::Coordinator { url, message: format!("{what}: {detail} ({:?})", s.code()) }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Positions of a step's micro-batches, grouped by shard for the commit.
fn consumed(micro: &[Batch]) -> Vec<pb::ShardIndices> {
    let mut by_shard: std::collections::BTreeMap<usize, Vec<u64>> = Default::default();
    for p in micro.iter().flat_map(|b| b.positions.iter()) {
        by_shard.entry(p.shard).or_default().push(p.index);
    }
    by_shard.into_iter().map(|(shard, indices)| pb::ShardIndices { shard: shard as u64, indices }).collect()
}

fn report(epoch: u64, s: &ShardSummary) -> pb::ShardReport {
    pb::ShardReport {
        shard: s.shard as u64,
        epoch,
        samples: s.samples,
        skipped: s.skipped.clone(),
        skipped_by_reason: s.skipped_by_reason.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        failed: s.failed.clone().unwrap_or_default(),
    }
}

/// Join the run at `opts.coordinator` and train until the coordinator says it is finished.
pub fn run_worker(opts: WorkerOptions) -> Result<WorkerOutcome, WorkerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("distclip-net")
        .build()
        .map_err(|e| WorkerError::Setup(format!("cannot start the network runtime: {e}")))?;
    let handle = rt.handle().clone();
    let url = opts.coordinator.clone();
    let comm_opts = CommOptions { token: opts.token.clone(), tls: opts.tls.clone(), ..CommOptions::default() };
    let server = rt
        .block_on(PeerServer::bind(opts.listen, comm_opts.clone()))
        .map_err(|e| WorkerError::Setup(format!("data-plane service on {}: {e}", opts.listen)))?;
    let bound = server.local_addr();
    let peer_address = opts.advertise.clone().unwrap_or_else(|| {
        if bound.ip().is_unspecified() { format!("{}:{}", hostname(), bound.port()) } else { bound.to_string() }
    });
    let worker_id = opts.worker_id.clone().unwrap_or_else(|| {
        format!("{}-{}-{:04x}", hostname(), std::process::id(), rand::random::<u16>())
    });
    let mut client = rt.block_on(connect(&url, opts.token.as_deref(), opts.tls.as_ref()))?;
    let join_req = pb::JoinRequest {
        worker_id: worker_id.clone(),
        peer_address: peer_address.clone(),
        device: opts.device.clone(),
        threads: opts.threads.unwrap_or(0) as u32,
        step: 0,
        rank_hint: opts.rank_hint,
    };
    let join = rt.block_on(client.join(join_req.clone())).map_err(rpc_err(&url, "join"))?.into_inner();
    let mut link = Link { client: client.clone(), url: url.clone(), join: join_req, rejoined: false };
    let config = RunConfig::from_toml(&join.config_toml, Some("the coordinator's run config"))
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    tracing::info!(worker = %worker_id, run = %join.run_id, "joined; data plane at {peer_address}");

    // Heartbeats run beside the step loop, so a long step never looks like a death. Their
    // answers also say when the coordinator dropped a quorum's step: a collective of that
    // quorum still running here is stopped (its silent peer may never answer).
    let beat = Arc::new(Mutex::new((0u64, String::from("starting"))));
    let current_group: Arc<Mutex<Option<Arc<Group>>>> = Arc::new(Mutex::new(None));
    {
        let mut client = client.clone();
        let beat = beat.clone();
        let current_group = current_group.clone();
        let worker_id = worker_id.clone();
        let every = Duration::from_millis(join.heartbeat_interval_ms.max(50));
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let (step, state) = beat.lock().map(|g| g.clone()).unwrap_or_default();
                match client.heartbeat(pb::HeartbeatRequest { worker_id: worker_id.clone(), step, state }).await {
                    Ok(r) if !r.get_ref().known => tracing::warn!("the coordinator no longer knows this worker"),
                    Ok(r) => {
                        let abandoned = r.get_ref().abandoned_quorum;
                        let group = current_group.lock().ok().and_then(|g| g.clone());
                        if let Some(g) = group.filter(|g| g.quorum_id() == abandoned) {
                            g.abort(&format!("the coordinator dropped the step of quorum {abandoned} (a member died or failed)"));
                        }
                    }
                    Err(s) => tracing::warn!("heartbeat failed: {}", s.message()),
                }
            }
        });
    }
    let set_state = |step: u64, state: &str| {
        if let Ok(mut g) = beat.lock() {
            *g = (step, state.to_owned());
        }
    };
    // grpc.health.v1 on the data-plane port: SERVING while in a quorum (probes, load
    // balancers); a step's quorum round trip does not count as leaving it.
    let mut serving = false;
    let mut set_serving = |on: bool| {
        if on != serving {
            serving = on;
            rt.block_on(server.set_serving(on));
        }
    };

    // The model: every fresh worker initialises from the run's seed, so all ranks start equal
    // (checked by the parameter checksums in every commit); a late joiner heals from a peer.
    let model_cfg = ClipConfig::from_name_or_path(&config.model.name)
        .map_err(|e| WorkerError::Config(format!("model.name = {:?}: {e}", config.model.name)))?;
    let device = parse_device(&opts.device).map_err(|e| WorkerError::Setup(e.to_string()))?;
    device.seed(config.train.seed);
    let mut model = model_cfg.init(&device);
    if let Some(path) = &config.model.pretrained {
        let state = read_state_dict(std::path::Path::new(path))
            .map_err(|e| WorkerError::Setup(format!("model.pretrained {path}: {e}")))?;
        model = load_state_dict(model, &state)
            .map_err(|e| WorkerError::Setup(format!("model.pretrained {path}: {e}")))?;
    }
    let image_size = model.image_size();
    let context_length = model.context_length();
    let optim = OptimConfig::from_train(&config.train, join.total_steps)
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    let mut trainer = Trainer::new(model, optim, &device)
        .map_err(|e| WorkerError::Setup(e.to_string()))?
        .with_precision(config.train.precision);
    if !join.resume_from.is_empty() {
        resume(&mut trainer, Path::new(&join.resume_from))?;
    }
    let checkpoints = Checkpoints {
        root: opts
            .checkpoint_dir
            .clone()
            .or_else(|| (!join.checkpoint_dir.is_empty()).then(|| PathBuf::from(&join.checkpoint_dir))),
        keep: config.log.keep_checkpoints,
        config_toml: join.config_toml.clone(),
    };
    let suite = Suite {
        zeroshot: config.eval.zeroshot.clone(),
        templates: Vec::new(),
        retrieval: config.eval.retrieval.clone(),
    };
    let caption_key: CaptionKey =
        config.data.caption_key.parse().map_err(|e| WorkerError::Config(format!("data.caption_key: {e}")))?;
    let evaluator = Evaluator {
        model: &model_cfg,
        device: &device,
        suite,
        batch_size: config.eval.batch_size,
        caption_key: caption_key.clone(),
    };
    let accum = config.train.accum_freq.max(1);

    // The state a healing peer pulls: refreshed whenever the membership changes.
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

    let list = Arc::new(
        ShardList::parse(&config.data.train).map_err(|e| WorkerError::Config(format!("data.train: {e}")))?,
    );
    let opener = ShardOpener::new(RetryPolicy::default());
    let loader_cfg = LoaderConfig {
        threads: opts.data_threads.max(1),
        batch_size: config.train.batch_size,
        seed: config.train.seed,
        epoch: 0,
        order: Order::Epoch,
        shuffle: config.data.shuffle,
        shuffle_buffer: if config.data.shuffle { config.data.shuffle_buffer } else { 0 },
        shuffle_initial: if config.data.shuffle { config.data.shuffle_buffer.min(1000) } else { 0 },
        prefetch: (2 * config.train.batch_size).max(16),
        keep_partial: true,
        transform: TransformConfig {
            image_size,
            context_length,
            augment: match config.data.augment {
                Augment::Random => DataAugment::train(),
                Augment::None => DataAugment::None,
            },
            caption_key: caption_key.clone(),
            ..TransformConfig::default()
        },
    };

    let mut epoch = 0u64;
    let mut feed: Option<Feed> = None;
    // This step's micro-batches (`train.accum_freq` of them, fewer at the end of an epoch).
    let mut micro: Vec<Batch> = Vec::new();
    let final_state: Vec<u8>;
    let mut last_eval: Option<u64> = None;
    let mut data_s = 0.0;
    let mut reports: Vec<pb::ShardReport> = Vec::new();
    let mut group: Option<Arc<Group>> = None;
    let mut rank = 0usize;
    // Whether this worker writes the final checkpoint and evaluation: rank 0 of the quorum
    // the coordinator answered FINISH with (exactly one worker of the run).
    let mut final_writer = false;
    // The quorum id under which the last applied step committed: with the step, this
    // worker's history (QuorumRequest.commit_quorum).
    let mut commit_quorum = 0u64;
    // The last quorum sent with its member list: TRAIN answers for it come without one.
    let mut known: Option<pb::Quorum> = None;
    let mut left = false;
    loop {
        // Between steps: what was loaded but not committed goes back with the leases (committed
        // positions are skipped when a shard is leased again).
        if opts.leave.load(Ordering::Relaxed) {
            tracing::warn!(step = trainer.step(), "asked to stop: leaving the run after the last committed step");
            set_serving(false);
            left = true;
            final_state = Vec::new();
            break;
        }
        if feed.as_ref().is_none_or(|f| f.epoch != epoch) {
            feed = Some(Feed::start(
                epoch,
                list.clone(),
                opener.clone(),
                loader_cfg.clone(),
                client.clone(),
                handle.clone(),
                worker_id.clone(),
            )?);
        }
        let f = feed.as_mut().expect("feed was just started");
        if micro.is_empty() {
            set_state(trainer.step(), "loading");
            let t = Instant::now();
            // The loader's last batch of an epoch may hold no examples, only the summaries of
            // shards finished last: keep those for the coordinator and look further.
            while micro.len() < accum {
                let Some(b) = f.next_batch()? else { break };
                reports.extend(b.finished.iter().map(|s| report(epoch, s)));
                if !b.is_empty() {
                    micro.push(b);
                }
            }
            data_s = t.elapsed().as_secs_f64();
        }
        if micro.is_empty() && !reports.is_empty() {
            // The epoch can only end once every shard is reported; with no batch left there is
            // no commit to carry these.
            let req = pb::LeaseRequest { worker_id: worker_id.clone(), epoch, want: 0, shard_reports: std::mem::take(&mut reports), fresh: false };
            link.call(&rt, "reporting finished shards", trainer.step(), |mut c| {
                let req = req.clone();
                async move { c.lease(req).await }
            })?;
        }
        set_state(trainer.step(), "quorum");
        let req = pb::QuorumRequest {
            worker_id: worker_id.clone(),
            step: trainer.step(),
            epoch,
            has_data: !micro.is_empty(),
            commit_quorum,
            known_quorum: known.as_ref().map_or(0, |k| k.quorum_id),
        };
        let q = link.call(&rt, "quorum", trainer.step(), |mut c| {
            let req = req.clone();
            async move { c.quorum(req).await }
        })?;
        if link.take_rejoined() {
            // The restarted coordinator does not know this worker's leases: read from fresh
            // ones. What was loaded but not committed goes back to the pool (committed
            // positions are skipped when a shard is leased again).
            feed = None;
            micro.clear();
            reports.clear();
        }
        match pb::StepAction::try_from(q.action).unwrap_or(pb::StepAction::Unspecified) {
            pb::StepAction::Finish => {
                set_serving(false);
                if let Some(me) = q.quorum.as_ref().and_then(|fq| fq.members.iter().find(|m| m.worker_id == worker_id)) {
                    rank = me.rank as usize;
                    final_writer = me.rank == 0;
                }
                final_state = q.run_state;
                break;
            }
            pb::StepAction::NextEpoch => {
                // Sent to every member when one of them is behind; a worker already on the
                // new epoch keeps its feed and what it has loaded.
                if q.epoch != epoch {
                    tracing::info!("epoch {epoch} complete; starting epoch {}", q.epoch);
                    epoch = q.epoch;
                    feed = None;
                    micro.clear();
                }
                continue;
            }
            pb::StepAction::Wait => {
                set_serving(false);
                // Shards may come back to the pool (a holder died): read them with a new loader.
                if feed.as_ref().is_some_and(|f| f.ended) {
                    feed = None;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            pb::StepAction::Train => {}
            pb::StepAction::Unspecified => {
                return Err(WorkerError::Coordinator {
                    url,
                    message: format!("quorum answered an unknown action {}", q.action),
                });
            }
        }
        if q.epoch != epoch {
            epoch = q.epoch;
        }
        let mut quorum = q.quorum.ok_or_else(|| WorkerError::Coordinator {
            url: url.clone(),
            message: "quorum answer without a quorum".into(),
        })?;
        match &known {
            Some(k) if quorum.members.is_empty() && k.quorum_id == quorum.quorum_id => quorum.members = k.members.clone(),
            _ => known = Some(quorum.clone()),
        }
        rank = quorum
            .members
            .iter()
            .position(|m| m.worker_id == worker_id)
            .ok_or_else(|| WorkerError::Coordinator {
                url: url.clone(),
                message: format!("quorum {} does not list this worker", quorum.quorum_id),
            })?;
        if !q.heal_from.is_empty() {
            set_state(trainer.step(), "healing");
            set_serving(false);
            let before = trainer.checksum();
            if let Err(e) = heal(&rt, &mut trainer, &q.heal_from, &comm_opts, q.step) {
                // The source can die after the quorum formed: asking again drops this step on
                // every rank, and the next quorum names a live source. The worker keeps its
                // history unless the attempt loaded a peer's state of another step.
                tracing::warn!("{e}; asking the coordinator for a quorum again");
                if trainer.checksum() != before {
                    commit_quorum = 0;
                }
                continue;
            }
            commit_quorum = q.commit_quorum;
        }
        if group.as_ref().is_none_or(|g| g.quorum_id() != quorum.quorum_id) {
            group = None;
            if let Ok(mut s) = snapshot.lock() {
                *s = Some(trainer.state_bytes());
            }
            let spec = GroupSpec {
                quorum_id: quorum.quorum_id,
                rank,
                peers: quorum.members.iter().map(|m| m.peer_address.clone()).collect(),
            };
            match rt.block_on(Group::connect(&server, spec)) {
                Ok(g) => group = Some(Arc::new(g)),
                Err(e) => tracing::warn!("could not build the ring for quorum {}: {e}", quorum.quorum_id),
            }
        }
        if let Ok(mut current) = current_group.lock() {
            *current = group.clone();
        }
        set_state(trainer.step(), "training");
        set_serving(true);
        let t = Instant::now();
        let checksum_before = format!("{:016x}", trainer.checksum());
        let lr = trainer.config().lr_at(trainer.step());
        let logit_scale = f64::from(trainer.model().logit_scale_exp());
        let mut locals: Vec<LocalBatch> =
            micro.iter().map(|b| LocalBatch { images: &b.images, tokens: &b.tokens, len: b.len() }).collect();
        if locals.is_empty() {
            locals.push(LocalBatch { images: &[], tokens: &[], len: 0 });
        }
        let local_len: usize = locals.iter().map(|l| l.len).sum();
        let mut comm_s = 0.0;
        let result = match &group {
            Some(g) => {
                let mut ring = Ring { group: g.as_ref(), handle: &handle, comm_s: 0.0 };
                let r = trainer.forward_backward_accum(&locals, &mut ring);
                comm_s = ring.comm_s;
                r
            }
            None => Err(StepError::Collective(CollectiveError::Broken("no ring for this quorum".into()))),
        };
        let compute_s = (t.elapsed().as_secs_f64() - comm_s).max(0.0);
        let (ok, error) = match &result {
            Ok(_) => (true, String::new()),
            Err(e) => (false, e.to_string()),
        };
        let loss = result.as_ref().map(|p| f64::from(p.loss())).unwrap_or(f64::NAN);
        let vote = pb::CommitRequest {
            worker_id: worker_id.clone(),
            quorum_id: quorum.quorum_id,
            step: q.step,
            ok,
            error: error.clone(),
            non_finite: matches!(result, Err(StepError::NonFinite { .. })),
            consumed: consumed(&micro),
            shard_reports: reports.clone(),
            metrics: Some(pb::StepMetrics {
                loss,
                lr,
                logit_scale,
                grad_norm: result.as_ref().map(|p| p.grad_norm()).unwrap_or(f64::NAN),
                samples: local_len as u32,
                data_s,
                compute_s,
                comm_s,
                step_s: t.elapsed().as_secs_f64() + data_s,
                params_checksum: checksum_before,
            }),
        };
        // After a coordinator restart the vote finds no open round and is refused: the step is
        // dropped and run again under the new quorum, like any failed step.
        let commit = link.call(&rt, "commit", trainer.step(), |mut c| {
            let vote = vote.clone();
            async move { c.commit(vote).await }
        })?;
        match result {
            Ok(pending) if commit.commit => {
                let stats = trainer.apply(pending).map_err(|e| WorkerError::Setup(e.to_string()))?;
                commit_quorum = quorum.quorum_id;
                if rank == 0 && stats.step % config.log.every_steps.max(1) == 0 {
                    tracing::info!(
                        step = stats.step + 1,
                        loss = stats.loss,
                        lr = stats.lr,
                        logit_scale = stats.logit_scale,
                        samples = stats.global_samples,
                        "step"
                    );
                }
                micro.clear();
                reports.clear();
                if rank == 0 {
                    let step = trainer.step();
                    let written = (!commit.run_state.is_empty())
                        .then(|| checkpoints.write(&trainer, &distclip_checkpoint::step_name(step), &commit.run_state));
                    let eval_due = config.eval.every_steps > 0 && step % config.eval.every_steps == 0;
                    let results = if eval_due { evaluator.run(&trainer) } else { None };
                    if results.is_some() {
                        last_eval = Some(step);
                    }
                    record(&rt, &mut client, &worker_id, step, written, results);
                }
            }
            _ => {
                tracing::warn!(step = q.step, "step dropped: {}", if ok { commit.reason } else { error });
                // The ring may be out of step after a failed collective: rebuild it.
                group = None;
            }
        }
    }
    set_state(trainer.step(), if left { "leaving" } else { "finished" });
    let final_checksum = format!("{:016x}", trainer.checksum());
    if left {
        let req = pb::LeaveRequest { worker_id, reason: "asked to leave (SIGTERM or SIGINT)".into() };
        match rt.block_on(client.leave(req)) {
            Ok(_) => tracing::info!("left the run; its leases are back in the pool"),
            Err(e) => tracing::warn!("could not tell the coordinator this worker left ({}); it will time out instead", e.message()),
        }
        drop(feed);
        rt.shutdown_timeout(Duration::from_secs(1));
        return Ok(WorkerOutcome { steps: trainer.step(), rank, params_checksum: final_checksum, left: true });
    }
    if final_writer {
        let step = trainer.step();
        let results = if last_eval != Some(step) { evaluator.run(&trainer) } else { None };
        let written = (!final_state.is_empty())
            .then(|| checkpoints.write(&trainer, distclip_checkpoint::FINAL_NAME, &final_state));
        record(&rt, &mut client, &worker_id, step, written, results);
        if let Some(dir) = &opts.save_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| WorkerError::Setup(format!("creating {}: {e}", dir.display())))?;
            trainer
                .save_safetensors(&dir.join("model.safetensors"))
                .map_err(|e| WorkerError::Setup(format!("saving the model in {}: {e}", dir.display())))?;
        }
    }
    let _ = rt.block_on(client.leave(pb::LeaveRequest { worker_id, reason: "run finished".into() }));
    drop(feed);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(WorkerOutcome { steps: trainer.step(), rank, params_checksum: final_checksum, left: false })
}

/// Pull parameters and optimizer state from a peer at `step`. The peer refreshes what it serves
/// when it enters the same quorum, which may be a moment after this worker does: retry for up
/// to 60 s while it answers, but give up after 10 s in which it could not be reached (it died).
fn heal(
    rt: &tokio::runtime::Runtime,
    trainer: &mut Trainer,
    peer: &str,
    opts: &CommOptions,
    step: u64,
) -> Result<(), WorkerError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let attempt = rt
            .block_on(distclip_comm::fetch_state(peer, opts))
            .map_err(|e| e.to_string())
            .and_then(|bytes| trainer.load_state_bytes(&bytes).map_err(|e| e.to_string()));
        match attempt {
            Ok(()) if trainer.step() == step => {
                tracing::info!("healed from {peer} at step {step}");
                return Ok(());
            }
            Ok(()) => {
                unreachable_since = None;
                tracing::debug!("{peer} served step {}, waiting for step {step}", trainer.step());
            }
            Err(e) => {
                tracing::debug!("healing from {peer}: {e}");
                if unreachable_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(10) {
                    return Err(WorkerError::Setup(format!("could not heal from {peer} at step {step}: {e}")));
                }
            }
        }
        if Instant::now() > deadline {
            return Err(WorkerError::Setup(format!("could not heal from {peer} at step {step} within 60 s")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Load the optimizer state of the checkpoint the run resumed from (the coordinator verified
/// its checksums; the state carries its own).
fn resume(trainer: &mut Trainer, dir: &Path) -> Result<(), WorkerError> {
    let path = dir.join(distclip_checkpoint::OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        WorkerError::Setup(format!(
            "resuming from {}: {e}; every worker must see the run directory under the same path (a shared volume), or pass --checkpoint-dir",
            path.display()
        ))
    })?;
    trainer
        .load_state_bytes(&bytes)
        .map_err(|e| WorkerError::Setup(format!("resuming from {}: {e}", path.display())))?;
    tracing::info!("resumed from {} at step {}", dir.display(), trainer.step());
    Ok(())
}

/// Where and how rank 0 writes checkpoints.
struct Checkpoints {
    root: Option<PathBuf>,
    keep: usize,
    config_toml: String,
}

impl Checkpoints {
    /// Write the checkpoint `name` (model, optimizer state, the coordinator's run state, the
    /// config) atomically, then drop all but the newest `keep`. Returns its path or why not.
    fn write(&self, trainer: &Trainer, name: &str, run_state: &[u8]) -> Result<PathBuf, String> {
        let root = self.root.as_ref().ok_or("the coordinator named no checkpoint directory; pass --checkpoint-dir")?;
        let state: serde_json::Value =
            serde_json::from_slice(run_state).map_err(|e| format!("the coordinator sent an unreadable run state: {e}"))?;
        let meta = distclip_checkpoint::CheckpointMeta {
            step: trainer.step(),
            epoch: state["epoch"].as_u64().unwrap_or(0),
            samples_seen: state["samples_seen"].as_u64().unwrap_or(0),
            run_id: state["run_id"].as_str().unwrap_or_default().to_owned(),
        };
        let model = distclip_model::checkpoint::safetensors_bytes(&trainer.state_dict()).map_err(|e| e.to_string())?;
        let optimizer = trainer.state_bytes();
        let files: [(&str, &[u8]); 4] = [
            (distclip_checkpoint::MODEL_FILE, &model),
            (distclip_checkpoint::OPTIMIZER_FILE, &optimizer),
            (distclip_checkpoint::RUN_STATE_FILE, run_state),
            (distclip_checkpoint::CONFIG_FILE, self.config_toml.as_bytes()),
        ];
        let path = distclip_checkpoint::write_checkpoint(root, name, &meta, &files).map_err(|e| e.to_string())?;
        if let Err(e) = distclip_checkpoint::prune(root, self.keep) {
            tracing::warn!("pruning old checkpoints: {e}");
        }
        tracing::info!("checkpoint after step {} written to {}", meta.step, path.display());
        Ok(path)
    }
}

/// Rank 0's held-out evaluation (`[eval]` of the run config).
struct Evaluator<'a> {
    model: &'a ClipConfig,
    device: &'a Device,
    suite: Suite,
    batch_size: usize,
    /// `data.caption_key`: retrieval sets are read like the training data.
    caption_key: CaptionKey,
}

impl Evaluator<'_> {
    /// Results as a JSON object, or None when nothing is configured or it failed (logged).
    fn run(&self, trainer: &Trainer) -> Option<String> {
        if self.suite.is_empty() {
            return None;
        }
        let t = Instant::now();
        // A plain (non-autodiff) copy of the current weights: evaluation needs no graph.
        let model = match load_state_dict(self.model.init(self.device), &trainer.state_dict()) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("evaluation skipped: {e}");
                return None;
            }
        };
        let opts = EvalOptions {
            batch_size: self.batch_size.max(1),
            caption_key: self.caption_key.clone(),
            ..EvalOptions::default()
        };
        match distclip_eval::evaluate(&model, self.device, &self.suite, &opts) {
            Ok(v) => {
                tracing::info!("evaluated after step {} in {:.1}s", trainer.step(), t.elapsed().as_secs_f64());
                Some(v.to_string())
            }
            Err(e) => {
                tracing::warn!("evaluation after step {} failed: {e}; check [eval] in the run config", trainer.step());
                None
            }
        }
    }
}

/// Tell the coordinator about a checkpoint and evaluation results (best effort: the run goes
/// on without its records, and the files are on disk either way).
fn record(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    worker_id: &str,
    step: u64,
    checkpoint: Option<Result<PathBuf, String>>,
    eval: Option<String>,
) {
    if checkpoint.is_none() && eval.is_none() {
        return;
    }
    let (path, error) = match checkpoint {
        Some(Ok(p)) => (p.display().to_string(), String::new()),
        Some(Err(e)) => {
            tracing::error!("checkpoint after step {step} failed: {e}");
            (String::new(), e)
        }
        None => (String::new(), String::new()),
    };
    let req = pb::RecordRequest {
        worker_id: worker_id.to_owned(),
        step,
        checkpoint: path,
        checkpoint_error: error,
        eval_json: eval.unwrap_or_default(),
    };
    if let Err(s) = rt.block_on(client.record(req)) {
        tracing::warn!("could not record a checkpoint or evaluation with the coordinator: {}", s.message());
    }
}
