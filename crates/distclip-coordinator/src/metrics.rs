//! The run's monitoring numbers ([`RunMetrics`], taken from the machine by
//! [`Machine::metrics`](crate::Machine::metrics)) and their rendering in the Prometheus text
//! exposition format (version 0.0.4) with the Prometheus project's own client library.
//!
//! Names start with `distclip_`, use base units (seconds) and counters end in `_total`. Values
//! a run does not know yet (the loss before the first commit, a worker's step times before it
//! committed one) are left out rather than written as 0, so graphs show a gap, not a fake value.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

/// The `Content-Type` of [`render_prometheus`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// What rank 0 measured in the last committed step.
#[derive(Debug, Clone, PartialEq)]
pub struct LastStep {
    /// Loss of the global batch.
    pub loss: f64,
    /// Learning rate the step used.
    pub learning_rate: f64,
    /// The temperature, exp(logit_scale) (at most 100).
    pub logit_scale: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// One worker's last committed step.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStep {
    /// Wall time of the step.
    pub step_seconds: f64,
    /// Time spent waiting for the batch.
    pub data_wait_seconds: f64,
    /// Forward and backward time.
    pub compute_seconds: f64,
    /// Collectives time.
    pub communication_seconds: f64,
    /// Its samples over its step time.
    pub samples_per_second: f64,
}

/// One live member.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerMetrics {
    /// The id it joined with.
    pub worker_id: String,
    /// Its rank in the current quorum, if it is in it.
    pub rank: Option<u32>,
    /// The last step it reported reaching.
    pub step: u64,
    /// Seconds since anything was heard from it.
    pub last_heartbeat_age_seconds: f64,
    /// Its last committed step, once it committed one (under this coordinator process).
    pub last_step: Option<WorkerStep>,
    /// Its data-plane address (what peers dial).
    pub address: String,
    /// The device it trains on, as it reported it (`flex`, `cpu`, `cuda:0`).
    pub device: String,
    /// What its last heartbeat said it was doing (`training`, `healing`, ...).
    pub activity: String,
    /// Samples it skipped as bad in committed steps (under this coordinator process).
    pub skipped_samples: u64,
}

/// The run as monitoring sees it at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct RunMetrics {
    /// The run's id.
    pub run_id: String,
    /// `waiting`, `training`, `finished` or `failed`.
    pub state: &'static str,
    /// Steps committed.
    pub step: u64,
    /// Steps the LR schedule plans for (0: unknown).
    pub planned_steps: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Epochs the run is configured for.
    pub planned_epochs: u64,
    /// Samples committed over the run; never decreases within one coordinator process.
    pub samples_total: u64,
    /// Samples committed or skipped in this epoch.
    pub epoch_samples_done: u64,
    /// Samples in this epoch as far as known: the configured or `sizes.json` size, or the
    /// totals of the shards read to the end if they add up to more.
    pub epoch_samples_expected: u64,
    /// Rank 0's measurements of the last committed step, once there is one.
    pub last_step: Option<LastStep>,
    /// Throughput of the last committed step (global batch over the slowest worker's time).
    pub samples_per_second: f64,
    /// Live members.
    pub workers: u64,
    /// Members of the current quorum.
    pub world_size: u64,
    /// The last quorum id handed out.
    pub quorum_id: u64,
    /// Votes that ended without a commit since this coordinator started.
    pub steps_dropped_total: u64,
    /// Samples skipped as bad over the run, by reason (`unknown` where a worker gave none).
    pub skipped_samples_by_reason: BTreeMap<String, u64>,
    /// Shards of this epoch that could not be read.
    pub failed_shards: u64,
    /// Live members in join order.
    pub per_worker: Vec<WorkerMetrics>,
}

/// Latencies the gRPC shell observes (the machine knows no time of its own work).
#[derive(Debug, Clone)]
pub struct Latency {
    /// A deciding vote's work under the coordinator's lock: checking the step, entering its
    /// positions in the ledger, the journal line and its fsync.
    pub commit: Histogram,
}

