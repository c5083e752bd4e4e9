//! The parallel, deterministic loader.
//!
//! Ordering design (why the same seed and thread count give the same batches):
//! - The epoch's shard order is a permutation of the shard list seeded by `(seed, epoch)`
//!   (or, resampled, draws with replacement by weight).
//! - Worker `w` of `N` owns the shards at positions `w, w + N, w + 2N, ...` of that order, streams
//!   them one after another, passes raw samples through its own shuffle buffer (seeded by
//!   `(seed, epoch, w)`, webdataset's `_shuffle` algorithm, before decoding so the buffer holds
//!   compressed bytes), decodes with an RNG seeded by the sample's position, and sends examples
//!   through a bounded channel (the prefetch).
//! - The consumer takes one example from each live worker in turn (0, 1, ..., N-1, 0, ...),
//!   skipping workers that have finished. Every worker's sequence is a function of the seed, and
//!   so is the interleave, so batches do not depend on thread timing.
//! - [`Order::Feed`] gives up determinism for the coordinator's dynamic leases: whichever worker
//!   needs a shard next takes the next task from the channel.
//!
//! Memory stays flat over any number of shards: each worker holds one open shard, its shuffle
//! buffer, and `prefetch` decoded examples; samples are never materialised up front.
//!
//! Completion: when every sample of a shard task has been delivered in a batch or skipped, the
//! next batch carries a [`ShardSummary`] in [`Batch::finished`] (see there for the exact rule).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender, bounded};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::samples::{RawSample, SamplePos, ShardEvent, ShardReader, SkipReason};
use crate::source::ShardOpener;
use crate::spec::ShardList;
use crate::stats::FailedShard;
use crate::transform::{Example, TransformConfig, decode_sample, sample_rng};

/// Which shards an epoch reads, in what order.
#[derive(Debug, Clone)]
pub enum Order {
    /// Every shard exactly once, permuted by `seed + epoch` (no permutation if `shuffle` is off).
    Epoch,
    /// Shards drawn with replacement in proportion to their weights (OpenCLIP's
    /// `--dataset-resampled`); `Some(n)` stops after `n` shard draws in all, `None` never stops.
    Resampled {
        /// Shard draws per epoch across all workers.
        shards_per_epoch: Option<usize>,
    },
    /// Exactly these shards, from these start indices, in this order (the coordinator's leases).
    Explicit(Vec<ShardTask>),
    /// Tasks taken from a channel as the workers need them (the coordinator's leases, handed out
    /// while the epoch runs). Each worker reads one task at a time and takes the next only when it
    /// has read the current one to its end and needs another sample (to decode, or to fill its
    /// shuffle buffer), so at most `threads` tasks are being read at once and the rest stay in
    /// the channel for other consumers. (Samples of finished reads may still wait in a shuffle
    /// buffer; their task's summary comes when they are through.) The loader ends when
    /// the channel is closed (every sender dropped) and drained. Which worker gets which task
    /// depends on timing, so batch order is not reproducible in this mode. A task whose shard is
    /// outside the list is reported as a failed shard, not an error.
    Feed(Receiver<ShardTask>),
}

impl PartialEq for Order {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Order::Epoch, Order::Epoch) => true,
            (
                Order::Resampled {
                    shards_per_epoch: a,
                },
                Order::Resampled {
                    shards_per_epoch: b,
                },
            ) => a == b,
            (Order::Explicit(a), Order::Explicit(b)) => a == b,
            // Receivers have no value: equal when they are the same channel.
            (Order::Feed(a), Order::Feed(b)) => a.same_channel(b),
            _ => false,
        }
    }
}

/// One shard to read: sample indices from `start` on, except those in `skip`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardTask {
    /// Index in the shard list.
    pub shard: usize,
    /// First sample index to yield (a resume after a committed prefix).
    pub start: u64,
    /// Sample-index ranges not to yield (already committed by an earlier holder of the shard).
    /// They are skipped while reading, before any decoding; they may overlap or be unsorted.
    pub skip: Vec<Range<u64>>,
}

impl ShardTask {
    /// The whole shard.
    pub fn new(shard: usize) -> Self {
        Self {
            shard,
            ..Default::default()
        }
    }

    /// The shard from sample `start` on.
    pub fn from_index(shard: usize, start: u64) -> Self {
        Self {
            shard,
            start,
            skip: Vec::new(),
        }
    }
}

/// A shard task that has been read to its end (or failed), reported once in [`Batch::finished`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardSummary {
    /// Index in the shard list.
    pub shard: usize,
    /// Sample groups the shard holds, counting every index seen by the reader: those before the
    /// task's `start`, in its `skip` ranges, delivered, and skipped as bad. For a failed shard,
    /// the index a resume would start at: the later of the task's `start` and the groups read
    /// completely before the failure (so the task's `start` when the shard could not be opened).
    pub samples: u64,
    /// Indices this task skipped as bad samples (decode errors, missing captions, ...), in
    /// ascending order. Indices excluded by the task's `start` and `skip` are not listed.
    pub skipped: Vec<u64>,
    /// `skipped` counted by reason ([`SkipReason::name`]); the counts sum to its length.
    pub skipped_by_reason: BTreeMap<String, u64>,
    /// Why the shard ended early (could not be opened, or broke after the retries); `None`
    /// when it was read to its end.
    pub failed: Option<String>,
}

