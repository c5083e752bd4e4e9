//! The console line: one line per `log.every_steps` steps that reads the same in a terminal
//! and in a log file (no carriage returns, no colours):
//!
//! `step 120/480 (25.0%) | epoch 2/12 | 1.2k samples/s | ETA 2m13s | loss 3.4120 | lr 1.20e-3 | 2 workers`
//!
//! Throughput and ETA come from wall-clock time between committed steps (quorum, data waits
//! and commits included), smoothed, not from the workers' own step timings.

use serde_json::Value;
use std::time::Instant;

/// Smoothing of the step time (exponential moving average weight of the newest step).
const ALPHA: f64 = 0.1;

/// Tracks committed steps and formats the console line.
#[derive(Debug)]
pub struct Progress {
    total_steps: u64,
    epochs: u64,
    every: u64,
    last: Option<Instant>,
    step_s: Option<f64>,
    samples_per_s: Option<f64>,
}

impl Progress {
    /// `total_steps` 0 means unknown (no ETA); a line every `every` steps.
    pub fn new(total_steps: u64, epochs: u64, every: u64) -> Self {
        Self { total_steps, epochs, every: every.max(1), last: None, step_s: None, samples_per_s: None }
    }

    /// Take one `metrics.jsonl` line; returns the console line when one is due.
    pub fn observe(&mut self, metrics: &Value, now: Instant) -> Option<String> {
        if let Some(eval) = metrics.get("eval") {
            return Some(eval_line(metrics["step"].as_u64(), eval));
        }
        let step = metrics["step"].as_u64()? + 1;
        if let Some(prev) = self.last {
            let dt = now.saturating_duration_since(prev).as_secs_f64();
            let samples = metrics["samples"].as_f64().unwrap_or(0.0);
            let ema = |old: Option<f64>, x: f64| Some(old.map_or(x, |o| o + ALPHA * (x - o)));
            self.step_s = ema(self.step_s, dt);
            if dt > 0.0 {
                self.samples_per_s = ema(self.samples_per_s, samples / dt);
            }
        }
        self.last = Some(now);
        let last = self.total_steps > 0 && step >= self.total_steps;
        if step % self.every != 0 && !last && step != 1 {
            return None;
        }
        let mut parts = Vec::new();
        parts.push(if self.total_steps > 0 {
            format!("step {step}/{} ({:.1}%)", self.total_steps, 100.0 * step as f64 / self.total_steps as f64)
        } else {
            format!("step {step}")
        });
        if let Some(e) = metrics["epoch"].as_u64() {
            parts.push(format!("epoch {}/{}", e + 1, self.epochs));
        }
        if let Some(r) = self.samples_per_s {
            parts.push(format!("{} samples/s", si(r)));
        }
        if let Some(eta) = self.eta_seconds(step) {
            parts.push(format!("ETA {}", duration(eta)));
        }
        if let Some(l) = metrics["loss"].as_f64() {
            parts.push(format!("loss {l:.4}"));
        }
        if let Some(lr) = metrics["lr"].as_f64() {
            parts.push(format!("lr {lr:.2e}"));
        }
        if let Some(w) = metrics["world_size"].as_u64() {
            parts.push(format!("{w} worker{}", if w == 1 { "" } else { "s" }));
        }
        Some(parts.join(" | "))
    }
}

impl Progress {
    /// Seconds left with `steps_done` steps committed: the smoothed step time times the steps
    /// still planned. None while the plan or the step time is unknown, or the plan is done.
    pub fn eta_seconds(&self, steps_done: u64) -> Option<f64> {
        let step_s = self.step_s?;
        (self.total_steps > steps_done).then(|| (self.total_steps - steps_done) as f64 * step_s)
    }

    /// Samples per second between commits, smoothed; None before the second commit.
    pub fn samples_per_second(&self) -> Option<f64> {
        self.samples_per_s
    }
}

fn eval_line(step: Option<u64>, eval: &Value) -> String {
    let mut parts = vec![match step {
        Some(s) => format!("eval after step {}", s + 1),
        None => "eval".to_owned(),
    }];
    if let Some(tasks) = eval["zeroshot"].as_object() {
        for (task, r) in tasks {
            if let Some(t1) = r["top1"].as_f64() {
                parts.push(format!("zero-shot {task} top-1 {t1:.3}"));
            }
        }
    }
    if let Some(r) = eval["retrieval"].as_object() {
        for key in ["image_to_text_r1", "text_to_image_r1"] {
            if let Some(v) = r.get(key).and_then(Value::as_f64) {
                parts.push(format!("{key} {v:.3}"));
            }
        }
    }
    parts.join(" | ")
}

/// 950, 1.2k, 3.4M.
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// 45s, 2m13s, 3h05m.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn lines_every_n_steps_with_rate_and_eta() {
        let mut p = Progress::new(100, 4, 10);
        let t0 = Instant::now();
        let line = |step: u64| json!({"step": step, "epoch": step / 25, "samples": 64, "loss": 2.5, "lr": 1e-3, "world_size": 2});
        // The first step always prints (no rate yet).
        assert_eq!(p.observe(&line(0), t0).unwrap(), "step 1/100 (1.0%) | epoch 1/4 | loss 2.5000 | lr 1.00e-3 | 2 workers");
        let mut printed = Vec::new();
        for s in 1..20 {
            // Half a second per step: 128 samples/s, 90 steps left at step 10 = 45 s.
            if let Some(l) = p.observe(&line(s), t0 + Duration::from_millis(500 * s)) {
                printed.push(l);
            }
        }
        assert_eq!(printed.len(), 2, "{printed:?}");
        assert_eq!(printed[0], "step 10/100 (10.0%) | epoch 1/4 | 128 samples/s | ETA 45s | loss 2.5000 | lr 1.00e-3 | 2 workers");
        assert!(printed[1].starts_with("step 20/100 (20.0%) | epoch 1/4 | 128 samples/s | ETA 40s |"), "{}", printed[1]);
        // The last step prints, without an ETA.
        let last = p.observe(&line(99), t0 + Duration::from_secs(60)).unwrap();
        assert!(last.starts_with("step 100/100 (100.0%)") && !last.contains("ETA"), "{last}");
    }

    #[test]
    fn eval_lines_and_units() {
        let mut p = Progress::new(0, 1, 10);
        let e = json!({"step": 49, "eval": {"zeroshot": {"colour": {"top1": 0.625}}, "retrieval": {"image_to_text_r1": 0.5}}});
        assert_eq!(p.observe(&e, Instant::now()).unwrap(), "eval after step 50 | zero-shot colour top-1 0.625 | image_to_text_r1 0.500");
        assert_eq!((si(950.0), si(1234.0), si(3.4e6)), ("950".into(), "1.2k".into(), "3.4M".into()));
        assert_eq!((duration(45.0), duration(133.0), duration(11_100.0)), ("45s".into(), "2m13s".into(), "3h05m".into()));
    }
}