impl Default for Latency {
    fn default() -> Self {
        Self { commit: Histogram::new([1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0]) }
    }
}

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Build a throwaway registry from one snapshot. Scrapes are rare (seconds apart) and the
/// registry is small, so a fresh one per scrape keeps the machine the only source of truth.
struct Builder(Registry);

impl Builder {
    fn add(&mut self, name: &str, help: &str, metric: impl Metric) {
        self.0.register(name, help, metric);
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        let g = FloatGauge::default();
        g.set(value);
        self.add(name, help, g);
    }

    fn int_gauge(&mut self, name: &str, help: &str, value: u64) {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        self.add(name, help, g);
    }

    /// `name` without `_total`: the encoder appends it to counters.
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        self.add(name, help, c);
    }

    fn worker_gauge(
        &mut self,
        name: &str,
        help: &str,
        workers: &[WorkerMetrics],
        value: impl Fn(&WorkerMetrics) -> Option<f64>,
    ) {
        let family = Family::<Labels, FloatGauge>::default();
        let mut any = false;
        for w in workers {
            if let Some(v) = value(w) {
                let rank = w.rank.map(|r| r.to_string()).unwrap_or_default();
                let labels = vec![("worker".into(), w.worker_id.clone()), ("rank".into(), rank)];
                family.get_or_create(&labels).set(v);
                any = true;
            }
        }
        if any {
            self.add(name, help, family);
        }
    }
}

