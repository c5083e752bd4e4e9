//! Which shard tasks an epoch reads and how they are dealt to the decode threads.

use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use distclip_rng::{WeightedDraw, mix};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::LoaderConfig;
use crate::spec::ShardList;

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

/// Split the epoch's shard tasks among the workers.
pub(super) fn plan(list: &ShardList, cfg: &LoaderConfig) -> Vec<WorkerTasks> {
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
        Order::Resampled { shards_per_epoch } => {
            let weights = Arc::new(WeightedDraw::new(list.shards.iter().map(|s| s.weight)));
            (0..n)
            .map(|w| {
                let count = shards_per_epoch.map(|total| total / n + usize::from(w < total % n));
                WorkerTasks::Resampled {
                    rng: Box::new(ChaCha8Rng::seed_from_u64(mix(&[
                        cfg.seed,
                        cfg.epoch,
                        w as u64,
                        0x5245_5341_4d50,
                    ]))),
                    weights: weights.clone(),
                    left: count,
                }
            })
            .collect()
        }
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

pub(super) enum WorkerTasks {
    List(std::vec::IntoIter<ShardTask>),
    Feed(Receiver<ShardTask>),
    Resampled {
        rng: Box<ChaCha8Rng>,
        weights: Arc<WeightedDraw>,
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
            WorkerTasks::Resampled { rng, weights, left } => {
                if let Some(l) = left {
                    if *l == 0 {
                        return None;
                    }
                    *l -= 1;
                }
                weights.pick(rng.random::<f64>()).map(ShardTask::new)
            }
        }
    }
}