/// Loader settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Decode threads (each owns a share of the shards).
    pub threads: usize,
    /// Examples per batch.
    pub batch_size: usize,
    /// Base seed; the epoch is added to it.
    pub seed: u64,
    /// Epoch number (changes the shard order, the shuffle and the augmentation).
    pub epoch: u64,
    /// Which shards, in what order.
    pub order: Order,
    /// Permute shards (in `Epoch` order) and shuffle samples; off for evaluation.
    pub shuffle: bool,
    /// Per-worker sample shuffle buffer (OpenCLIP: 5000).
    pub shuffle_buffer: usize,
    /// Samples buffered before the shuffle starts yielding (OpenCLIP: 1000).
    pub shuffle_initial: usize,
    /// Decoded examples each worker may hold ready.
    pub prefetch: usize,
    /// Keep the last, smaller batch.
    pub keep_partial: bool,
    /// Decoding and augmentation.
    pub transform: TransformConfig,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            threads: 4,
            batch_size: 256,
            seed: 0,
            epoch: 0,
            order: Order::Epoch,
            shuffle: true,
            shuffle_buffer: 5000,
            shuffle_initial: 1000,
            prefetch: 64,
            keep_partial: true,
            transform: TransformConfig::default(),
        }
    }
}

/// A batch of examples, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `len x 3 x image_size x image_size` f32, CLIP-normalised.
    pub images: Vec<f32>,
    /// `len x context_length` token ids.
    pub tokens: Vec<i64>,
    /// Where each example came from.
    pub positions: Vec<SamplePos>,
    /// Each example's sample key.
    pub keys: Vec<String>,
    /// Image side.
    pub image_size: usize,
    /// Tokens per caption.
    pub context_length: usize,
    /// Shard tasks completed by the time this batch was assembled. A summary of shard task `S`
    /// appears in exactly one batch, and every example of `S` is in that batch or an earlier one
    /// (a worker sends the summary after the last of the task's samples has been decoded and
    /// handed on or skipped, on the same ordered channel). So once this batch is consumed, `S`'s
    /// delivered positions plus `skipped` plus the task's `start`/`skip` cover `0..samples`.
    /// When the epoch ends with summaries not yet delivered, a last batch with no examples
    /// carries them (even when `keep_partial` is off and the trailing examples are dropped).
    pub finished: Vec<ShardSummary>,
}

impl Batch {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// Loader failures. Bad data never produces one: it is counted instead.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoaderError {
    /// A setting is out of range.
    #[error("invalid loader setting: {0}")]
    Config(String),
    /// A worker thread stopped without finishing (a bug: it panicked).
    #[error(
        "data worker {worker} stopped unexpectedly; this is a bug in distclip-data, please report it"
    )]
    WorkerDied {
        /// The worker's number.
        worker: usize,
    },
}

/// Counters shared by the workers; read them any time with [`Counters::snapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    samples: AtomicU64,
    bytes: AtomicU64,
    shards: AtomicU64,
    skipped: Mutex<BTreeMap<SkipReason, u64>>,
    failed: Mutex<Vec<FailedShard>>,
}

/// A point-in-time copy of the [`Counters`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CountersSnapshot {
    /// Examples decoded and handed on.
    pub samples: u64,
    /// Shard bytes read.
    pub bytes: u64,
    /// Shards finished (read to the end or failed).
    pub shards: u64,
    /// Skips by reason.
    pub skipped: BTreeMap<SkipReason, u64>,
    /// Shards that ended early, in the order they failed.
    pub failed_shards: Vec<FailedShard>,
}