/// The metrics in the Prometheus text exposition format (serve with [`CONTENT_TYPE`]).
///
/// Per-worker series carry `worker` (its id) and `rank` (in the current quorum; empty when it
/// is not in it). Help texts get a final period from the encoder.
pub fn render_prometheus(m: &RunMetrics, latency: Option<&Latency>) -> String {
    let mut b = Builder(Registry::default());
    if let Some(l) = latency {
        b.add("distclip_coordinator_commit_seconds", "Time a deciding vote spent in the coordinator: ledger, journal line and fsync", l.commit.clone());
    }
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![("run_id".into(), m.run_id.clone()), ("state".into(), m.state.into())])
        .set(1);
    b.add("distclip_run_info", "The run's id and state (always 1)", info);
    b.int_gauge("distclip_run_finished", "1 once the run finished, else 0", u64::from(m.state == "finished"));
    b.int_gauge("distclip_run_failed", "1 if the run failed, else 0", u64::from(m.state == "failed"));
    b.int_gauge("distclip_step", "Steps committed", m.step);
    b.int_gauge("distclip_planned_steps", "Steps the learning-rate schedule plans for (0: unknown)", m.planned_steps);
    b.int_gauge("distclip_epoch", "Current epoch (from 0)", m.epoch);
    b.int_gauge("distclip_planned_epochs", "Epochs the run is configured for", m.planned_epochs);
    b.counter("distclip_samples", "Samples committed over the run", m.samples_total);
    b.int_gauge("distclip_epoch_samples_done", "Samples committed or skipped in the current epoch", m.epoch_samples_done);
    b.int_gauge(
        "distclip_epoch_samples_expected",
        "Samples in the current epoch as far as known (sizes.json or data.samples_per_epoch, or the shards read to the end)",
        m.epoch_samples_expected,
    );
    if let Some(s) = &m.last_step {
        b.gauge("distclip_loss", "Loss of the last committed step's global batch", s.loss);
        b.gauge("distclip_learning_rate", "Learning rate of the last committed step", s.learning_rate);
        b.gauge("distclip_logit_scale", "exp(logit_scale), the contrastive temperature, after the last committed step", s.logit_scale);
        b.gauge("distclip_grad_norm", "Global gradient norm of the last committed step, before clipping", s.grad_norm);
    }
    b.gauge(
        "distclip_samples_per_second",
        "Throughput of the last committed step: its global batch over the slowest worker's step time",
        m.samples_per_second,
    );
    b.int_gauge("distclip_workers", "Live workers (members that heartbeat)", m.workers);
    b.int_gauge("distclip_world_size", "Workers in the current quorum", m.world_size);
    b.int_gauge("distclip_quorum_id", "The last quorum id handed out; it changes with the membership", m.quorum_id);
    b.counter(
        "distclip_steps_dropped",
        "Steps voted on but not committed (a worker failed or died) since the coordinator started",
        m.steps_dropped_total,
    );
    let skipped = Family::<Labels, Counter>::default();
    for (reason, n) in &m.skipped_samples_by_reason {
        skipped.get_or_create(&vec![("reason".into(), reason.clone())]).inc_by(*n);
    }
    b.add("distclip_skipped_samples", "Samples skipped as bad, by the reason the worker gave", skipped);
    b.int_gauge("distclip_failed_shards", "Shards of the current epoch that could not be read", m.failed_shards);

    let w = &m.per_worker;
    let last = |f: fn(&WorkerStep) -> f64| move |w: &WorkerMetrics| w.last_step.as_ref().map(f);
    b.worker_gauge("distclip_worker_step", "The last step a worker reported reaching", w, |w| Some(w.step as f64));
    b.worker_gauge(
        "distclip_worker_last_heartbeat_age_seconds",
        "Seconds since the coordinator last heard from a worker",
        w,
        |w| Some(w.last_heartbeat_age_seconds),
    );
    b.worker_gauge("distclip_worker_step_seconds", "Wall time of a worker's last committed step", w, last(|s| s.step_seconds));
    b.worker_gauge(
        "distclip_worker_data_wait_seconds",
        "Time a worker waited for its batch in its last committed step",
        w,
        last(|s| s.data_wait_seconds),
    );
    b.worker_gauge(
        "distclip_worker_compute_seconds",
        "Forward and backward time of a worker's last committed step",
        w,
        last(|s| s.compute_seconds),
    );
    b.worker_gauge(
        "distclip_worker_communication_seconds",
        "Collective communication time of a worker's last committed step",
        w,
        last(|s| s.communication_seconds),
    );
    b.worker_gauge(
        "distclip_worker_samples_per_second",
        "A worker's samples over its step time in its last committed step",
        w,
        last(|s| s.samples_per_second),
    );

    let skipped = Family::<Labels, Counter>::default();
    for w in w {
        let rank = w.rank.map(|r| r.to_string()).unwrap_or_default();
        skipped.get_or_create(&vec![("worker".into(), w.worker_id.clone()), ("rank".into(), rank)]).inc_by(w.skipped_samples);
    }
    if !w.is_empty() {
        b.add("distclip_worker_skipped_samples", "Samples a worker skipped as bad in committed steps", skipped);
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &b.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RunMetrics {
        RunMetrics {
            run_id: "run-7".into(),
            state: "training",
            step: 12,
            planned_steps: 100,
            epoch: 1,
            planned_epochs: 3,
            samples_total: 384,
            epoch_samples_done: 64,
            epoch_samples_expected: 160,
            last_step: Some(LastStep {
                loss: 2.5,
                learning_rate: 5e-4,
                logit_scale: 14.25,
                grad_norm: 0.75,
            }),
            samples_per_second: 128.0,
            workers: 2,
            world_size: 2,
            quorum_id: 3,
            steps_dropped_total: 1,
            skipped_samples_by_reason: [("decode".to_string(), 4), ("unknown".to_string(), 1)].into(),
            failed_shards: 0,
            per_worker: vec![
                WorkerMetrics {
                    worker_id: "w0".into(),
                    rank: Some(0),
                    step: 12,
                    last_heartbeat_age_seconds: 0.25,
                    last_step: Some(WorkerStep {
                        step_seconds: 0.5,
                        data_wait_seconds: 0.125,
                        compute_seconds: 0.25,
                        communication_seconds: 0.0625,
                        samples_per_second: 64.0,
                    }),
                    address: "10.0.0.1:7080".into(),
                    device: "cuda:0".into(),
                    activity: "training".into(),
                    skipped_samples: 3,
                },
                WorkerMetrics {
                    worker_id: "w\"1".into(),
                    rank: None,
                    step: 0,
                    last_heartbeat_age_seconds: 1.5,
                    last_step: None,
                    address: "10.0.0.2:7080".into(),
                    device: "flex".into(),
                    activity: "healing".into(),
                    skipped_samples: 0,
                },
            ],
        }
    }

    /// The sample lines (not comments) as a map from series to value text.
    fn series(text: &str) -> BTreeMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    #[test]
    fn renders_names_types_labels_and_values() {
        let text = render_prometheus(&sample(), None);
        let s = series(&text);
        let v = |k: &str| s.get(k).unwrap_or_else(|| panic!("no series {k}:\n{text}")).as_str();
        assert_eq!(v("distclip_step"), "12");
        assert_eq!(v("distclip_epoch"), "1");
        assert_eq!(v("distclip_samples_total"), "384");
        assert_eq!(v("distclip_loss"), "2.5");
        assert_eq!(v("distclip_learning_rate"), "0.0005");
        assert_eq!(v("distclip_logit_scale"), "14.25");
        assert_eq!(v("distclip_grad_norm"), "0.75");
        assert_eq!(v("distclip_samples_per_second"), "128.0");
        assert_eq!(v("distclip_workers"), "2");
        assert_eq!(v("distclip_quorum_id"), "3");
        assert_eq!(v("distclip_steps_dropped_total"), "1");
        assert_eq!(v("distclip_run_finished"), "0");
        assert_eq!(v(r#"distclip_run_info{run_id="run-7",state="training"}"#), "1");
        assert_eq!(v(r#"distclip_skipped_samples_total{reason="decode"}"#), "4");
        assert_eq!(v(r#"distclip_skipped_samples_total{reason="unknown"}"#), "1");
        assert_eq!(v(r#"distclip_worker_step_seconds{worker="w0",rank="0"}"#), "0.5");
        assert_eq!(v(r#"distclip_worker_data_wait_seconds{worker="w0",rank="0"}"#), "0.125");
        assert_eq!(v(r#"distclip_worker_compute_seconds{worker="w0",rank="0"}"#), "0.25");
        assert_eq!(v(r#"distclip_worker_communication_seconds{worker="w0",rank="0"}"#), "0.0625");
        assert_eq!(v(r#"distclip_worker_samples_per_second{worker="w0",rank="0"}"#), "64.0");
        assert_eq!(v(r#"distclip_worker_skipped_samples_total{worker="w0",rank="0"}"#), "3");
        assert_eq!(v(r#"distclip_worker_skipped_samples_total{worker="w\"1",rank=""}"#), "0");
        assert_eq!(v(r#"distclip_worker_last_heartbeat_age_seconds{worker="w0",rank="0"}"#), "0.25");
        // Label values are escaped; a worker outside the quorum has an empty rank and no step
        // times until it commits one.
        assert_eq!(v(r#"distclip_worker_last_heartbeat_age_seconds{worker="w\"1",rank=""}"#), "1.5");
        assert!(!text.contains(r#"distclip_worker_step_seconds{worker="w\"1""#), "{text}");

        // Types and help: counters end in _total, everything else is a gauge; units are seconds.
        for counter in ["distclip_samples_total", "distclip_steps_dropped_total", "distclip_skipped_samples_total"] {
            assert!(text.contains(&format!("# TYPE {counter} counter\n")), "{counter}:\n{text}");
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(name.starts_with("distclip_"), "{line}");
            assert_eq!(line.ends_with(" counter"), name.ends_with("_total"), "{line}");
            assert!(!name.contains("_ms") && !name.contains("millis"), "{line}");
            assert!(text.contains(&format!("# HELP {name} ")), "no help for {name}");
        }
        assert!(!text.contains("# EOF"), "Prometheus text format, not OpenMetrics");
    }

    #[test]
    fn unknown_values_are_left_out() {
        let mut m = sample();
        m.last_step = None;
        m.per_worker.clear();
        m.skipped_samples_by_reason.clear();
        m.state = "finished";
        let text = render_prometheus(&m, None);
        let s = series(&text);
        for name in ["distclip_loss", "distclip_learning_rate", "distclip_logit_scale", "distclip_grad_norm"] {
            assert!(!s.contains_key(name), "{name} before any commit:\n{text}");
        }
        assert!(!text.contains("distclip_worker_"), "{text}");
        assert_eq!(s["distclip_run_finished"], "1");
        assert_eq!(s["distclip_step"], "12");
    }
}
