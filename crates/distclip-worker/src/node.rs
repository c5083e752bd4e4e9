//! The worker process: joins the coordinator, runs the step loop of DESIGN.md ("One training
//! step") with the coordinator's quorum and commit votes around each step, streams leased
//! shards through the data loader, and serves its state to peers that heal from it.
//!
//! The step itself (forward, collectives, backward, AdamW) is [`crate::Trainer`]; this module is
//! the wiring: coordinator RPCs, the data-plane ring, the loader and the lease relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use distclip_comm::{CommOptions, Group, GroupSpec, PeerServer};
use distclip_config::{Augment, RunConfig};
use distclip_data::loader::ShardSummary;
use distclip_data::{
    Augment as DataAugment, Batch, Loader, LoaderConfig, Order, RetryPolicy, ShardList, ShardOpener, ShardTask,
    TransformConfig,
};
use distclip_model::ClipConfig;
use distclip_model::checkpoint::{load_state_dict, read_state_dict};
use distclip_model::device::parse_device;
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
    /// Stable worker id (default: host, pid and a random suffix).
    pub worker_id: Option<String>,
    /// Where rank 0 writes the final model (`model.safetensors`).
    pub save_dir: Option<PathBuf>,
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
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// How long a worker keeps trying to reach the coordinator before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