impl Counters {
    /// Copy the current values.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            samples: self.samples.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            shards: self.shards.load(Ordering::Relaxed),
            skipped: self.skipped.lock().map(|m| m.clone()).unwrap_or_default(),
            failed_shards: self.failed.lock().map(|v| v.clone()).unwrap_or_default(),
        }
    }

    /// Count a skip and warn, rate-limited per reason: the first 5, then the 10th, 100th, ...
    pub fn skip(&self, reason: SkipReason, shard_url: &str, key: &str, detail: &str) {
        let n = match self.skipped.lock() {
            Ok(mut m) => {
                let c = m.entry(reason).or_insert(0);
                *c += 1;
                *c
            }
            Err(_) => return,
        };
        if n <= 5 || is_power_of_ten(n) {
            tracing::warn!(
                reason = reason.name(),
                shard = shard_url,
                key,
                count = n,
                "skipping: {detail}"
            );
        }
    }

    fn fail_shard(&self, f: FailedShard) {
        tracing::warn!(reason = f.reason.name(), shard = %f.url, samples_read = f.samples_read, "shard failed: {}", f.error);
        self.skip_silently(f.reason);
        if let Ok(mut v) = self.failed.lock() {
            v.push(f);
        }
    }

    fn skip_silently(&self, reason: SkipReason) {
        if let Ok(mut m) = self.skipped.lock() {
            *m.entry(reason).or_insert(0) += 1;
        }
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

enum Msg {
    Example(Example),
    Finished(ShardSummary),
    Done,
}

/// Batches from a shard list; an iterator of `Result<Batch, LoaderError>`.
pub struct Loader {
    receivers: Vec<Receiver<Msg>>,
    live: Vec<bool>,
    next: usize,
    counters: Arc<Counters>,
    batch_size: usize,
    image_size: usize,
    context_length: usize,
    keep_partial: bool,
    failed: bool,
    /// Summaries received but not yet attached to a batch.
    finished: Vec<ShardSummary>,
    /// No more examples will come (all workers done).
    exhausted: bool,
}

impl Loader {
    /// Start the workers.
    pub fn new(
        list: Arc<ShardList>,
        opener: ShardOpener,
        cfg: LoaderConfig,
    ) -> Result<Loader, LoaderError> {
        if cfg.threads == 0
            || cfg.batch_size == 0
            || cfg.transform.image_size == 0
            || cfg.transform.context_length == 0
        {
            return Err(LoaderError::Config(format!(
                "threads ({}), batch size ({}), image size ({}) and context length ({}) must be at least 1",
                cfg.threads, cfg.batch_size, cfg.transform.image_size, cfg.transform.context_length
            )));
        }
        if let Order::Explicit(tasks) = &cfg.order
            && let Some(t) = tasks.iter().find(|t| t.shard >= list.len())
        {
            return Err(LoaderError::Config(format!(
                "shard {} is outside the shard list of {}",
                t.shard,
                list.len()
            )));
        }
        if matches!(cfg.order, Order::Resampled { .. })
            && list
                .shards
                .iter()
                .any(|s| s.weight.is_nan() || s.weight <= 0.0)
        {
            return Err(LoaderError::Config(
                "resampling needs positive weights".into(),
            ));
        }
        // As in OpenCLIP (--train-data-upsampling-factors needs --dataset-resampled): an epoch
        // reads every shard once, so weights cannot apply there.
        if !matches!(cfg.order, Order::Resampled { .. }) && !list.is_unweighted() {
            return Err(LoaderError::Config(
                "upsampling weights apply only when shards are resampled (OpenCLIP's --dataset-resampled); drop the @weights or resample".into(),
            ));
        }
        let counters = Arc::new(Counters::default());
        let plan = plan(&list, &cfg);
        let mut receivers = Vec::with_capacity(cfg.threads);
        for (w, tasks) in plan.into_iter().enumerate() {
            let (tx, rx) = bounded(cfg.prefetch.max(1));
            receivers.push(rx);
            let worker = Worker {
                id: w,
                list: list.clone(),
                opener: opener.clone(),
                cfg: cfg.clone(),
                counters: counters.clone(),
                tasks,
            };
            std::thread::Builder::new()
                .name(format!("distclip-data-{w}"))
                .spawn(move || worker.run(tx))
                .map_err(|e| LoaderError::Config(format!("cannot start a data thread: {e}")))?;
        }
        Ok(Loader {
            live: vec![true; receivers.len()],
            receivers,
            next: 0,
            counters,
            batch_size: cfg.batch_size,
            image_size: cfg.transform.image_size,
            context_length: cfg.transform.context_length,
            keep_partial: cfg.keep_partial,
            failed: false,
            finished: Vec::new(),
            exhausted: false,
        })
    }

    /// The live counters (samples, skips by reason, failed shards).
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The next example in the deterministic interleave, or `None` when all workers are done.
    /// Shard summaries met on the way are kept for the batch being assembled; they do not move
    /// the interleave, so batches stay the same with or without them.
    fn next_example(&mut self) -> Result<Option<Example>, LoaderError> {
        let n = self.receivers.len();
        while self.live.iter().any(|l| *l) {
            let w = self.next;
            self.next = (self.next + 1) % n;
            while self.live[w] {
                match self.receivers[w].recv() {
                    Ok(Msg::Example(ex)) => return Ok(Some(ex)),
                    Ok(Msg::Finished(s)) => self.finished.push(s),
                    Ok(Msg::Done) => self.live[w] = false,
                    Err(_) => return Err(LoaderError::WorkerDied { worker: w }),
                }
            }
        }
        Ok(None)
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.exhausted {
            return None;
        }
        let per_image = 3 * self.image_size * self.image_size;
        let mut batch = Batch {
            images: Vec::with_capacity(self.batch_size * per_image),
            tokens: Vec::with_capacity(self.batch_size * self.context_length),
            positions: Vec::with_capacity(self.batch_size),
            keys: Vec::with_capacity(self.batch_size),
            image_size: self.image_size,
            context_length: self.context_length,
            finished: Vec::new(),
        };
        while batch.len() < self.batch_size {
            match self.next_example() {
                Ok(Some(ex)) => {
                    batch.images.extend_from_slice(&ex.image);
                    batch.tokens.extend_from_slice(&ex.tokens);
                    batch.positions.push(ex.pos);
                    batch.keys.push(ex.key);
                }
                Ok(None) => {
                    self.exhausted = true;
                    break;
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        batch.finished = std::mem::take(&mut self.finished);
        let full = batch.len() == self.batch_size;
        let keep = full || (self.keep_partial && !batch.is_empty());
        if !keep {
            if batch.finished.is_empty() {
                return None;
            }
            // Drop the partial examples but deliver the summaries.
            batch.images.clear();
            batch.tokens.clear();
            batch.positions.clear();
            batch.keys.clear();
        }
        Some(Ok(batch))
    }
}

/// Split the epoch's shard tasks among the workers.
fn plan(list: &ShardList, cfg: &LoaderConfig) -> Vec<WorkerTasks> {
    let n = cfg.threads;
    match &cfg.order {
        Order::Epoch => {
            let mut order: Vec<usize> = (0..list.len()).collect();
            if cfg.shuffle {
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(&[
                    cfg.seed,
                    cfg.epoch,
                    0x5348_4152_4453,
                ])));
            }
            deal(order.into_iter().map(ShardTask::new).collect(), n)
        }
        Order::Explicit(tasks) => deal(tasks.clone(), n),
        Order::Feed(rx) => (0..n).map(|_| WorkerTasks::Feed(rx.clone())).collect(),
        Order::Resampled { shards_per_epoch } => (0..n)
            .map(|w| {
                let count = shards_per_epoch.map(|total| total / n + usize::from(w < total % n));
                WorkerTasks::Resampled {
                    rng: Box::new(ChaCha8Rng::seed_from_u64(mix(&[
                        cfg.seed,
                        cfg.epoch,
                        w as u64,
                        0x5245_5341_4d50,
                    ]))),
                    cumulative: cumulative_weights(list),
                    left: count,
                }
            })
            .collect(),
    }
}

fn deal(tasks: Vec<ShardTask>, n: usize) -> Vec<WorkerTasks> {
    let mut out: Vec<Vec<ShardTask>> = vec![Vec::new(); n];
    for (i, t) in tasks.into_iter().enumerate() {
        out[i % n].push(t);
    }
    out.into_iter()
        .map(|v| WorkerTasks::List(v.into_iter()))
        .collect()
}

fn cumulative_weights(list: &ShardList) -> Arc<Vec<f64>> {
    let mut acc = 0.0;
    Arc::new(
        list.shards
            .iter()
            .map(|s| {
                acc += s.weight;
                acc
            })
            .collect(),
    )
}

/// SplitMix64 over the parts: independent seeds for independent streams.
fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p;
        h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

enum WorkerTasks {
    List(std::vec::IntoIter<ShardTask>),
    Feed(Receiver<ShardTask>),
    Resampled {
        rng: Box<ChaCha8Rng>,
        cumulative: Arc<Vec<f64>>,
        left: Option<usize>,
    },
}

impl Iterator for WorkerTasks {
    type Item = ShardTask;

    fn next(&mut self) -> Option<ShardTask> {
        match self {
            WorkerTasks::List(it) => it.next(),
            // Blocks until a task arrives; `None` once the channel is closed and empty.
            WorkerTasks::Feed(rx) => rx.recv().ok(),
            WorkerTasks::Resampled {
                rng,
                cumulative,
                left,
            } => {
                if let Some(l) = left {
                    if *l == 0 {
                        return None;
                    }
                    *l -= 1;
                }
                let total = *cumulative.last()?;
                let x = rng.random::<f64>() * total;
                let shard = cumulative
                    .partition_point(|&c| c <= x)
                    .min(cumulative.len() - 1);
                Some(ShardTask::new(shard))
            }
        }
    }
}

struct Worker {
    id: usize,
    list: Arc<ShardList>,
    opener: ShardOpener,
    cfg: LoaderConfig,
    counters: Arc<Counters>,
    tasks: WorkerTasks,
}

/// One open shard task's progress through the worker, for its [`ShardSummary`].
struct Progress {
    shard: usize,
    /// Raw samples the reader handed on (into the shuffle buffer).
    read: u64,
    /// Of those, decoded and sent, or skipped.
    done: u64,
    skipped: Vec<u64>,
    skipped_by_reason: BTreeMap<String, u64>,
    /// Set when the reader reached the end: (groups seen, failure).
    end: Option<(u64, Option<String>)>,
}

/// Per-worker bookkeeping of open shard tasks, keyed by an open counter (a shard may be open
/// twice at once in the shuffle buffer when resampled or fed twice).
#[derive(Default)]
struct Tracker {
    open: BTreeMap<u64, Progress>,
    next_id: u64,
}

impl Tracker {
    fn opened(&mut self, shard: usize) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(
            id,
            Progress {
                shard,
                read: 0,
                done: 0,
                skipped: Vec::new(),
                skipped_by_reason: BTreeMap::new(),
                end: None,
            },
        );
        id
    }

    fn progress(&mut self, id: u64) -> Option<&mut Progress> {
        self.open.get_mut(&id)
    }

    /// Send the summaries of tasks whose every sample has been handled; false if the loader
    /// hung up.
    fn flush(&mut self, tx: &Sender<Msg>) -> bool {
        let ready: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, p)| p.end.is_some() && p.done == p.read)
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Some(p) = self.open.remove(&id) {
                let (samples, failed) = p.end.unwrap_or_default();
                let mut skipped = p.skipped;
                skipped.sort_unstable();
                let summary = ShardSummary {
                    shard: p.shard,
                    samples,
                    skipped,
                    skipped_by_reason: p.skipped_by_reason,
                    failed,
                };
                if tx.send(Msg::Finished(summary)).is_err() {
                    return false;
                }
            }
        }
        true
    }
}

