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

mod counters;
mod order;
mod shuffle;
mod thread;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use crossbeam_channel::{Receiver, bounded};

pub use counters::{Counters, CountersSnapshot, FailedShard};
pub use order::{Order, ShardTask};

use crate::samples::SamplePos;
use crate::source::ShardOpener;
use crate::spec::ShardList;
use crate::transform::{Example, TransformConfig};

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
    /// `skipped` counted by reason ([`crate::SkipReason::name`]); the counts sum to its length.
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

/// What a decode thread sends the loader, in order.
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
        let plan = order::plan(&list, &cfg);
        let mut receivers = Vec::with_capacity(cfg.threads);
        for (w, tasks) in plan.into_iter().enumerate() {
            let (tx, rx) = bounded(cfg.prefetch.max(1));
            receivers.push(rx);
            let worker = thread::DecodeThread {
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