async fn connect(url: &str, token: Option<&str>) -> Result<Client, WorkerError> {
    let err = |message: String| WorkerError::Coordinator { url: url.to_owned(), message };
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| err(format!("not a valid URL ({e}); pass e.g. http://host:port")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let header = token
        .map(|t| {
            format!("Bearer {t}")
                .parse()
                .map_err(|_| err("the run token must be printable ASCII".into()))
        })
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
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("coordinator {url} not reachable yet ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(err(format!(
                    "unreachable for {CONNECT_TIMEOUT:?} ({e}); check the address and that the coordinator runs"
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
    while !stop.load(Ordering::SeqCst) {
        let req = pb::LeaseRequest { worker_id: worker_id.clone(), epoch, want: 1, shard_reports: vec![] };
        match handle.block_on(client.lease(req)) {
            Ok(resp) => {
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

fn rpc_err(url: &str, what: &str) -> impl FnOnce(tonic::Status) -> WorkerError {
    let url = url.to_owned();
    let what = what.to_owned();
    move |s| WorkerError::Coordinator { url, message: format!("{what}: {} ({:?})", s.message(), s.code()) }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Positions of a batch, grouped by shard for the commit.
fn consumed(batch: Option<&Batch>) -> Vec<pb::ShardIndices> {
    let mut by_shard: std::collections::BTreeMap<usize, Vec<u64>> = Default::default();
    for p in batch.map(|b| b.positions.as_slice()).unwrap_or_default() {
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
        skipped_by_reason: Default::default(),
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
    let comm_opts = CommOptions { token: opts.token.clone(), ..CommOptions::default() };
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
    let mut client = rt.block_on(connect(&url, opts.token.as_deref()))?;
    let join = rt
        .block_on(client.join(pb::JoinRequest {
            worker_id: worker_id.clone(),
            peer_address: peer_address.clone(),
            device: opts.device.clone(),
            threads: opts.threads.unwrap_or(0) as u32,
            step: 0,
        }))
        .map_err(rpc_err(&url, "join"))?
        .into_inner();
    let config = RunConfig::from_toml(&join.config_toml, Some("the coordinator's run config"))
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    tracing::info!(worker = %worker_id, run = %join.run_id, "joined; data plane at {peer_address}");

    // Heartbeats run beside the step loop, so a long step never looks like a death.
    let beat = Arc::new(Mutex::new((0u64, String::from("starting"))));
    {
        let mut client = client.clone();
        let beat = beat.clone();
        let worker_id = worker_id.clone();
        let every = Duration::from_millis(join.heartbeat_interval_ms.max(50));
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let (step, state) = beat.lock().map(|g| g.clone()).unwrap_or_default();
                match client.heartbeat(pb::HeartbeatRequest { worker_id: worker_id.clone(), step, state }).await {
                    Ok(r) if !r.get_ref().known => tracing::warn!("the coordinator no longer knows this worker"),
                    Ok(_) => {}
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
    let mut trainer = Trainer::new(model, optim, &device).map_err(|e| WorkerError::Setup(e.to_string()))?;

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
    let caption_key = config.data.caption_key.strip_prefix("json:").map(str::to_owned);
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
            caption_key,
            ..TransformConfig::default()
        },
    };

    let mut epoch = 0u64;
    let mut feed: Option<Feed> = None;
    let mut batch: Option<Batch> = None;
    let mut data_s = 0.0;
    let mut reports: Vec<pb::ShardReport> = Vec::new();
    let mut group: Option<Group> = None;
    let mut rank = 0usize;
    loop {
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
        if batch.is_none() {
            set_state(trainer.step(), "loading");
            let t = Instant::now();
            // The loader's last batch of an epoch may hold no examples, only the summaries of
            // shards finished last: keep those for the coordinator and look further.
            while let Some(b) = f.next_batch()? {
                reports.extend(b.finished.iter().map(|s| report(epoch, s)));
                if !b.is_empty() {
                    batch = Some(b);
                    break;
                }
            }
            data_s = t.elapsed().as_secs_f64();
        }
        if batch.is_none() && !reports.is_empty() {
            // The epoch can only end once every shard is reported; with no batch left there is
            // no commit to carry these.
            rt.block_on(client.lease(pb::LeaseRequest {
                worker_id: worker_id.clone(),
                epoch,
                want: 0,
                shard_reports: std::mem::take(&mut reports),
            }))
            .map_err(rpc_err(&url, "reporting finished shards"))?;
        }
        set_state(trainer.step(), "quorum");
        let q = rt
            .block_on(client.quorum(pb::QuorumRequest {
                worker_id: worker_id.clone(),
                step: trainer.step(),
                epoch,
                has_data: batch.is_some(),
            }))
            .map_err(rpc_err(&url, "quorum"))?
            .into_inner();
        match pb::StepAction::try_from(q.action).unwrap_or(pb::StepAction::Unspecified) {
            pb::StepAction::Finish => break,
            pb::StepAction::NextEpoch => {
                tracing::info!("epoch {epoch} complete; starting epoch {}", q.epoch);
                epoch = q.epoch;
                feed = None;
                batch = None;
                continue;
            }
            pb::StepAction::Wait => {
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
        let quorum = q.quorum.ok_or_else(|| WorkerError::Coordinator {
            url: url.clone(),
            message: "quorum answer without a quorum".into(),
        })?;
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
            heal(&rt, &mut trainer, &q.heal_from, &comm_opts, q.step)?;
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
                Ok(g) => group = Some(g),
                Err(e) => tracing::warn!("could not build the ring for quorum {}: {e}", quorum.quorum_id),
            }
        }
        set_state(trainer.step(), "training");
        let t = Instant::now();
        let checksum_before = format!("{:016x}", trainer.checksum());
        let lr = trainer.config().lr_at(trainer.step());
        let logit_scale = f64::from(trainer.model().logit_scale_exp());
        let empty = LocalBatch { images: &[], tokens: &[], len: 0 };
        let local = batch
            .as_ref()
            .map(|b| LocalBatch { images: &b.images, tokens: &b.tokens, len: b.len() })
            .unwrap_or(empty);
        let mut comm_s = 0.0;
        let result = match &group {
            Some(g) => {
                let mut ring = Ring { group: g, handle: &handle, comm_s: 0.0 };
                let r = trainer.forward_backward(local, &mut ring);
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
        let commit = rt
            .block_on(client.commit(pb::CommitRequest {
                worker_id: worker_id.clone(),
                quorum_id: quorum.quorum_id,
                step: q.step,
                ok,
                error: error.clone(),
                consumed: consumed(batch.as_ref()),
                shard_reports: reports.clone(),
                metrics: Some(pb::StepMetrics {
                    loss,
                    lr,
                    logit_scale,
                    grad_norm: result.as_ref().map(|p| p.grad_norm()).unwrap_or(f64::NAN),
                    samples: local.len as u32,
                    data_s,
                    compute_s,
                    comm_s,
                    step_s: t.elapsed().as_secs_f64() + data_s,
                    params_checksum: checksum_before,
                }),
            }))
            .map_err(rpc_err(&url, "commit"))?
            .into_inner();
        match result {
            Ok(pending) if commit.commit => {
                let stats = trainer.apply(pending).map_err(|e| WorkerError::Setup(e.to_string()))?;
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
                batch = None;
                reports.clear();
            }
            _ => {
                tracing::warn!(step = q.step, "step dropped: {}", if ok { commit.reason } else { error });
                // The ring may be out of step after a failed collective: rebuild it.
                group = None;
            }
        }
    }
    set_state(trainer.step(), "finished");
    let final_checksum = format!("{:016x}", trainer.checksum());
    if rank == 0 {
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
    Ok(WorkerOutcome { steps: trainer.step(), rank, params_checksum: final_checksum })
}

/// Pull parameters and optimizer state from a peer at `step`. The peer refreshes what it serves
/// when it enters the same quorum, which may be a moment after this worker does: retry briefly.
fn heal(
    rt: &tokio::runtime::Runtime,
    trainer: &mut Trainer,
    peer: &str,
    opts: &CommOptions,
    step: u64,
) -> Result<(), WorkerError> {
    let deadline = Instant::now() + Duration::from_secs(60);
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
            Ok(()) => tracing::debug!("{peer} served step {}, waiting for step {step}", trainer.step()),
            Err(e) => tracing::debug!("healing from {peer}: {e}"),
        }
        if Instant::now() > deadline {
            return Err(WorkerError::Setup(format!("could not heal from {peer} at step {step} within 60 s")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