impl Worker {
    fn run(self, tx: Sender<Msg>) {
        let Worker {
            id,
            list,
            opener,
            cfg,
            counters,
            tasks,
        } = self;
        let tracker = Rc::new(RefCell::new(Tracker::default()));
        let raw = RawStream {
            list: list.clone(),
            opener,
            counters: counters.clone(),
            draws: matches!(tasks, WorkerTasks::Resampled { .. }).then_some((id as u64) << 40),
            tasks,
            current: None,
            tracker: tracker.clone(),
            tx: tx.clone(),
        };
        let (bufsize, initial) = if cfg.shuffle {
            (cfg.shuffle_buffer.max(1), cfg.shuffle_initial)
        } else {
            (1, 1)
        };
        let rng = ChaCha8Rng::seed_from_u64(mix(&[cfg.seed, cfg.epoch, id as u64, 0x5348_5546]));
        for (open_id, sample) in Shuffle::new(raw, bufsize, initial, rng) {
            let salt = if sample.draw == 0 {
                cfg.epoch
            } else {
                mix(&[cfg.epoch, sample.draw])
            };
            let mut rng = sample_rng(cfg.seed, salt, sample.pos);
            let skipped = match decode_sample(&sample, &cfg.transform, &mut rng) {
                Ok(ex) => {
                    counters.samples.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Msg::Example(ex)).is_err() {
                        return; // the loader was dropped
                    }
                    None
                }
                Err(skip) => {
                    let url = list
                        .shards
                        .get(sample.pos.shard)
                        .map_or("", |s| s.url.as_str());
                    counters.skip(skip.reason, url, &sample.key, &skip.detail);
                    Some((sample.pos.index, skip.reason))
                }
            };
            let mut t = tracker.borrow_mut();
            if let Some(p) = t.progress(open_id) {
                p.done += 1;
                if let Some((index, reason)) = skipped {
                    p.skipped.push(index);
                    *p.skipped_by_reason.entry(reason.name().to_owned()).or_insert(0) += 1;
                }
            }
            if !t.flush(&tx) {
                return;
            }
        }
        if tracker.borrow_mut().flush(&tx) {
            let _ = tx.send(Msg::Done);
        }
    }
}

