//! What the machine remembers only for monitoring, and [`Machine::metrics`], the snapshot that
//! `/metrics` renders. Kept apart from the decisions: nothing here is persisted or changes an
//! answer, and the counters describe this coordinator process (Prometheus handles restarts).

use super::Machine;
use crate::membership::Membership;
use crate::metrics::{LastStep, RunMetrics, WorkerMetrics, WorkerStep};
use distclip_proto::v1::StepMetrics;
use std::collections::BTreeMap;
use std::time::Instant;

/// Last-step values and counters for monitoring.
#[derive(Debug, Default)]
pub(super) struct Telemetry {
    last_step: Option<LastStep>,
    /// Last committed step of each worker that voted in one, pruned to live members.
    workers: BTreeMap<String, WorkerStep>,
    steps_dropped: u64,
    /// Skipped samples by reason of the epochs that ended (the ledger counts the current one).
    skipped_before: BTreeMap<String, u64>,
    /// The most samples ever reported: a commit undone after a restart must not make the
    /// samples counter go down.
    samples_high: u64,
    /// Samples each worker skipped as bad in committed steps.
    skipped_by_worker: BTreeMap<String, u64>,
}

/// A worker's samples per second in a step (0 when it reported no step time).
pub(super) fn samples_per_s(m: &StepMetrics) -> f64 {
    if m.step_s > 0.0 { f64::from(m.samples) / m.step_s } else { 0.0 }
}

/// Drop the entries of workers that are no longer members: one walk over both maps, which
/// are sorted by the same ids.
fn keep_members<V>(map: &mut BTreeMap<String, V>, members: &Membership) {
    let mut ids = members.ids().peekable();
    map.retain(|id, _| {
        while ids.next_if(|m| *m < id.as_str()).is_some() {}
        ids.peek() == Some(&id.as_str())
    });
}

impl Telemetry {
    /// A committed step: `votes` in rank order with what each measured and how many samples
    /// it skipped.
    pub(super) fn record_step<'a>(
        &mut self,
        votes: impl IntoIterator<Item = (&'a str, &'a StepMetrics, u64)>,
        members: &Membership,
    ) {
        let mut first = true;
        for (id, m, skipped) in votes {
            if first {
                self.last_step = Some(LastStep {
                    loss: m.loss,
                    learning_rate: m.lr,
                    logit_scale: m.logit_scale,
                    grad_norm: m.grad_norm,
                });
                first = false;
            }
            let step = WorkerStep {
                step_seconds: m.step_s,
                data_wait_seconds: m.data_s,
                compute_seconds: m.compute_s,
                communication_seconds: m.comm_s,
                samples_per_second: samples_per_s(m),
            };
            // Look up before inserting: a thousand workers' ids are not copied every step.
            match self.workers.get_mut(id) {
                Some(w) => *w = step,
                None => {
                    self.workers.insert(id.to_owned(), step);
                }
            }
            match self.skipped_by_worker.get_mut(id) {
                Some(n) => *n += skipped,
                None => {
                    self.skipped_by_worker.insert(id.to_owned(), skipped);
                }
            }
        }
        keep_members(&mut self.workers, members);
        keep_members(&mut self.skipped_by_worker, members);
    }

    /// A vote ended without a commit.
    pub(super) fn step_dropped(&mut self) {
        self.steps_dropped += 1;
    }

    /// The epoch's ledger is about to be replaced: keep its skip counts.
    pub(super) fn epoch_ended(&mut self, skipped: BTreeMap<String, u64>) {
        for (reason, n) in skipped {
            *self.skipped_before.entry(reason).or_default() += n;
        }
    }

    /// The samples counter is about to go down (a commit is undone): remember its top.
    pub(super) fn samples_going_down(&mut self, samples_seen: u64) {
        self.samples_high = self.samples_high.max(samples_seen);
    }
}

