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
//!
//! Memory stays flat over any number of shards: each worker holds one open shard, its shuffle
//! buffer, and `prefetch` decoded examples; samples are never materialised up front.

use std::collections::BTreeMap;
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
#[derive(Debug, Clone, PartialEq)]
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
}

/// One shard to read, from sample `start` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardTask {
    /// Index in the shard list.
    pub shard: usize,
    /// First sample index to yield.
    pub start: u64,
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
        })
    }

    /// The live counters (samples, skips by reason, failed shards).
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The next example in the deterministic interleave, or `None` when all workers are done.
    fn next_example(&mut self) -> Result<Option<Example>, LoaderError> {
        let n = self.receivers.len();
        for _ in 0..=n {
            if !self.live.iter().any(|l| *l) {
                return Ok(None);
            }
            let w = self.next;
            self.next = (self.next + 1) % n;
            if !self.live[w] {
                continue;
            }
            match self.receivers[w].recv() {
                Ok(Msg::Example(ex)) => return Ok(Some(ex)),
                Ok(Msg::Done) => self.live[w] = false,
                Err(_) => return Err(LoaderError::WorkerDied { worker: w }),
            }
        }
        // Every pass either yields or retires a worker, so this is reached only when none is live.
        Ok(None)
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
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
        };
        while batch.len() < self.batch_size {
            match self.next_example() {
                Ok(Some(ex)) => {
                    batch.images.extend_from_slice(&ex.image);
                    batch.tokens.extend_from_slice(&ex.tokens);
                    batch.positions.push(ex.pos);
                    batch.keys.push(ex.key);
                }
                Ok(None) => break,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        let full = batch.len() == self.batch_size;
        (full || (self.keep_partial && !batch.is_empty())).then_some(Ok(batch))
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
            deal(
                order
                    .into_iter()
                    .map(|shard| ShardTask { shard, start: 0 })
                    .collect(),
                n,
            )
        }
        Order::Explicit(tasks) => deal(tasks.clone(), n),
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
                Some(ShardTask { shard, start: 0 })
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
        let raw = RawStream {
            list: list.clone(),
            opener,
            counters: counters.clone(),
            draws: matches!(tasks, WorkerTasks::Resampled { .. }).then_some((id as u64) << 40),
            tasks,
            current: None,
        };
        let (bufsize, initial) = if cfg.shuffle {
            (cfg.shuffle_buffer.max(1), cfg.shuffle_initial)
        } else {
            (1, 1)
        };
        let rng = ChaCha8Rng::seed_from_u64(mix(&[cfg.seed, cfg.epoch, id as u64, 0x5348_5546]));
        for sample in Shuffle::new(raw, bufsize, initial, rng) {
            let salt = if sample.draw == 0 {
                cfg.epoch
            } else {
                mix(&[cfg.epoch, sample.draw])
            };
            let mut rng = sample_rng(cfg.seed, salt, sample.pos);
            match decode_sample(&sample, &cfg.transform, &mut rng) {
                Ok(ex) => {
                    counters.samples.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Msg::Example(ex)).is_err() {
                        return; // the loader was dropped
                    }
                }
                Err(skip) => {
                    let url = list
                        .shards
                        .get(sample.pos.shard)
                        .map_or("", |s| s.url.as_str());
                    counters.skip(skip.reason, url, &sample.key, &skip.detail);
                }
            }
        }
        let _ = tx.send(Msg::Done);
    }
}

/// A worker's raw samples across its shards, counting member skips and shard failures.
struct RawStream {
    list: Arc<ShardList>,
    opener: ShardOpener,
    counters: Arc<Counters>,
    tasks: WorkerTasks,
    current: Option<(ShardTask, ShardReader, u64)>,
    /// Resampled mode: a unique id per shard draw (worker in the high bits); 0 otherwise.
    draws: Option<u64>,
}

impl RawStream {
    fn finish_shard(&mut self) {
        if let Some((_, reader, counted)) = self.current.take() {
            self.counters
                .bytes
                .fetch_add(reader.bytes_read() - counted, Ordering::Relaxed);
            self.counters.shards.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Iterator for RawStream {
    type Item = RawSample;

    fn next(&mut self) -> Option<RawSample> {
        loop {
            let Some((task, reader, _)) = self.current.as_mut() else {
                let task = self.tasks.next()?;
                if let Some(d) = self.draws.as_mut() {
                    *d += 1;
                }
                let url = &self.list.shards[task.shard].url;
                match self.opener.open(url) {
                    Ok(stream) => {
                        self.current =
                            Some((task, ShardReader::new(stream, task.shard, task.start), 0))
                    }
                    Err(e) => {
                        self.counters.fail_shard(FailedShard {
                            shard: task.shard,
                            url: url.clone(),
                            reason: SkipReason::ShardOpenFailed,
                            error: e.to_string(),
                            samples_read: task.start,
                        });
                        self.counters.shards.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            };
            let url = &self.list.shards[task.shard].url;
            match reader.next() {
                Some(ShardEvent::Sample(mut s)) => {
                    s.draw = self.draws.unwrap_or(0);
                    return Some(s);
                }
                Some(ShardEvent::Member { reason, name }) => {
                    self.counters
                        .skip(reason, url, &name, "member has no extension")
                }
                Some(ShardEvent::Failed {
                    reason,
                    message,
                    next_index,
                }) => self.counters.fail_shard(FailedShard {
                    shard: task.shard,
                    url: url.clone(),
                    reason,
                    error: message,
                    samples_read: next_index,
                }),
                None => self.finish_shard(),
            }
        }
    }
}

/// webdataset's `_shuffle`: fill a buffer (two samples per step until full), yield a random
/// element once `initial` are held (swap-remove), drain at the end.
struct Shuffle<I> {
    src: I,
    buf: Vec<RawSample>,
    bufsize: usize,
    initial: usize,
    rng: ChaCha8Rng,
    exhausted: bool,
}

impl<I: Iterator<Item = RawSample>> Shuffle<I> {
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

    fn pick(&mut self) -> Option<RawSample> {
        if self.buf.is_empty() {
            return None;
        }
        let k = self.rng.random_range(0..self.buf.len());
        Some(self.buf.swap_remove(k))
    }
}

impl<I: Iterator<Item = RawSample>> Iterator for Shuffle<I> {
    type Item = RawSample;

    fn next(&mut self) -> Option<RawSample> {
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
            ShardTask { shard: 2, start: 4 },
            ShardTask { shard: 0, start: 5 },
        ]);
        let (batches, _) = run(&list, &opener, c);
        let mut got: Vec<SamplePos> = batches.iter().flat_map(|b| b.positions.clone()).collect();
        got.sort();
        let p = |shard, index| SamplePos { shard, index };
        assert_eq!(got, [p(0, 5), p(2, 4), p(2, 5)]);
        let mut bad = cfg(1, 0);
        bad.order = Order::Explicit(vec![ShardTask { shard: 3, start: 0 }]);
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
        assert_eq!(batches.len(), 1);
        // Dropping the loader early stops the workers (their sends fail) without hanging.
        let loader = Loader::new(list, opener, cfg(2, 0)).unwrap();
        drop(loader);
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