/// A worker's raw samples across its shards (each tagged with its open counter), counting member
/// skips and shard failures.
struct RawStream {
    list: Arc<ShardList>,
    opener: ShardOpener,
    counters: Arc<Counters>,
    tasks: WorkerTasks,
    /// (task's shard, open counter, task's start, reader).
    current: Option<(usize, u64, u64, ShardReader)>,
    /// Resampled mode: a unique id per shard draw (worker in the high bits); 0 otherwise.
    draws: Option<u64>,
    tracker: Rc<RefCell<Tracker>>,
    /// To send finished summaries before blocking on the next task (a fed loader's coordinator
    /// may wait for them before it sends more).
    tx: Sender<Msg>,
}

impl RawStream {
    fn end_shard(&mut self, samples: u64, failed: Option<String>) {
        if let Some((_, open_id, _, reader)) = self.current.take() {
            self.counters
                .bytes
                .fetch_add(reader.bytes_read(), Ordering::Relaxed);
            self.counters.shards.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = self.tracker.borrow_mut().progress(open_id) {
                p.end = Some((samples, failed));
            }
        }
    }

    /// A task that produced no reader (bad shard index, open failed): summarise it at once.
    fn fail_task(&mut self, task: &ShardTask, url: String, error: String) {
        self.counters.fail_shard(FailedShard {
            shard: task.shard,
            url,
            reason: SkipReason::ShardOpenFailed,
            error: error.clone(),
            samples_read: task.start,
        });
        self.counters.shards.fetch_add(1, Ordering::Relaxed);
        let mut t = self.tracker.borrow_mut();
        let id = t.opened(task.shard);
        if let Some(p) = t.progress(id) {
            p.end = Some((task.start, Some(error)));
        }
    }
}

impl Iterator for RawStream {
    type Item = (u64, RawSample);

    fn next(&mut self) -> Option<(u64, RawSample)> {
        loop {
            let Some((shard, open_id, start, reader)) = self.current.as_mut() else {
                if !self.tracker.borrow_mut().flush(&self.tx) {
                    return None;
                }
                let task = self.tasks.next()?;
                if let Some(d) = self.draws.as_mut() {
                    *d += 1;
                }
                let Some(url) = self.list.shards.get(task.shard).map(|s| s.url.clone()) else {
                    let error = format!(
                        "shard {} is outside the shard list of {}; the task names a shard of another spec",
                        task.shard,
                        self.list.len()
                    );
                    self.fail_task(&task, String::new(), error);
                    continue;
                };
                match self.opener.open(&url) {
                    Ok(stream) => {
                        let reader =
                            ShardReader::with_skip(stream, task.shard, task.start, &task.skip);
                        let open_id = self.tracker.borrow_mut().opened(task.shard);
                        self.current = Some((task.shard, open_id, task.start, reader));
                    }
                    Err(e) => self.fail_task(&task, url, e.to_string()),
                }
                continue;
            };
            let (shard, open_id, start) = (*shard, *open_id, *start);
            match reader.next() {
                Some(ShardEvent::Sample(mut s)) => {
                    s.draw = self.draws.unwrap_or(0);
                    if let Some(p) = self.tracker.borrow_mut().progress(open_id) {
                        p.read += 1;
                    }
                    return Some((open_id, s));
                }
                Some(ShardEvent::Member { reason, name }) => {
                    let url = &self.list.shards[shard].url;
                    self.counters
                        .skip(reason, url, &name, "member has no extension")
                }
                Some(ShardEvent::Failed {
                    reason,
                    message,
                    next_index,
                }) => {
                    let url = self.list.shards[shard].url.clone();
                    self.counters.fail_shard(FailedShard {
                        shard,
                        url,
                        reason,
                        error: message.clone(),
                        samples_read: next_index,
                    });
                    // The reader's next event is its end: it ends the task there.
                    // A resume starts at the later of the failure and the task's start.
                    if let Some(p) = self.tracker.borrow_mut().progress(open_id) {
                        let resume = next_index.max(start);
                        p.end = Some((resume, Some(format!("{reason}: {message}"))));
                    }
                }
                None => {
                    let samples = reader.samples_seen();
                    let failed = self
                        .tracker
                        .borrow_mut()
                        .progress(open_id)
                        .and_then(|p| p.end.take())
                        .map_or((samples, None), |e| e);
                    self.end_shard(failed.0, failed.1);
                }
            }
        }
    }
}

/// webdataset's `_shuffle`: fill a buffer (two samples per step until full), yield a random
/// element once `initial` are held (swap-remove), drain at the end.
struct Shuffle<I, T> {
    src: I,
    buf: Vec<T>,
    bufsize: usize,
    initial: usize,
    rng: ChaCha8Rng,
    exhausted: bool,
}

impl<I: Iterator<Item = T>, T> Shuffle<I, T> {
    fn new(src: I, bufsize: usize, initial: usize, rng: ChaCha8Rng) -> Self {
        Self {
            src,
            buf: Vec::new(),
            bufsize,
            initial: initial.min(bufsize),
            rng,
            exhausted: false,
        }
    }

    fn pick(&mut self) -> Option<T> {
        if self.buf.is_empty() {
            return None;
        }
        let k = self.rng.random_range(0..self.buf.len());
        Some(self.buf.swap_remove(k))
    }
}

