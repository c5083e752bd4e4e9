//! The per-epoch shard ledger: which shard is leased to whom, which sample positions were
//! committed, which were skipped as bad, how many samples each shard holds, and which shards
//! failed. It is the evidence that an epoch consumed every sample exactly once.
//!
//! Rules:
//! - Shards are handed out in the epoch's order (permuted by `seed + epoch` when shuffling).
//!   A shard returned by a dead or leaving holder goes to the front of the queue, and its next
//!   lease carries `skip` = committed ∪ skipped, so only uncommitted samples are read again.
//! - A lease counts against the holder's `shards_per_worker` until the holder reports the shard
//!   read to the end; the holder keeps it (for commits of samples still in its buffers) until
//!   the shard is complete or the holder goes away.
//! - A commit may only carry positions of shards the voter holds, below the shard's total when
//!   known, and neither committed nor skipped before (exactly once).
//! - A shard is complete when it failed, or when its total is known and committed ∪ skipped is
//!   exactly `[0, total)`. The epoch is complete when every shard is.

use crate::ranges::{RangeSet, runs};
use distclip_proto::v1::{IndexRange, ShardIndices, ShardLease, ShardReport};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A check's first failing position, if any, and the message for it.
type Problem<'a> = (Option<u64>, &'a dyn Fn(u64) -> String);

/// One shard of the expanded dataset spec.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardInfo {
    /// URL or path.
    pub url: String,
    /// Sampling weight for resampled mode.
    pub weight: f64,
}

/// A commit the ledger refuses: positions it never leased to the voter, or already consumed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct LedgerError(pub String);

/// The persistent facts about one shard in one epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardState {
    /// Index in the expanded spec.
    pub shard: u64,
    /// Samples in the shard, once a holder reported reading it to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Positions consumed by committed steps.
    #[serde(default)]
    pub committed: RangeSet,
    /// Positions skipped as bad (they count as consumed).
    #[serde(default)]
    pub skipped: RangeSet,
    /// Skip counts by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_by_reason: BTreeMap<String, u64>,
    /// Why the shard could not be read to the end, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl ShardState {
    /// Whether anything is known of the shard (snapshots keep only these).
    pub fn has_progress(&self) -> bool {
        self.total.is_some()
            || !self.committed.is_empty()
            || !self.skipped.is_empty()
            || self.failed.is_some()
    }

    /// Whether nothing is left to read in this shard this epoch.
    pub fn is_complete(&self) -> bool {
        if self.failed.is_some() {
            return true;
        }
        match self.total {
            Some(t) => {
                let mut done = self.committed.clone();
                done.union_with(&self.skipped);
                done.is_exactly(t)
            }
            None => false,
        }
    }

    /// committed ∪ skipped: what the next holder must not yield again.
    pub fn done(&self) -> RangeSet {
        let mut done = self.committed.clone();
        done.union_with(&self.skipped);
        done
    }
}

/// The ledger state that survives a coordinator restart (leases do not: workers re-lease).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerState {
    /// The epoch.
    pub epoch: u64,
    /// Shards with any progress (others are untouched).
    pub shards: Vec<ShardState>,
    /// Positions accepted by commits, counted one by one: equals the sum of the committed
    /// sets' sizes exactly when no position entered twice.
    pub committed_samples: u64,
    /// Commits refused for carrying unknown or already consumed positions.
    pub refused_commits: u64,
}

#[derive(Debug, Clone, Default)]
struct Lease {
    holder: String,
    /// Still being read: counts against the holder's `shards_per_worker`.
    reading: bool,
}

/// A change to the ledger that a caller should log.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerNote {
    /// A shard was reported unreadable.
    FailedShard {
        /// Shard index.
        shard: u64,
        /// Its URL.
        url: String,
        /// The reader's error.
        error: String,
    },
    /// A report disagreed with what the ledger knew (ignored where it conflicts).
    Conflict {
        /// Shard index.
        shard: u64,
        /// What disagreed.
        message: String,
    },
}