impl Machine {
    /// The run's monitoring numbers at `now` (what `/metrics` shows).
    pub fn metrics(&self, now: Instant) -> RunMetrics {
        let t = &self.telemetry;
        let ranks: BTreeMap<&str, u32> = self
            .round
            .as_ref()
            .map(|r| r.quorum.members.iter().map(|m| (m.worker_id.as_str(), m.rank)).collect())
            .unwrap_or_default();
        let (done, expected) = match self.data.ledger() {
            // Shard totals become known as shards are read to the end; sizes.json (or
            // data.samples_per_epoch) knows the whole epoch from the start.
            Some(l) => {
                let (done, known) = l.progress();
                (done, known.max(self.cfg.samples_per_epoch.unwrap_or(0)))
            }
            None => (self.epoch_samples, self.cfg.samples_per_epoch.unwrap_or(0)),
        };
        let mut skipped = t.skipped_before.clone();
        if let Some(l) = self.data.ledger() {
            for (reason, n) in l.skipped_by_reason() {
                *skipped.entry(reason).or_default() += n;
            }
        }
        RunMetrics {
            run_id: self.run_id.clone(),
            state: self.phase.name(),
            step: self.step,
            planned_steps: self.cfg.total_steps,
            epoch: self.epoch,
            planned_epochs: self.cfg.epochs,
            samples_total: self.samples_seen.max(t.samples_high),
            epoch_samples_done: done,
            epoch_samples_expected: expected,
            last_step: t.last_step.clone(),
            samples_per_second: self.samples_per_s,
            workers: self.members.len() as u64,
            world_size: self.round.as_ref().map_or(0, |r| r.quorum.members.len() as u64),
            quorum_id: self.quorum_id,
            steps_dropped_total: t.steps_dropped,
            skipped_samples_by_reason: skipped,
            failed_shards: self.data.ledger().map_or(0, |l| l.failed().len() as u64),
            per_worker: self
                .members
                .in_join_order()
                .into_iter()
                .map(|m| WorkerMetrics {
                    worker_id: m.worker_id.clone(),
                    rank: ranks.get(m.worker_id.as_str()).copied(),
                    step: m.step,
                    last_heartbeat_age_seconds: now.saturating_duration_since(m.last_seen).as_secs_f64(),
                    last_step: t.workers.get(&m.worker_id).cloned(),
                    address: m.peer_address.clone(),
                    device: m.device.clone(),
                    activity: m.state.clone(),
                    skipped_samples: t.skipped_by_worker.get(&m.worker_id).copied().unwrap_or(0),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Machine, MachineConfig};
    use crate::ledger::ShardInfo;
    use distclip_proto::v1::{
        CommitRequest, JoinRequest, LeaseRequest, QuorumRequest, QuorumResponse, ShardIndices,
        ShardReport, StepMetrics,
    };
    use std::time::{Duration, Instant};

    fn machine(t: Instant) -> Machine {
        let cfg = MachineConfig { epochs: 2, total_steps: 40, ..super::super::tests::cfg() };
        let shards = (0..2).map(|i| ShardInfo { url: format!("/d/{i}.tar"), weight: 1.0 }).collect();
        Machine::new(cfg, String::new(), "run-m".into(), shards, t)
    }

    fn join(m: &mut Machine, id: &str, t: Instant) {
        let req = JoinRequest { worker_id: id.into(), peer_address: format!("{id}:1"), ..Default::default() };
        m.join(&req, t).unwrap();
    }

    fn quorum(m: &mut Machine, ids: &[&str], step: u64, t: Instant) -> QuorumResponse {
        let tickets: Vec<u64> = ids
            .iter()
            .map(|id| {
                let req = QuorumRequest { worker_id: (*id).into(), step, epoch: m.epoch(), has_data: true, commit_quorum: 0, known_quorum: 0 };
                m.request_quorum(&req, t).unwrap()
            })
            .collect();
        m.poll_quorum(ids[0], tickets[0]).unwrap().expect("quorum formed")
    }

    fn vote(m: &mut Machine, id: &str, q: &QuorumResponse, ok: bool, consumed: Vec<ShardIndices>, reports: Vec<ShardReport>, t: Instant) {
        let n: usize = consumed.iter().map(|g| g.indices.len()).sum();
        let rank = q.quorum.as_ref().unwrap().members.iter().position(|x| x.worker_id == id).unwrap();
        m.vote(
            CommitRequest {
                worker_id: id.into(),
                quorum_id: q.quorum.as_ref().unwrap().quorum_id,
                step: q.step,
                ok,
                error: if ok { String::new() } else { "collective failed".into() },
                consumed,
                shard_reports: reports,
                metrics: Some(StepMetrics {
                    loss: 2.0 + rank as f64,
                    lr: 1e-3,
                    logit_scale: 14.0,
                    grad_norm: 0.5,
                    samples: n as u32,
                    data_s: 0.125,
                    compute_s: 0.25,
                    comm_s: 0.0625 * (rank + 1) as f64,
                    step_s: 0.5 * (rank + 1) as f64,
                    params_checksum: String::new(),
                }),
                non_finite: false,
            },
            t,
        );
    }

    #[test]
    fn metrics_follow_joins_commits_drops_and_skips() {
        let t = Instant::now();
        let mut m = machine(t);
        let s = m.metrics(t);
        assert_eq!((s.state, s.workers, s.step, s.samples_total), ("waiting", 0, 0, 0));
        assert!(s.last_step.is_none() && s.per_worker.is_empty());

        join(&mut m, "a", t);
        join(&mut m, "b", t);
        for id in ["a", "b"] {
            let req = LeaseRequest { worker_id: id.into(), epoch: 0, want: 1, shard_reports: vec![], fresh: false };
            m.lease(&req, t).unwrap();
        }
        // A failed vote is a dropped step.
        let q = quorum(&mut m, &["a", "b"], 0, t);
        vote(&mut m, "a", &q, false, vec![], vec![], t);
        vote(&mut m, "b", &q, true, vec![], vec![], t);
        let s = m.metrics(t);
        assert_eq!(s.steps_dropped_total, 1);
        assert_eq!(s.step, 0);
        assert!(s.last_step.is_none());

        // Then a commit: a reads shard 0 (4 samples, one bad), b shard 1 (3 samples, one bad
        // without a reason).
        let q = quorum(&mut m, &["a", "b"], 0, t);
        let mut bad = ShardReport { shard: 0, epoch: 0, samples: 4, skipped: vec![3], ..Default::default() };
        bad.skipped_by_reason.insert("decode".into(), 1);
        vote(&mut m, "a", &q, true, vec![ShardIndices { shard: 0, indices: vec![0, 1, 2] }], vec![bad], t);
        let unexplained = ShardReport { shard: 1, epoch: 0, samples: 3, skipped: vec![2], ..Default::default() };
        vote(&mut m, "b", &q, true, vec![ShardIndices { shard: 1, indices: vec![0, 1] }], vec![unexplained], t);
        let s = m.metrics(t + Duration::from_millis(1500));
        assert_eq!(s.step, 1);
        assert_eq!(s.samples_total, 5);
        assert_eq!(s.steps_dropped_total, 1);
        assert_eq!(s.quorum_id, 2, "the retry after a failed vote gets a new quorum id");
        assert_eq!((s.workers, s.world_size), (2, 2));
        assert_eq!((s.planned_steps, s.planned_epochs), (40, 2));
        let last = s.last_step.as_ref().unwrap();
        assert_eq!((last.loss, last.learning_rate, last.logit_scale, last.grad_norm), (2.0, 1e-3, 14.0, 0.5));
        // The global batch over the slowest worker's time (b's 1.0 s).
        assert_eq!(s.samples_per_second, 5.0);
        assert_eq!(s.skipped_samples_by_reason, [("decode".to_string(), 1), ("unknown".to_string(), 1)].into());
        assert_eq!((s.epoch_samples_done, s.epoch_samples_expected), (7, 7));
        let b = &s.per_worker[1];
        assert_eq!((b.worker_id.as_str(), b.rank, b.step), ("b", Some(1), 1));
        assert_eq!(b.last_heartbeat_age_seconds, 1.5);
        let bs = b.last_step.as_ref().unwrap();
        assert_eq!((bs.step_seconds, bs.data_wait_seconds, bs.compute_seconds, bs.communication_seconds), (1.0, 0.125, 0.25, 0.125));
        assert_eq!(bs.samples_per_second, 2.0);
        assert_eq!(s.per_worker[0].last_step.as_ref().unwrap().samples_per_second, 6.0);
        assert_eq!((s.per_worker[0].skipped_samples, b.skipped_samples), (1, 1));
        assert_eq!((b.address.as_str(), s.per_worker[0].address.as_str()), ("b:1", "a:1"));

        // The epoch ends: its skips stay counted under the next epoch's fresh ledger.
        let q = quorum(&mut m, &["a", "b"], 1, t);
        assert_eq!(q.epoch, 1);
        let s = m.metrics(t);
        assert_eq!(s.epoch, 1);
        assert_eq!(s.skipped_samples_by_reason.values().sum::<u64>(), 2);
        assert_eq!(s.samples_total, 5);

        // A worker that leaves disappears from the per-worker rows.
        m.leave(&distclip_proto::v1::LeaveRequest { worker_id: "b".into(), reason: "done".into() }, t);
        let s = m.metrics(t);
        assert_eq!(s.workers, 1);
        assert_eq!(s.per_worker.len(), 1);
        assert_eq!(s.per_worker[0].worker_id, "a");
        assert_eq!(s.state, "waiting", "below cluster.min_workers");
    }
}
