//! A `metrics.jsonl` line as the machine hands it out. The step's figures are a JSON object;
//! the per-worker breakdown stays typed until the line is written: built as `serde_json`
//! values, a thousand workers' entries cost milliseconds with the coordinator's lock held.

use serde::Serialize;
use serde_json::Value;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsLine {
    /// The line's fields (`step`, `loss`, ...; `eval` on evaluation lines): always an object.
    #[serde(flatten)]
    pub fields: Value,
    /// Per-worker figures of a step, written as `"workers": {id: {...}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Workers>,
}

impl MetricsLine {
    /// A line of `fields` alone (an evaluation's).
    pub fn new(fields: Value) -> Self {
        Self { fields, workers: None }
    }

    /// Set `time` (seconds since the epoch) on the line.
    pub fn set_time(&mut self, time: f64) {
        if let Value::Object(o) = &mut self.fields {
            o.insert("time".into(), time.into());
        }
    }
}

/// A step's workers in rank order; serialised as a map from worker id to its figures.
#[derive(Debug, Clone, Default)]
pub struct Workers(pub Vec<(String, WorkerLine)>);

impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(id, w)| (id, w)))
    }
}

/// One worker's figures for a step (the field names are `metrics.jsonl`'s).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerLine {
    /// Seconds in collectives.
    pub comm_s: f64,
    /// Seconds in forward and backward.
    pub compute_s: f64,
    /// Seconds waiting for the batch.
    pub data_s: f64,
    /// Rank in the step's quorum.
    pub rank: usize,
    /// Samples the worker contributed.
    pub samples: u32,
    /// `samples / step_s`.
    pub samples_per_s: f64,
    /// The worker's step time.
    pub step_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_fields_then_workers_by_id() {
        let w = |rank, samples| WorkerLine {
            comm_s: 0.25,
            compute_s: 0.5,
            data_s: 0.0,
            rank,
            samples,
            samples_per_s: 8.0,
            step_s: 1.0,
        };
        let mut line = MetricsLine {
            fields: serde_json::json!({"step": 3, "loss": 2.5}),
            workers: Some(Workers(vec![("b".into(), w(0, 8)), ("a".into(), w(1, 4))])),
        };
        line.set_time(7.0);
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"loss":2.5,"step":3,"time":7.0,"workers":{"b":{"comm_s":0.25,"compute_s":0.5,"data_s":0.0,"rank":0,"samples":8,"samples_per_s":8.0,"step_s":1.0},"a":{"comm_s":0.25,"compute_s":0.5,"data_s":0.0,"rank":1,"samples":4,"samples_per_s":8.0,"step_s":1.0}}}"#
        );
        let eval = MetricsLine::new(serde_json::json!({"step": 3, "eval": {}}));
        assert_eq!(serde_json::to_string(&eval).unwrap(), r#"{"eval":{},"step":3}"#);
    }
}