impl<I: Iterator<Item = T>, T> Iterator for Shuffle<I, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        while !self.exhausted {
            match self.src.next() {
                None => self.exhausted = true,
                Some(s) => {
                    self.buf.push(s);
                    if self.buf.len() < self.bufsize {
                        match self.src.next() {
                            Some(s2) => self.buf.push(s2),
                            None => self.exhausted = true,
                        }
                    }
                    if self.buf.len() >= self.initial {
                        return self.pick();
                    }
                }
            }
        }
        self.pick()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::tests::tar_of;
    use crate::source::RetryPolicy;
    use crate::source::testing::memory_opener;
    use crate::transform::tests::jpeg;
    use std::collections::HashSet;

    /// `shards` shards of `per` samples each in an in-memory store, keys `s{shard}_{i}`.
    fn dataset(shards: usize, per: usize) -> (Arc<ShardList>, ShardOpener) {
        let img = jpeg(12, 10, 3);
        let mut objects = Vec::new();
        for s in 0..shards {
            let names: Vec<(String, Vec<u8>)> = (0..per)
                .flat_map(|i| {
                    [
                        (format!("s{s}_{i}.jpg"), img.clone()),
                        (
                            format!("s{s}_{i}.txt"),
                            format!("caption {s} {i}").into_bytes(),
                        ),
                    ]
                })
                .collect();
            let members: Vec<(&str, &[u8])> = names
                .iter()
                .map(|(n, d)| (n.as_str(), d.as_slice()))
                .collect();
            objects.push((format!("d/{s:03}.tar"), tar_of(&members)));
        }
        let refs: Vec<(&str, Vec<u8>)> = objects
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let (opener, _) = memory_opener(&refs, RetryPolicy::fast(2));
        let spec = format!("memory:///d/{{000..{:03}}}.tar", shards - 1);
        (Arc::new(ShardList::parse(&spec).unwrap()), opener)
    }

    fn cfg(threads: usize, seed: u64) -> LoaderConfig {
        LoaderConfig {
            threads,
            batch_size: 4,
            seed,
            shuffle_buffer: 8,
            shuffle_initial: 4,
            prefetch: 2,
            transform: TransformConfig {
                image_size: 8,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn run(
        list: &Arc<ShardList>,
        opener: &ShardOpener,
        cfg: LoaderConfig,
    ) -> (Vec<Batch>, CountersSnapshot) {
        let loader = Loader::new(list.clone(), opener.clone(), cfg).unwrap();
        let counters = loader.counters();
        let batches: Vec<Batch> = loader.map(|b| b.unwrap()).collect();
        (batches, counters.snapshot())
    }

    #[test]
    fn every_sample_exactly_once_per_epoch() {
        let (list, opener) = dataset(5, 7);
        let (batches, counts) = run(&list, &opener, cfg(3, 1));
        let positions: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
        assert_eq!(positions.len(), 35);
        let unique: HashSet<_> = positions.iter().copied().collect();
        let want: HashSet<_> = (0..5)
            .flat_map(|s| (0..7).map(move |i| SamplePos { shard: s, index: i }))
            .collect();
        assert_eq!(unique, want);
        assert_eq!(
            batches.iter().map(Batch::len).collect::<Vec<_>>(),
            [4, 4, 4, 4, 4, 4, 4, 4, 3]
        );
        assert_eq!(
            (counts.samples, counts.shards, counts.skipped.len()),
            (35, 5, 0)
        );
        let b = &batches[0];
        assert_eq!((b.images.len(), b.tokens.len()), (4 * 3 * 8 * 8, 4 * 77));
        // Keys and tokens travel with their positions.
        for (k, p) in b.keys.iter().zip(&b.positions) {
            assert_eq!(k, &format!("s{}_{}", p.shard, p.index));
        }
    }

    #[test]
    fn same_seed_same_batches_different_seed_different_order() {
        let (list, opener) = dataset(6, 5);
        let (a, _) = run(&list, &opener, cfg(3, 42));
        let (b, _) = run(&list, &opener, cfg(3, 42));
        assert_eq!(a, b);
        let (c, _) = run(&list, &opener, cfg(3, 43));
        let order = |v: &[Batch]| {
            v.iter()
                .flat_map(|b| b.positions.clone())
                .collect::<Vec<_>>()
        };
        assert_ne!(order(&a), order(&c));
        let mut next_epoch = cfg(3, 42);
        next_epoch.epoch = 1;
        let (d, _) = run(&list, &opener, next_epoch);
        assert_ne!(order(&a), order(&d));
        // Without shuffling, one thread reads the shards in spec order.
        let mut plain = cfg(1, 0);
        plain.shuffle = false;
        let (e, _) = run(&list, &opener, plain);
        let o = order(&e);
        assert_eq!(
            &o[..6],
            &(0..5)
                .map(|i| SamplePos { shard: 0, index: i })
                .chain([SamplePos { shard: 1, index: 0 }])
                .collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn explicit_tasks_resume_mid_shard() {
        let (list, opener) = dataset(3, 6);
        let mut c = cfg(2, 0);
        c.order = Order::Explicit(vec![
            ShardTask::from_index(2, 4),
            ShardTask::from_index(0, 5),
        ]);
        let (batches, _) = run(&list, &opener, c);
        let mut got: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
        got.sort();
        let p = |shard, index| SamplePos { shard, index };
        assert_eq!(got, [p(0, 5), p(2, 4), p(2, 5)]);
        let mut bad = cfg(1, 0);
        bad.order = Order::Explicit(vec![ShardTask::new(3)]);
        assert!(matches!(
            Loader::new(list, opener, bad),
            Err(LoaderError::Config(_))
        ));
    }

    #[test]
    fn resampled_mode_draws_shards_with_replacement_by_weight() {
        let (list, opener) = dataset(3, 2);
        let mut list = (*list).clone();
        list.shards[2].weight = 0.000_001;
        let list = Arc::new(list);
        let epoch = Loader::new(list.clone(), opener.clone(), cfg(1, 0))
            .err()
            .unwrap();
        assert!(epoch.to_string().contains("resampled"), "{epoch}");
        let mut c = cfg(2, 9);
        c.order = Order::Resampled {
            shards_per_epoch: Some(20),
        };
        let (batches, counts) = run(&list, &opener, c.clone());
        let positions: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
        assert_eq!((positions.len(), counts.shards), (40, 20));
        let shards: HashSet<usize> = positions.iter().map(|p| p.shard).collect();
        assert_eq!(shards, HashSet::from([0, 1]));
        // Repeated draws of a sample are augmented differently.
        let per = 3 * 8 * 8;
        let mut images: std::collections::HashMap<SamplePos, HashSet<Vec<u32>>> =
            Default::default();
        for b in &batches {
            for (i, p) in b.positions.iter().enumerate() {
                let img = b.images[i * per..(i + 1) * per]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                images.entry(*p).or_default().insert(img);
            }
        }
        assert!(
            images.values().any(|v| v.len() > 1),
            "every repeat had the same crop"
        );
        let (again, _) = run(&list, &opener, c);
        assert_eq!(batches, again);
        // Endless mode keeps going.
        let mut endless = cfg(2, 9);
        endless.order = Order::Resampled {
            shards_per_epoch: None,
        };
        let loader = Loader::new(list, opener, endless).unwrap();
        assert_eq!(
            loader
                .take(30)
                .filter(|b| b.as_ref().unwrap().len() == 4)
                .count(),
            30
        );
    }

    #[test]
    fn more_threads_than_shards_and_drop_mid_epoch() {
        let (list, opener) = dataset(2, 3);
        let (batches, _) = run(&list, &opener, cfg(5, 0));
        assert_eq!(batches.iter().map(Batch::len).sum::<usize>(), 6);
        let mut c = cfg(2, 0);
        c.keep_partial = false;
        let (batches, _) = run(&list, &opener, c);
        // The partial batch's examples are dropped; its shard summaries are not.
        assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), [4, 0]);
        assert_eq!(batches.iter().map(|b| b.finished.len()).sum::<usize>(), 2);
        // Dropping the loader early stops the workers (their sends fail) without hanging.
        let loader = Loader::new(list, opener, cfg(2, 0)).unwrap();
        drop(loader);
    }

    /// Like [`dataset`], but sample `i` of every shard has a zero-byte image when `bad(i)`.
    fn dataset_with_bad(
        shards: usize,
        per: usize,
        bad: impl Fn(usize) -> bool,
    ) -> (Arc<ShardList>, ShardOpener) {
        let img = jpeg(12, 10, 3);
        let objects: Vec<(String, Vec<u8>)> = (0..shards)
            .map(|s| {
                let names: Vec<(String, Vec<u8>)> = (0..per)
                    .flat_map(|i| {
                        let image = if bad(i) { Vec::new() } else { img.clone() };
                        [
                            (format!("s{s}_{i}.jpg"), image),
                            (format!("s{s}_{i}.txt"), b"c".to_vec()),
                        ]
                    })
                    .collect();
                let members: Vec<(&str, &[u8])> = names
                    .iter()
                    .map(|(n, d)| (n.as_str(), d.as_slice()))
                    .collect();
                (format!("d/{s:03}.tar"), tar_of(&members))
            })
            .collect();
        let refs: Vec<(&str, Vec<u8>)> = objects
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let (opener, _) = memory_opener(&refs, RetryPolicy::fast(2));
        let spec = format!("memory:///d/{{000..{:03}}}.tar", shards - 1);
        (Arc::new(ShardList::parse(&spec).unwrap()), opener)
    }

    fn all_positions(batches: &[Batch]) -> Vec<SamplePos> {
        let mut v: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn skip_ranges_are_not_yielded_and_the_summary_accounts_for_every_index() {
        let (list, opener) = dataset_with_bad(2, 8, |i| i == 5);
        let mut c = cfg(2, 0);
        c.order = Order::Explicit(vec![
            ShardTask {
                shard: 1,
                start: 1,
                skip: vec![2..4, 6..7],
            },
            ShardTask::new(0),
        ]);
        let (batches, counts) = run(&list, &opener, c);
        let p = |shard, index| SamplePos { shard, index };
        let want: Vec<SamplePos> = [0, 1, 2, 3, 4, 6, 7]
            .map(|i| p(0, i))
            .into_iter()
            .chain([1, 4, 7].map(|i| p(1, i)))
            .collect();
        assert_eq!(all_positions(&batches), want);
        let mut summaries: Vec<ShardSummary> =
            batches.iter().flat_map(|b| b.finished.clone()).collect();
        summaries.sort_by_key(|s| s.shard);
        let summary = |shard, skipped: Vec<u64>| ShardSummary {
            shard,
            samples: 8,
            skipped_by_reason: [("zero_byte_member".to_owned(), skipped.len() as u64)].into(),
            skipped,
            failed: None,
        };
        // Index 5 is bad in both shards: skipped as bad in each, since neither task excluded it.
        assert_eq!(summaries, [summary(0, vec![5]), summary(1, vec![5])]);
        assert_eq!(counts.skipped, [(SkipReason::ZeroByteMember, 2)].into());
    }

    #[test]
    fn a_summary_follows_the_last_example_of_its_shard() {
        let (list, opener) = dataset_with_bad(6, 5, |i| i % 4 == 1);
        for (threads, shuffle, keep_partial) in
            [(1, false, true), (3, true, true), (2, true, false)]
        {
            let mut c = cfg(threads, 7);
            c.shuffle = shuffle;
            c.keep_partial = keep_partial;
            c.batch_size = 3;
            let (batches, _) = run(&list, &opener, c);
            let mut seen: HashSet<usize> = HashSet::new();
            for (i, b) in batches.iter().enumerate() {
                for s in &b.finished {
                    assert!(seen.insert(s.shard), "shard {} summarised twice", s.shard);
                    assert_eq!((s.samples, &s.skipped, &s.failed), (5, &vec![1], &None));
                    // No example of a finished shard comes later.
                    let later = batches[i + 1..]
                        .iter()
                        .flat_map(|b| &b.positions)
                        .filter(|p| p.shard == s.shard)
                        .count();
                    assert_eq!(later, 0, "shard {} has examples after its summary", s.shard);
                }
            }
            assert_eq!(seen.len(), 6);
            let delivered: usize = batches.iter().map(Batch::len).sum();
            assert_eq!(delivered, 6 * 4);
            // Only the last batch may be empty (it then carries the last summaries).
            let empty: Vec<usize> = (0..batches.len())
                .filter(|&i| batches[i].is_empty())
                .collect();
            assert!(
                empty.is_empty() || empty == [batches.len() - 1],
                "{empty:?}"
            );
        }
        // Without the partial batch, its summaries still arrive, in a batch with no examples.
        let (list, opener) = dataset(2, 3);
        let mut c = cfg(1, 0);
        c.keep_partial = false;
        c.shuffle = false;
        let (batches, _) = run(&list, &opener, c);
        assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), [4, 0]);
        let shards = |b: &Batch| b.finished.iter().map(|s| s.shard).collect::<Vec<_>>();
        assert_eq!(
            (shards(&batches[0]), shards(&batches[1])),
            (vec![0], vec![1])
        );
    }

    #[test]
    fn failed_shards_are_summarised_with_the_failure() {
        let (list, opener) = dataset(2, 3);
        let mut list = (*list).clone();
        list.shards[1].url = "memory:///d/missing.tar".into();
        let mut c = cfg(1, 0);
        c.shuffle = false;
        let (batches, _) = run(&Arc::new(list), &opener, c);
        let summaries: Vec<ShardSummary> =
            batches.iter().flat_map(|b| b.finished.clone()).collect();
        assert_eq!(summaries.len(), 2);
        assert_eq!((summaries[0].shard, summaries[0].samples), (0, 3));
        assert_eq!(summaries[0].failed, None);
        assert_eq!((summaries[1].shard, summaries[1].samples), (1, 0));
        let err = summaries[1].failed.as_deref().unwrap_or_default();
        assert!(err.contains("missing.tar"), "{err}");
    }

    #[test]
    fn fed_tasks_are_taken_as_needed_until_the_channel_closes() {
        let (list, opener) = dataset(10, 3);
        let (tx, rx) = crossbeam_channel::unbounded();
        for s in 0..10 {
            tx.send(ShardTask::new(s)).unwrap();
        }
        // A task for a shard this list does not have: reported, not fatal.
        tx.send(ShardTask::new(99)).unwrap();
        let probe = rx.clone();
        let mut c = cfg(2, 0);
        c.order = Order::Feed(rx);
        c.batch_size = 1;
        c.prefetch = 1;
        c.shuffle = false;
        let loader = Loader::new(list, opener, c).unwrap();
        drop(tx);
        let mut batches = Vec::new();
        let mut summarised = 0;
        for b in loader {
            let b = b.unwrap();
            summarised += b.finished.len();
            // Per worker at most one open task plus one finished task whose summary has not
            // reached us yet (one in its channel of 1, or one being sent): a loader that drained
            // the channel ahead of need would have taken all 11 at once.
            let taken = 11 - probe.len();
            assert!(
                taken <= summarised + 2 * 2,
                "{taken} tasks taken with {summarised} summarised"
            );
            batches.push(b);
        }
        let want: Vec<SamplePos> = (0..10)
            .flat_map(|s| (0..3).map(move |i| SamplePos { shard: s, index: i }))
            .collect();
        assert_eq!(all_positions(&batches), want);
        let mut summaries: Vec<ShardSummary> =
            batches.iter().flat_map(|b| b.finished.clone()).collect();
        summaries.sort_by_key(|s| s.shard);
        assert_eq!(summaries.len(), 11);
        assert!(
            summaries[..10]
                .iter()
                .all(|s| s.samples == 3 && s.failed.is_none())
        );
        let bad = &summaries[10];
        assert_eq!((bad.shard, bad.samples), (99, 0));
        assert!(
            bad.failed
                .as_deref()
                .unwrap_or_default()
                .contains("outside the shard list of 10"),
            "{bad:?}"
        );
        assert_eq!(probe.len(), 0);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let src: Vec<RawSample> = (0..50)
            .map(|i| RawSample {
                key: i.to_string(),
                members: vec![],
                pos: SamplePos { shard: 0, index: i },
                cut_by_duplicate: false,
                draw: 0,
            })
            .collect();
        let out: Vec<u64> = Shuffle::new(src.into_iter(), 10, 3, ChaCha8Rng::seed_from_u64(0))
            .map(|s| s.pos.index)
            .collect();
        let mut sorted = out.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(out, sorted);
    }

    #[test]
    fn powers_of_ten() {
        assert!(is_power_of_ten(1) && is_power_of_ten(10) && is_power_of_ten(1000));
        assert!(!is_power_of_ten(20) && !is_power_of_ten(6) && !is_power_of_ten(0));
    }
}
