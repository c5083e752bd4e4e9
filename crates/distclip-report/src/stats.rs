//! The numbers the summary quotes, computed from the step records.

use std::collections::BTreeSet;

use crate::run::{StepRecord, WorkerStep, worker_ranks};

/// First, last, smallest and largest finite value of a metric, each with its step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Extent {
    pub first: (u64, f64),
    pub last: (u64, f64),
    pub min: (u64, f64),
    pub max: (u64, f64),
}

/// The extent of `value` over `steps` (in step order); `None` when no value is finite.
pub(crate) fn extent(steps: &[StepRecord], value: fn(&StepRecord) -> Option<f64>) -> Option<Extent> {
    let mut it = steps.iter().filter_map(|s| value(s).filter(|v| v.is_finite()).map(|v| (s.step, v)));
    let first = it.next()?;
    let mut e = Extent { first, last: first, min: first, max: first };
    for p in it {
        e.last = p;
        // Strict comparisons keep the earliest step of a tie.
        if p.1 < e.min.1 {
            e.min = p;
        }
        if p.1 > e.max.1 {
            e.max = p;
        }
    }
    Some(e)
}

/// Mean of the finite values; `None` when there are none.
pub(crate) fn mean(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .flatten()
        .filter(|v| v.is_finite())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// One worker's averages over the steps it took part in.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WorkerStats {
    pub id: String,
    pub ranks: BTreeSet<u64>,
    pub steps: usize,
    pub step_s: Option<f64>,
    pub data_s: Option<f64>,
    pub compute_s: Option<f64>,
    pub comm_s: Option<f64>,
    pub samples_per_s: Option<f64>,
}

/// Per worker (by id), mean step, data, compute and communication seconds and samples/s.
pub(crate) fn worker_stats(steps: &[StepRecord]) -> Vec<WorkerStats> {
    worker_ranks(steps)
        .into_iter()
        .map(|(id, ranks)| {
            let mine: Vec<&WorkerStep> = steps.iter().filter_map(|s| s.workers.get(id)).collect();
            let avg = |f: fn(&WorkerStep) -> Option<f64>| mean(mine.iter().map(|w| f(w)));
            WorkerStats {
                id: id.to_string(),
                ranks,
                steps: mine.len(),
                step_s: avg(|w| w.step_s),
                data_s: avg(|w| w.data_s),
                compute_s: avg(|w| w.compute_s),
                comm_s: avg(|w| w.comm_s),
                samples_per_s: avg(|w| w.samples_per_s),
            }
        })
        .collect()
}

/// Samples over seconds summed across steps: the run's throughput weighted by step length,
/// unlike the mean of per-step rates, which a few fast steps can inflate.
pub(crate) fn overall_samples_per_s(steps: &[StepRecord]) -> Option<f64> {
    let (samples, secs) = steps
        .iter()
        .filter_map(|s| Some((s.samples? as f64, s.step_s.filter(|t| t.is_finite() && *t > 0.0)?)))
        .fold((0.0, 0.0), |(a, b), (n, t)| (a + n, b + t));
    (secs > 0.0).then(|| samples / secs)
}
