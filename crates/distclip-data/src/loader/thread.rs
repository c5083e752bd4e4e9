//! What one decode thread runs: read its shard tasks one after another, pass raw samples
//! through its shuffle buffer, decode them, and send examples and shard summaries in order.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::Sender;
use distclip_rng::mix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::counters::{Counters, FailedShard};
use super::order::{ShardTask, WorkerTasks};
use super::shuffle::Shuffle;
use super::{LoaderConfig, Msg, ShardSummary};
use crate::samples::{RawSample, ShardEvent, ShardReader, SkipReason};
use crate::source::ShardOpener;
use crate::spec::ShardList;
use crate::transform::{decode_sample, sample_rng};

/// One decode thread's share of the epoch.
pub(super) struct DecodeThread {
    /// Its number: which share of the epoch's order it reads, and its seeds.
    pub(super) id: usize,
    pub(super) list: Arc<ShardList>,
    pub(super) opener: ShardOpener,
    pub(super) cfg: LoaderConfig,
    pub(super) counters: Arc<Counters>,
    pub(super) tasks: WorkerTasks,
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

impl DecodeThread {
    pub(super) fn run(self, tx: Sender<Msg>) {
        let DecodeThread {
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

