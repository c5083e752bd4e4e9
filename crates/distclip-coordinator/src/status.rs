//! What the status page and `GET /api/status` show: the machine's monitoring snapshot plus the
//! recent history the machine does not keep (the curves and the latest events), rendered as one
//! JSON document. The page (`status.html`) draws it and polls for the next one.

use crate::metrics::RunMetrics;
use serde_json::{Value, json};
use std::collections::VecDeque;

/// Points kept for the curves: enough for a long run at one point per step, thinned beyond.
const MAX_POINTS: usize = 2000;
/// Events kept for the page.
const MAX_EVENTS: usize = 50;

/// One committed step on the curves.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    step: u64,
    loss: f64,
    lr: f64,
    logit_scale: f64,
    samples_per_s: f64,
}

/// The recent history, fed with the lines the coordinator appends to `metrics.jsonl` and
/// `events.jsonl` (and, after a restart, seeded from their tails).
#[derive(Debug, Default)]
pub struct Recent {
    points: VecDeque<Point>,
    /// Keep every `stride`-th step once the curve is full: a long run keeps its whole shape.
    stride: u64,
    events: VecDeque<Value>,
}

impl Recent {
    /// Take one `metrics.jsonl` line (evaluation lines and lines without a loss are ignored).
    /// A step at or before the last point means a commit was taken back: the curve is cut there.
    pub fn metrics_line(&mut self, line: &Value) {
        let (Some(step), Some(loss)) = (line["step"].as_u64(), line["loss"].as_f64()) else {
            return;
        };
        if line.get("eval").is_some() {
            return;
        }
        self.rewind(step);
        let stride = self.stride.max(1);
        if step % stride != 0 {
            return;
        }
        self.points.push_back(Point {
            step,
            loss,
            lr: line["lr"].as_f64().unwrap_or(f64::NAN),
            logit_scale: line["logit_scale"].as_f64().unwrap_or(f64::NAN),
            samples_per_s: line["samples_per_s"].as_f64().unwrap_or(f64::NAN),
        });
        if self.points.len() > MAX_POINTS {
            // Halve the resolution: keep the points on the doubled stride.
            self.stride = stride * 2;
            let s = self.stride;
            self.points.retain(|p| p.step % s == 0);
        }
    }

    /// Steps from `step` on were taken back (their metrics lines dropped): cut the curves.
    pub fn rewind(&mut self, step: u64) {
        while self.points.back().is_some_and(|p| p.step >= step) {
            self.points.pop_back();
        }
    }

    /// Take one `events.jsonl` line.
    pub fn event(&mut self, event: Value) {
        self.events.push_back(event);
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Seed from the run directory's files after a restart (their last lines).
    pub fn seed(&mut self, metrics: &str, events: &str) {
        for l in metrics.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
            self.metrics_line(&l);
        }
        let lines: Vec<&str> = events.lines().collect();
        for l in lines[lines.len().saturating_sub(MAX_EVENTS)..].iter() {
            if let Ok(v) = serde_json::from_str::<Value>(l) {
                self.event(v);
            }
        }
    }
}