/// The exactly-once ledger of one epoch.
#[derive(Debug, Clone)]
pub struct EpochLedger {
    epoch: u64,
    shards: Vec<ShardState>,
    urls: Vec<String>,
    leases: BTreeMap<u64, Lease>,
    /// Shards to hand out, front first.
    queue: VecDeque<u64>,
    committed_samples: u64,
    refused_commits: u64,
    /// Shards changed since the last [`EpochLedger::take_changes`]: what the journal appends.
    changed: BTreeSet<u64>,
    /// Made since the last `take_changes`: the journal's line replaces the whole ledger.
    fresh: bool,
}

/// The ledger changes since the last journal line: the shards that changed, whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerChanges {
    /// The ledger's state with only the changed shards in `shards`.
    pub state: LedgerState,
    /// The ledger is new (a new epoch): replace the old one instead of updating it.
    pub fresh: bool,
}

/// The epoch's shard order: a Fisher-Yates permutation seeded by `seed + epoch`, or spec order.
pub fn shard_order(num_shards: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<u64> {
    let mut order: Vec<u64> = (0..num_shards as u64).collect();
    if shuffle {
        let mut state = seed.wrapping_add(epoch);
        for i in (1..order.len()).rev() {
            let j = distclip_rng::below(&mut state, i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

impl EpochLedger {
    /// A fresh epoch over `shards`, in `order`.
    pub fn new(epoch: u64, shards: &[ShardInfo], order: Vec<u64>) -> Self {
        Self {
            epoch,
            shards: (0..shards.len() as u64)
                .map(|shard| ShardState {
                    shard,
                    ..Default::default()
                })
                .collect(),
            urls: shards.iter().map(|s| s.url.clone()).collect(),
            leases: BTreeMap::new(),
            queue: order.into(),
            committed_samples: 0,
            refused_commits: 0,
            changed: BTreeSet::new(),
            fresh: true,
        }
    }

    /// Rebuild from persisted state. Shards with progress but not complete go first, so a
    /// resumed epoch finishes what it started before opening new shards.
    pub fn restore(
        state: &LedgerState,
        shards: &[ShardInfo],
        order: Vec<u64>,
    ) -> Result<Self, LedgerError> {
        let mut ledger = Self::new(state.epoch, shards, Vec::new());
        for s in &state.shards {
            let slot = ledger.shards.get_mut(s.shard as usize).ok_or_else(|| {
                LedgerError(format!(
                    "shard {} is not in the dataset of {} shards",
                    s.shard,
                    shards.len()
                ))
            })?;
            *slot = s.clone();
        }
        ledger.committed_samples = state.committed_samples;
        ledger.refused_commits = state.refused_commits;
        // Restored from what is on disk: later journal lines update it.
        ledger.fresh = false;
        let (started, fresh): (Vec<u64>, Vec<u64>) = order
            .into_iter()
            .partition(|&i| ledger.shards[i as usize].has_progress());
        ledger.queue = started
            .into_iter()
            .chain(fresh)
            .filter(|&i| !ledger.shards[i as usize].is_complete())
            .collect();
        Ok(ledger)
    }

    /// What survives a restart.
    pub fn state(&self) -> LedgerState {
        LedgerState {
            epoch: self.epoch,
            shards: self
                .shards
                .iter()
                .filter(|s| s.has_progress())
                .cloned()
                .collect(),
            committed_samples: self.committed_samples,
            refused_commits: self.refused_commits,
        }
    }

    /// The changes since the last call (the shards changed, and the counters), and forget them.
    pub fn take_changes(&mut self) -> LedgerChanges {
        let changed = std::mem::take(&mut self.changed);
        LedgerChanges {
            state: LedgerState {
                epoch: self.epoch,
                shards: changed
                    .into_iter()
                    .filter_map(|i| self.shards.get(i as usize).cloned())
                    .collect(),
                committed_samples: self.committed_samples,
                refused_commits: self.refused_commits,
            },
            fresh: std::mem::take(&mut self.fresh),
        }
    }

    /// The epoch this ledger accounts for.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// One shard's state.
    pub fn shard(&self, shard: u64) -> Option<&ShardState> {
        self.shards.get(shard as usize)
    }

    /// Who holds `shard`, if anyone.
    pub fn holder(&self, shard: u64) -> Option<&str> {
        self.leases.get(&shard).map(|l| l.holder.as_str())
    }

    /// Shards held by `worker` (reading or not).
    pub fn held_by(&self, worker: &str) -> Vec<u64> {
        self.leases
            .iter()
            .filter(|(_, l)| l.holder == worker)
            .map(|(&s, _)| s)
            .collect()
    }

    /// Lease up to `want` more shards to `worker`, never letting it read more than `max_reading`
    /// at once. Returns the leases and whether no unleased shard is left.
    pub fn lease(
        &mut self,
        worker: &str,
        want: u32,
        max_reading: usize,
    ) -> (Vec<ShardLease>, bool) {
        let reading = self
            .leases
            .values()
            .filter(|l| l.holder == worker && l.reading)
            .count();
        let room = max_reading.saturating_sub(reading).min(want as usize);
        let mut out = Vec::new();
        while out.len() < room {
            let Some(shard) = self.queue.pop_front() else {
                break;
            };
            let state = &self.shards[shard as usize];
            // Stale queue entries: finished or held since they were queued.
            if state.is_complete() || self.leases.contains_key(&shard) {
                continue;
            }
            let skip = state
                .done()
                .ranges()
                .iter()
                .map(|&(start, end)| IndexRange { start, end })
                .collect();
            self.leases.insert(
                shard,
                Lease {
                    holder: worker.to_string(),
                    reading: true,
                },
            );
            out.push(ShardLease {
                shard,
                url: self.urls[shard as usize].clone(),
                epoch: self.epoch,
                skip,
            });
        }
        (out, self.queue.is_empty())
    }

    /// Return every shard `worker` holds to the front of the queue (it died or left).
    pub fn release(&mut self, worker: &str) -> Vec<u64> {
        let held = self.held_by(worker);
        for &shard in held.iter().rev() {
            self.leases.remove(&shard);
            if !self.shards[shard as usize].is_complete() {
                self.queue.push_front(shard);
            }
        }
        held
    }

    /// Record a shard report from `worker`. Idempotent: a repeated report changes nothing.
    pub fn report(
        &mut self,
        worker: &str,
        report: &ShardReport,
    ) -> Result<Vec<LedgerNote>, LedgerError> {
        let shard = report.shard;
        let Some(state) = self.shards.get_mut(shard as usize) else {
            return Err(LedgerError(format!(
                "report for shard {shard}, but the dataset has {} shards",
                self.urls.len()
            )));
        };
        match self.leases.get(&shard) {
            Some(l) if l.holder == worker => {}
            // A repeat of a report that completed the shard (it came with a commit and again
            // with a lease, say): nothing left to record.
            None if state.is_complete() => return Ok(Vec::new()),
            _ => {
                return Err(LedgerError(format!(
                    "worker {worker} reported shard {shard} without holding its lease (it was returned to the pool; lease again)"
                )));
            }
        }
        self.changed.insert(shard);
        let mut notes = Vec::new();
        if !report.failed.is_empty() {
            if state.failed.is_none() {
                notes.push(LedgerNote::FailedShard {
                    shard,
                    url: self.urls[shard as usize].clone(),
                    error: report.failed.clone(),
                });
            }
            state.failed = Some(report.failed.clone());
        } else {
            match state.total {
                None if report.samples < state.committed.end() => {
                    notes.push(LedgerNote::Conflict {
                        shard,
                        message: format!(
                            "reported {} samples but position {} was committed; total ignored",
                            report.samples,
                            state.committed.end() - 1
                        ),
                    })
                }
                None => state.total = Some(report.samples),
                Some(t) if t != report.samples => notes.push(LedgerNote::Conflict {
                    shard,
                    message: format!(
                        "reported {} samples, an earlier report said {t}; keeping {t}",
                        report.samples
                    ),
                }),
                Some(_) => {}
            }
            let mut fresh = 0;
            for &i in &report.skipped {
                if state.committed.contains(i) {
                    notes.push(LedgerNote::Conflict {
                        shard,
                        message: format!("position {i} reported skipped but it was committed"),
                    });
                } else if state.total.is_some_and(|t| i >= t) {
                    notes.push(LedgerNote::Conflict {
                        shard,
                        message: format!("skipped position {i} is past the shard's end"),
                    });
                } else if !state.skipped.contains(i) {
                    state.skipped.insert(i);
                    fresh += 1;
                }
            }
            // Reasons are counts without indices: add them only when the report skipped
            // something new, so a repeated report does not count twice.
            if fresh > 0 {
                for (reason, n) in &report.skipped_by_reason {
                    *state.skipped_by_reason.entry(reason.clone()).or_default() += n;
                }
            }
        }
        if let Some(l) = self.leases.get_mut(&shard) {
            l.reading = false;
        }
        if state.is_complete() {
            self.leases.remove(&shard);
        }
        Ok(notes)
    }

    /// Check one step's consumed positions (all voters together) without changing anything.
    pub fn check(&self, voters: &[(&str, &[ShardIndices])]) -> Result<u64, LedgerError> {
        // Ranges, not sets: a batch's positions in a shard are mostly consecutive, so each one
        // extends the last range (a thousand voters commit tens of thousands of positions).
        let mut seen: BTreeMap<u64, RangeSet> = BTreeMap::new();
        let mut n = 0u64;
        for (worker, consumed) in voters {
            for group in consumed.iter() {
                let shard = group.shard;
                let Some(state) = self.shards.get(shard as usize) else {
                    return Err(LedgerError(format!(
                        "{worker} committed shard {shard}, but the dataset has {} shards",
                        self.urls.len()
                    )));
                };
                if self.holder(shard) != Some(worker) {
                    return Err(LedgerError(format!(
                        "{worker} committed positions of shard {shard} it does not hold (holder: {})",
                        self.holder(shard).unwrap_or("nobody")
                    )));
                }
                let seen = seen.entry(shard).or_default();
                for (start, end) in runs(&group.indices) {
                    if start == end {
                        return Err(LedgerError(format!(
                            "{worker} committed position {start} of shard {shard}, which no shard has"
                        )));
                    }
                    // The run's first bad position, reported as a check of one index at a time
                    // would: the least position, and at a tie the first check listed here.
                    let total = state.total.unwrap_or(0);
                    let problems: [Problem<'_>; 4] = [
                        (state.total.filter(|&t| t < end).map(|t| t.max(start)), &|i| {
                            format!("{worker} committed position {i} of shard {shard}, past its {total} samples")
                        }),
                        (state.committed.first_in(start, end), &|i| {
                            format!("{worker} committed position {i} of shard {shard} a second time")
                        }),
                        (state.skipped.first_in(start, end), &|i| {
                            format!("{worker} committed position {i} of shard {shard}, which was skipped as bad")
                        }),
                        (seen.first_in(start, end), &|i| {
                            format!("position {i} of shard {shard} appears twice in step's batches")
                        }),
                    ];
                    // `min_by_key` keeps the first of equal keys: the order above breaks ties.
                    if let Some((i, message)) =
                        problems.iter().filter_map(|(at, message)| at.map(|i| (i, message))).min_by_key(|&(i, _)| i)
                    {
                        return Err(LedgerError(message(i)));
                    }
                    seen.insert_range(start, end);
                    n += end - start;
                }
            }
        }
        Ok(n)
    }

    /// Refuse a commit (counted for the audit).
    pub fn note_refused(&mut self) {
        self.refused_commits += 1;
    }

    /// Enter checked positions. Call [`EpochLedger::check`] first.
    pub fn apply(&mut self, consumed: &[ShardIndices]) {
        for group in consumed {
            let Some(state) = self.shards.get_mut(group.shard as usize) else {
                continue;
            };
            self.changed.insert(group.shard);
            for (start, end) in runs(&group.indices) {
                state.committed.insert_range(start, end);
                self.committed_samples += end - start;
            }
            if state.is_complete() {
                self.leases.remove(&group.shard);
            }
        }
    }

    /// Take positions back out (a persisted commit that no live worker applied).
    pub fn unapply(&mut self, positions: &[(u64, RangeSet)]) {
        for (shard, set) in positions {
            if let Some(state) = self.shards.get_mut(*shard as usize) {
                self.changed.insert(*shard);
                state.committed.subtract(set);
                self.committed_samples = self.committed_samples.saturating_sub(set.len());
                if !self.queue.contains(shard) && !self.leases.contains_key(shard) {
                    self.queue.push_front(*shard);
                }
            }
        }
    }

    /// Whether every shard is complete.
    pub fn is_complete(&self) -> bool {
        self.shards.iter().all(ShardState::is_complete)
    }

    /// Samples committed or skipped, and the sum of known totals.
    pub fn progress(&self) -> (u64, u64) {
        let done = self
            .shards
            .iter()
            .map(|s| s.committed.len() + s.skipped.len())
            .sum();
        let total = self.shards.iter().filter_map(|s| s.total).sum();
        (done, total)
    }

    /// Samples skipped as bad this epoch, by the reasons the workers reported. Positions
    /// reported without a reason (or more than the reasons account for) count as `unknown`.
    pub fn skipped_by_reason(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for s in self.shards.iter().filter(|s| !s.skipped.is_empty()) {
            let mut explained = 0u64;
            for (reason, n) in &s.skipped_by_reason {
                *out.entry(reason.clone()).or_default() += n;
                explained += n;
            }
            let rest = s.skipped.len().saturating_sub(explained);
            if rest > 0 {
                *out.entry("unknown".into()).or_default() += rest;
            }
        }
        out
    }

    /// URLs and errors of failed shards.
    pub fn failed(&self) -> Vec<String> {
        self.shards
            .iter()
            .filter_map(|s| {
                s.failed
                    .as_ref()
                    .map(|e| format!("{}: {e}", self.urls[s.shard as usize]))
            })
            .collect()
    }

    /// The audit written to `ledger/epoch-N.json`.
    pub fn audit(&self) -> serde_json::Value {
        let mut exact_all = true;
        let mut no_overlap = true;
        let mut shards = Vec::new();
        let (mut committed, mut skipped, mut total) = (0u64, 0u64, 0u64);
        let mut untouched = 0usize;
        for s in &self.shards {
            if !s.has_progress() {
                // Nothing to say about a shard nobody read (an epoch cut short by max_steps
                // leaves most of a large dataset so): counted, not listed.
                untouched += 1;
                continue;
            }
            let overlap = s.committed.intersection_len(&s.skipped);
            no_overlap &= overlap == 0;
            let exact = s.failed.is_none()
                && overlap == 0
                && s.total.is_some_and(|t| s.done().is_exactly(t));
            if s.failed.is_none() && !exact {
                exact_all = false;
            }
            committed += s.committed.len();
            skipped += s.skipped.len();
            total += s.total.unwrap_or(0);
            shards.push(serde_json::json!({
                "shard": s.shard,
                "url": self.urls[s.shard as usize],
                "total": s.total,
                "committed": s.committed.len(),
                "skipped": s.skipped.len(),
                "skipped_by_reason": s.skipped_by_reason,
                "failed": s.failed,
                "exactly_once": exact,
            }));
        }
        let counted_once = committed == self.committed_samples;
        serde_json::json!({
            "epoch": self.epoch,
            "complete": self.is_complete(),
            "exactly_once": exact_all && counted_once && self.is_complete(),
            // What holds for an epoch cut short too: no position was counted twice or both
            // committed and skipped.
            "at_most_once": no_overlap && counted_once,
            "shards_total": self.shards.len(),
            "shards_untouched": untouched,
            "samples_total": total,
            "samples_committed": committed,
            "samples_skipped": skipped,
            "commit_positions_accepted": self.committed_samples,
            "refused_commits": self.refused_commits,
            "failed_shards": self.failed(),
            "shards": shards,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: usize) -> Vec<ShardInfo> {
        (0..n)
            .map(|i| ShardInfo {
                url: format!("/d/{i}.tar"),
                weight: 1.0,
            })
            .collect()
    }

    fn idx(shard: u64, indices: impl IntoIterator<Item = u64>) -> ShardIndices {
        ShardIndices {
            shard,
            indices: indices.into_iter().collect(),
        }
    }

    fn report(shard: u64, samples: u64, skipped: Vec<u64>) -> ShardReport {
        let mut r = ShardReport {
            shard,
            epoch: 0,
            samples,
            skipped: skipped.clone(),
            ..Default::default()
        };
        if !skipped.is_empty() {
            r.skipped_by_reason
                .insert("decode".into(), skipped.len() as u64);
        }
        r
    }

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = shard_order(50, 7, 0, true);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(
            a,
            shard_order(50, 7, 0, true),
            "same seed + epoch, same order"
        );
        assert_ne!(a, shard_order(50, 7, 1, true), "next epoch, new order");
        assert_eq!(
            shard_order(50, 6, 1, true),
            shard_order(50, 7, 0, true),
            "seed + epoch"
        );
        assert_eq!(shard_order(4, 7, 0, false), vec![0, 1, 2, 3]);
    }

    #[test]
    fn leases_respect_want_and_shards_per_worker() {
        let mut l = EpochLedger::new(0, &shards(5), shard_order(5, 0, 0, false));
        let (got, exhausted) = l.lease("a", 3, 2);
        assert_eq!(got.iter().map(|g| g.shard).collect::<Vec<_>>(), vec![0, 1]);
        assert!(!exhausted);
        assert_eq!(got[0].url, "/d/0.tar");
        assert!(got[0].skip.is_empty());
        // Still reading both: no room.
        assert!(l.lease("a", 1, 2).0.is_empty());
        // Reporting shard 0 read to the end frees a slot, but "a" still holds it for commits.
        l.report("a", &report(0, 4, vec![])).unwrap();
        assert_eq!(l.holder(0), Some("a"));
        let (got, _) = l.lease("a", 5, 2);
        assert_eq!(got.iter().map(|g| g.shard).collect::<Vec<_>>(), vec![2]);
        let (got, exhausted) = l.lease("b", 5, 2);
        assert_eq!(got.iter().map(|g| g.shard).collect::<Vec<_>>(), vec![3, 4]);
        assert!(exhausted);
    }

    #[test]
    fn a_dead_holders_shard_is_released_with_skip_ranges() {
        let mut l = EpochLedger::new(0, &shards(3), shard_order(3, 0, 0, false));
        l.lease("a", 1, 2);
        l.apply(&[idx(0, [0, 1, 2, 5])]);
        l.report("a", &report(0, 10, vec![7])).unwrap();
        assert_eq!(l.release("a"), vec![0]);
        assert_eq!(l.holder(0), None);
        // The returned shard comes before untouched ones, with committed ∪ skipped to skip.
        let (got, _) = l.lease("b", 1, 2);
        assert_eq!(got[0].shard, 0);
        let skip: Vec<(u64, u64)> = got[0].skip.iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(skip, vec![(0, 3), (5, 6), (7, 8)]);
        // The new holder finishes it: complete, lease closed.
        assert!(!l.shard(0).unwrap().is_complete());
        l.apply(&[idx(0, [3, 4, 6, 8, 9])]);
        assert!(l.shard(0).unwrap().is_complete());
        assert_eq!(l.holder(0), None);
    }

    #[test]
    fn exactly_once_refuses_double_and_unknown_positions() {
        let mut l = EpochLedger::new(0, &shards(2), shard_order(2, 0, 0, false));
        l.lease("a", 1, 1);
        l.lease("b", 1, 1);
        let a = [idx(0, [0, 1])];
        assert_eq!(l.check(&[("a", &a)]).unwrap(), 2);
        l.apply(&a);
        let e = l.check(&[("a", &[idx(0, [1, 2])])]).unwrap_err();
        assert!(e.0.contains("position 1 of shard 0 a second time"), "{e}");
        let e = l.check(&[("a", &[idx(1, [0])])]).unwrap_err();
        assert!(
            e.0.contains("does not hold") && e.0.contains("holder: b"),
            "{e}"
        );
        let e = l.check(&[("a", &[idx(9, [0])])]).unwrap_err();
        assert!(e.0.contains("2 shards"), "{e}");
        let e = l.check(&[("b", &[idx(1, [3, 3])])]).unwrap_err();
        assert!(e.0.contains("twice"), "{e}");
        l.report("a", &report(0, 3, vec![])).unwrap();
        let e = l.check(&[("a", &[idx(0, [3])])]).unwrap_err();
        assert!(e.0.contains("past its 3 samples"), "{e}");
    }

    #[test]
    fn epoch_completes_with_skips_and_failures_and_audits() {
        let mut l = EpochLedger::new(0, &shards(3), shard_order(3, 0, 0, false));
        l.lease("a", 3, 3);
        l.apply(&[idx(0, [0, 1, 3]), idx(1, [0])]);
        l.report("a", &report(0, 4, vec![2])).unwrap();
        // A repeated report changes nothing (reasons are not counted twice).
        l.report("a", &report(0, 4, vec![2])).unwrap();
        assert!(l.shard(0).unwrap().is_complete());
        assert_eq!(l.shard(0).unwrap().skipped_by_reason["decode"], 1);
        let notes = l
            .report(
                "a",
                &ShardReport {
                    shard: 2,
                    failed: "HTTP 404".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(
            matches!(&notes[0], LedgerNote::FailedShard { shard: 2, error, .. } if error == "HTTP 404")
        );
        assert!(!l.is_complete());
        l.report("a", &report(1, 1, vec![])).unwrap();
        assert!(l.is_complete());
        let audit = l.audit();
        assert_eq!(audit["exactly_once"], true);
        assert_eq!(audit["samples_committed"], 4);
        assert_eq!(audit["samples_skipped"], 1);
        assert_eq!(audit["samples_total"], 5);
        assert_eq!(audit["failed_shards"][0], "/d/2.tar: HTTP 404");
        assert_eq!(audit["shards"][0]["exactly_once"], true);
    }

    #[test]
    fn skipped_samples_are_counted_by_reason() {
        let mut l = EpochLedger::new(0, &shards(2), shard_order(2, 0, 0, false));
        assert!(l.skipped_by_reason().is_empty());
        l.lease("a", 2, 2);
        l.report("a", &report(0, 4, vec![1, 2])).unwrap();
        // A worker that does not say why: the positions still count, as `unknown`.
        l.report("a", &ShardReport { skipped: vec![0], ..report(1, 3, vec![]) }).unwrap();
        let by_reason = l.skipped_by_reason();
        assert_eq!(by_reason.get("decode"), Some(&2));
        assert_eq!(by_reason.get("unknown"), Some(&1));
        assert_eq!(by_reason.len(), 2);
    }

    #[test]
    fn conflicting_reports_are_noted_not_applied() {
        let mut l = EpochLedger::new(0, &shards(1), vec![0]);
        l.lease("a", 1, 1);
        l.apply(&[idx(0, [0, 5])]);
        let notes = l.report("a", &report(0, 3, vec![])).unwrap();
        assert!(
            matches!(&notes[0], LedgerNote::Conflict { message, .. } if message.contains("position 5"))
        );
        assert_eq!(l.shard(0).unwrap().total, None);
        l.report("a", &report(0, 6, vec![0])).unwrap();
        assert_eq!(l.shard(0).unwrap().total, Some(6));
        assert!(
            !l.shard(0).unwrap().skipped.contains(0),
            "a committed position cannot become skipped"
        );
        let e = l.report("b", &report(0, 6, vec![])).unwrap_err();
        assert!(e.0.contains("without holding"), "{e}");
    }

    #[test]
    fn restore_puts_started_shards_first_and_unapply_returns_positions() {
        let mut l = EpochLedger::new(3, &shards(4), vec![2, 0, 3, 1]);
        l.lease("a", 2, 2);
        l.apply(&[idx(0, [0, 1])]);
        let state = l.state();
        assert_eq!(state.shards.len(), 1);
        let mut r = EpochLedger::restore(&state, &shards(4), vec![2, 0, 3, 1]).unwrap();
        assert_eq!(r.epoch(), 3);
        let (got, _) = r.lease("b", 4, 4);
        assert_eq!(
            got.iter().map(|g| g.shard).collect::<Vec<_>>(),
            vec![0, 2, 3, 1]
        );
        assert_eq!(got[0].skip, vec![IndexRange { start: 0, end: 2 }]);
        r.unapply(&[(0, RangeSet::from_ranges([(1, 2)]))]);
        assert_eq!(r.shard(0).unwrap().committed.ranges(), &[(0, 1)]);
        assert_eq!(r.state().committed_samples, 1);
        let bad = LedgerState {
            shards: vec![ShardState {
                shard: 9,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(EpochLedger::restore(&bad, &shards(4), vec![]).is_err());
    }

    #[test]
    fn a_position_twice_in_one_step_is_refused_and_consecutive_ones_count_once_each() {
        let mut l = EpochLedger::new(0, &shards(2), vec![0, 1]);
        l.lease("a", 2, 2);
        let ok = [idx(0, [0, 1, 2]), idx(0, [3]), idx(1, [5, 4])];
        assert_eq!(l.check(&[("a", &ok[..])]), Ok(6));
        let twice = [idx(0, [0, 1, 2]), idx(0, [1])];
        let e = l.check(&[("a", &twice[..])]).unwrap_err();
        assert!(e.0.contains("position 1 of shard 0 appears twice"), "{e:?}");
    }

    #[test]
    fn a_run_of_positions_reports_its_first_bad_one() {
        let mut l = EpochLedger::new(0, &shards(1), vec![0]);
        l.lease("a", 1, 1);
        l.apply(&[idx(0, [6])]);
        l.report("a", &report(0, 0, vec![4])).unwrap();
        // Positions 3..=8 are checked as one run: 4 (skipped) comes before 6 (committed).
        let e = l.check(&[("a", &[idx(0, 3..9)])]).unwrap_err();
        assert!(e.0.contains("position 4 of shard 0, which was skipped"), "{e}");
        let e = l.check(&[("a", &[idx(0, 5..9)])]).unwrap_err();
        assert!(e.0.contains("position 6 of shard 0 a second time"), "{e}");
        let e = l.check(&[("a", &[idx(0, [u64::MAX])])]).unwrap_err();
        assert!(e.0.contains("which no shard has"), "{e}");
        assert_eq!(l.check(&[("a", &[idx(0, [7, 8, 9, 0, 1])])]), Ok(5));
    }
}
