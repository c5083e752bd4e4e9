//! The data plan of an epoch behind one type: the exactly-once ledger, or weighted draws with
//! replacement (`data.resampled`). The machine leases, releases and takes reports through it
//! without matching on the mode; code that only exists for the ledger asks [`DataPlan::ledger`].

use super::MachineConfig;
use distclip_rng::{WeightedDraw, unit};

use crate::ledger::{EpochLedger, LedgerError, LedgerNote, ShardInfo, shard_order};
use distclip_proto::v1::{LeaseResponse, ShardLease, ShardReport};

/// One epoch's plan.
pub(crate) enum DataPlan {
    /// Every sample exactly once per epoch.
    Exact(EpochLedger),
    /// Shards drawn by weight with replacement; the epoch is `data.samples_per_epoch` samples.
    Resampled(Draws),
}

/// Weighted draws with replacement.
pub(crate) struct Draws {
    /// Draws so far in the run (the draw stream continues across epochs).
    count: u64,
    /// The shards' weights (non-positive and non-finite weights count 0).
    weights: WeightedDraw,
}

impl DataPlan {
    /// The plan of `epoch`; resampled draws continue from `draws` made before it.
    pub(crate) fn for_epoch(cfg: &MachineConfig, shards: &[ShardInfo], epoch: u64, draws: u64) -> Self {
        if !cfg.resampled {
            return Self::Exact(EpochLedger::new(epoch, shards, shard_order(shards.len(), cfg.seed, epoch, cfg.shuffle)));
        }
        let weights =
            WeightedDraw::new(shards.iter().map(|s| if s.weight.is_finite() && s.weight > 0.0 { s.weight } else { 0.0 }));
        Self::Resampled(Draws { count: draws, weights })
    }

    /// The ledger, in exact mode.
    pub(crate) fn ledger(&self) -> Option<&EpochLedger> {
        match self {
            Self::Exact(l) => Some(l),
            Self::Resampled(_) => None,
        }
    }

    /// The ledger, in exact mode.
    pub(crate) fn ledger_mut(&mut self) -> Option<&mut EpochLedger> {
        match self {
            Self::Exact(l) => Some(l),
            Self::Resampled(_) => None,
        }
    }

    /// Draws made so far (0 in exact mode).
    pub(crate) fn draws(&self) -> u64 {
        match self {
            Self::Exact(_) => 0,
            Self::Resampled(d) => d.count,
        }
    }

    /// Return what `worker` holds to the pool; the shards released.
    pub(crate) fn release(&mut self, worker: &str) -> Vec<u64> {
        self.ledger_mut().map(|l| l.release(worker)).unwrap_or_default()
    }

    /// Up to `want` shards for `worker`, at most `max_reading` at once.
    pub(crate) fn lease(
        &mut self,
        worker: &str,
        want: u32,
        max_reading: usize,
        (seed, epoch): (u64, u64),
        shards: &[ShardInfo],
    ) -> LeaseResponse {
        let d = match self {
            Self::Exact(l) => {
                let (leases, exhausted) = l.lease(worker, want, max_reading);
                return LeaseResponse { leases, exhausted };
            }
            Self::Resampled(d) => d,
        };
        let mut leases = Vec::new();
        for _ in 0..want.min(max_reading as u32) {
            let mut state = seed ^ epoch.rotate_left(32) ^ d.count.wrapping_mul(0xA24B_AED4_963E_E407);
            let Some(shard) = d.weights.pick(unit(&mut state)) else { break };
            d.count += 1;
            leases.push(ShardLease { shard: shard as u64, url: shards[shard].url.clone(), epoch, skip: Vec::new() });
        }
        LeaseResponse { leases, exhausted: false }
    }

    /// Record a shard report; in resampled mode only a failure is worth a note.
    pub(crate) fn report(
        &mut self,
        worker: &str,
        report: &ShardReport,
        shards: &[ShardInfo],
    ) -> Result<Vec<LedgerNote>, LedgerError> {
        match self {
            Self::Exact(l) => l.report(worker, report),
            Self::Resampled(_) if report.failed.is_empty() => Ok(Vec::new()),
            Self::Resampled(_) => Ok(vec![LedgerNote::FailedShard {
                shard: report.shard,
                url: shards.get(report.shard as usize).map(|s| s.url.clone()).unwrap_or_default(),
                error: report.failed.clone(),
            }]),
        }
    }

    /// Whether the epoch is over: every shard done, or `samples_per_epoch` samples committed.
    pub(crate) fn epoch_done(&self, epoch_samples: u64, samples_per_epoch: Option<u64>) -> bool {
        match self {
            Self::Exact(l) => l.is_complete(),
            Self::Resampled(_) => samples_per_epoch.is_some_and(|n| epoch_samples >= n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(weights: &[f64]) -> Vec<ShardInfo> {
        weights.iter().enumerate().map(|(i, &weight)| ShardInfo { url: format!("/d/{i}.tar"), weight }).collect()
    }

    fn cfg(resampled: bool) -> MachineConfig {
        let config = distclip_config::RunConfig::load(None, &["data.train=/d/{0..2}.tar".into()]).unwrap();
        MachineConfig { resampled, ..MachineConfig::from_run(&config, None) }
    }

    #[test]
    fn resampled_draws_follow_the_weights_and_continue_across_epochs() {
        let s = shards(&[0.0, 1.0, f64::NAN]);
        let mut plan = DataPlan::for_epoch(&cfg(true), &s, 0, 0);
        assert!(plan.ledger().is_none() && plan.release("a").is_empty());
        let r = plan.lease("a", 5, 3, (7, 0), &s);
        // Only shard 1 has a usable weight; `want` is capped by `max_reading`.
        assert_eq!(r.leases.iter().map(|l| l.shard).collect::<Vec<_>>(), [1, 1, 1]);
        assert!(!r.exhausted && r.leases[0].url == "/d/1.tar");
        assert_eq!(plan.draws(), 3);
        assert_eq!(DataPlan::for_epoch(&cfg(true), &s, 1, plan.draws()).draws(), 3);
        assert!(!plan.epoch_done(9, Some(10)) && plan.epoch_done(10, Some(10)) && !plan.epoch_done(10, None));
        // A report matters only when the shard failed.
        let ok = ShardReport { shard: 1, samples: 4, ..Default::default() };
        assert_eq!(plan.report("a", &ok, &s), Ok(vec![]));
        let bad = ShardReport { shard: 1, failed: "HTTP 404".into(), ..Default::default() };
        assert_eq!(
            plan.report("a", &bad, &s),
            Ok(vec![LedgerNote::FailedShard { shard: 1, url: "/d/1.tar".into(), error: "HTTP 404".into() }])
        );
    }

    #[test]
    fn exact_mode_is_the_ledger() {
        let s = shards(&[1.0, 1.0]);
        let mut plan = DataPlan::for_epoch(&cfg(false), &s, 0, 5);
        assert_eq!(plan.draws(), 0);
        let r = plan.lease("a", 1, 2, (7, 0), &s);
        assert_eq!(r.leases.len(), 1);
        assert_eq!(plan.ledger().unwrap().held_by("a"), [r.leases[0].shard]);
        assert_eq!(plan.release("a"), [r.leases[0].shard]);
        assert!(!plan.epoch_done(100, Some(1)), "the ledger decides, not the sample count");
    }
}