/// JSON numbers cannot be NaN or infinite: those become null.
fn num(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// The document `GET /api/status` serves and the page draws. `eta_seconds` and the smoothed
/// `samples_per_second` come from the console's progress tracker (wall clock between commits).
pub fn status_json(m: &RunMetrics, recent: &Recent, eta_seconds: Option<f64>, samples_per_second: Option<f64>) -> Value {
    let workers: Vec<Value> = m
        .per_worker
        .iter()
        .map(|w| {
            let last = w.last_step.as_ref();
            json!({
                "worker_id": w.worker_id,
                "rank": w.rank,
                "address": w.address,
                "device": w.device,
                "activity": w.activity,
                "step": w.step,
                "last_heartbeat_seconds": num(w.last_heartbeat_age_seconds),
                "step_seconds": last.map(|s| num(s.step_seconds)),
                "data_wait_seconds": last.map(|s| num(s.data_wait_seconds)),
                "compute_seconds": last.map(|s| num(s.compute_seconds)),
                "communication_seconds": last.map(|s| num(s.communication_seconds)),
                "samples_per_second": last.map(|s| num(s.samples_per_second)),
                "skipped_samples": w.skipped_samples,
            })
        })
        .collect();
    let column = |f: fn(&Point) -> f64| recent.points.iter().map(|p| num(f(p))).collect::<Vec<_>>();
    let last = m.last_step.as_ref();
    json!({
        "run_id": m.run_id,
        "state": m.state,
        "step": m.step,
        "planned_steps": m.planned_steps,
        "epoch": m.epoch,
        "planned_epochs": m.planned_epochs,
        "epoch_samples_done": m.epoch_samples_done,
        "epoch_samples_expected": m.epoch_samples_expected,
        "samples_total": m.samples_total,
        "samples_per_second": num(samples_per_second.unwrap_or(m.samples_per_second)),
        "eta_seconds": eta_seconds.map(num),
        "loss": last.map(|l| num(l.loss)),
        "lr": last.map(|l| num(l.learning_rate)),
        "logit_scale": last.map(|l| num(l.logit_scale)),
        "world_size": m.world_size,
        "quorum_id": m.quorum_id,
        "steps_dropped": m.steps_dropped_total,
        "skipped_samples_by_reason": m.skipped_samples_by_reason,
        "failed_shards": m.failed_shards,
        "workers": workers,
        "series": {
            "step": recent.points.iter().map(|p| p.step).collect::<Vec<_>>(),
            "loss": column(|p| p.loss),
            "lr": column(|p| p.lr),
            "logit_scale": column(|p| p.logit_scale),
            "samples_per_second": column(|p| p.samples_per_s),
        },
        "events": recent.events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64, loss: f64) -> Value {
        json!({"step": step, "epoch": 0, "loss": loss, "lr": 1e-3, "logit_scale": 14.0, "samples_per_s": 100.0})
    }

    #[test]
    fn curves_follow_commits_thin_out_and_cut_at_a_taken_back_step() {
        let mut r = Recent::default();
        for s in 0..5 {
            r.metrics_line(&line(s, 5.0 - s as f64));
        }
        r.metrics_line(&json!({"step": 4, "eval": {"zeroshot": {}}}));
        assert_eq!(r.points.iter().map(|p| p.step).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        // Step 3 committed again after a restart: the old 3 and 4 go.
        r.metrics_line(&line(3, 9.0));
        assert_eq!(r.points.iter().map(|p| (p.step, p.loss)).collect::<Vec<_>>(), [(0, 5.0), (1, 4.0), (2, 3.0), (3, 9.0)]);
        for s in 4..(MAX_POINTS as u64 + 10) {
            r.metrics_line(&line(s, 1.0));
        }
        assert!(r.points.len() <= MAX_POINTS && r.points.len() > MAX_POINTS / 2 - 10, "{}", r.points.len());
        assert!(r.points.iter().all(|p| p.step % 2 == 0), "thinned to every second step");
        for i in 0..(MAX_EVENTS + 5) {
            r.event(json!({"kind": "join", "i": i}));
        }
        assert_eq!(r.events.len(), MAX_EVENTS);
        assert_eq!(r.events[0]["i"], 5, "the oldest go first");
    }

    #[test]
    fn the_document_has_every_field_the_page_reads() {
        let mut r = Recent::default();
        r.seed(
            &[line(0, 2.0), json!({"step": 1, "loss": 1.5, "lr": null})].iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
            "{\"kind\":\"join\",\"worker_id\":\"w0\"}\nnot json\n",
        );
        let m = RunMetrics {
            run_id: "run-s".into(),
            state: "training",
            step: 2,
            planned_steps: 10,
            epoch: 0,
            planned_epochs: 1,
            samples_total: 16,
            epoch_samples_done: 16,
            epoch_samples_expected: 80,
            last_step: None,
            samples_per_second: 8.0,
            workers: 1,
            world_size: 1,
            quorum_id: 1,
            steps_dropped_total: 0,
            skipped_samples_by_reason: Default::default(),
            failed_shards: 0,
            per_worker: vec![crate::metrics::WorkerMetrics {
                worker_id: "w0".into(),
                rank: Some(0),
                step: 2,
                last_heartbeat_age_seconds: 0.5,
                last_step: None,
                address: "127.0.0.1:9".into(),
                device: "flex".into(),
                activity: "training".into(),
                skipped_samples: 0,
            }],
        };
        let doc = status_json(&m, &r, Some(12.0), None);
        assert_eq!(doc["series"]["step"], json!([0, 1]));
        assert_eq!(doc["series"]["loss"], json!([2.0, 1.5]));
        assert_eq!(doc["series"]["lr"], json!([1e-3, null]), "a missing value travels as null");
        assert_eq!(doc["events"], json!([{"kind": "join", "worker_id": "w0"}]));
        assert_eq!(doc["workers"][0]["address"], "127.0.0.1:9");
        assert_eq!(doc["workers"][0]["step_seconds"], Value::Null);
        assert_eq!((doc["eta_seconds"].as_f64(), doc["samples_per_second"].as_f64()), (Some(12.0), Some(8.0)));
        assert_eq!(doc["loss"], Value::Null);
    }
}
