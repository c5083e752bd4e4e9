//! Which plots a run gets, and what each shows.

use plotters::style::RGBColor;

use crate::plot::{LineChart, PALETTE, Series};
use crate::run::{Run, StepRecord, worker_ranks};

/// Plot files, in the order the report shows them, with their charts. `eval.png` only when
/// the run has evaluation lines.
pub(crate) fn charts(run: &Run) -> Vec<(&'static str, LineChart)> {
    let mut out = vec![
        ("loss.png", single(run, "Training loss", "loss", |s| s.loss)),
        ("lr.png", single(run, "Learning rate", "learning rate", |s| s.lr)),
        ("logit_scale.png", single(run, "Logit scale (exponentiated)", "logit scale", |s| s.logit_scale)),
        ("throughput.png", single(run, "Throughput (all workers)", "samples/s", |s| s.samples_per_s)),
        ("step_time.png", step_time(run)),
    ];
    if let Some(chart) = eval(run) {
        out.push(("eval.png", chart));
    }
    out
}

fn line(label: String, points: Vec<(i64, Option<f64>)>, color: RGBColor) -> Series {
    Series { label, points, color, markers: false, dashed: false }
}

fn x(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}

/// One run-wide value over steps, unlabelled (the title says what it is).
fn single(run: &Run, title: &str, y_desc: &str, value: fn(&StepRecord) -> Option<f64>) -> LineChart {
    let points = run.steps.iter().map(|s| (x(s.step), value(s))).collect();
    LineChart {
        title: title.into(),
        y_desc: y_desc.into(),
        series: vec![line(String::new(), points, PALETTE[0])],
        y_range: None,
    }
}

/// Each worker's step seconds over the steps it took part in; a worker's line breaks where it
/// was out of the quorum.
fn step_time(run: &Run) -> LineChart {
    let series = worker_ranks(&run.steps)
        .into_iter()
        .enumerate()
        .map(|(i, (id, ranks))| {
            let ranks: Vec<String> = ranks.iter().map(u64::to_string).collect();
            let label = match ranks.len() {
                0 => id.to_string(),
                1 => format!("{id} (rank {})", ranks[0]),
                _ => format!("{id} (ranks {})", ranks.join(", ")),
            };
            let points = run
                .steps
                .iter()
                .map(|s| (x(s.step), s.workers.get(id).and_then(|w| w.step_s)))
                .collect();
            line(label, points, PALETTE[i % PALETTE.len()])
        })
        .collect();
    LineChart { title: "Step time per worker".into(), y_desc: "seconds".into(), series, y_range: None }
}

/// Zero-shot top-1 per task (with its chance level dashed) and retrieval recall@1, over the
/// evaluation steps; `None` when there is nothing to plot.
fn eval(run: &Run) -> Option<LineChart> {
    let mut tasks = std::collections::BTreeSet::new();
    let mut recalls = std::collections::BTreeSet::new();
    for e in &run.evals {
        tasks.extend(e.zeroshot.keys().cloned());
        recalls.extend(e.retrieval.keys().filter(|k| k.ends_with("_r1")).cloned());
    }
    let mut series = Vec::new();
    let mut color = PALETTE.iter().copied().cycle();
    for task in &tasks {
        let c = color.next().unwrap_or(PALETTE[0]);
        let score = |f: fn(&crate::run::ZeroShotScore) -> Option<f64>| -> Vec<(i64, Option<f64>)> {
            run.evals.iter().map(|e| (x(e.step), e.zeroshot.get(task).and_then(f))).collect()
        };
        series.push(Series { markers: true, ..line(format!("{task} top-1"), score(|z| z.top1), c) });
        let chance = score(|z| z.chance);
        if chance.iter().any(|p| p.1.is_some()) {
            series.push(Series { dashed: true, ..line(format!("{task} chance"), chance, c) });
        }
    }
    for key in &recalls {
        let c = color.next().unwrap_or(PALETTE[0]);
        let points = run.evals.iter().map(|e| (x(e.step), e.retrieval.get(key).copied())).collect();
        series.push(Series { markers: true, ..line(key.clone(), points, c) });
    }
    if series.is_empty() {
        return None;
    }
    Some(LineChart {
        title: "Held-out evaluation".into(),
        y_desc: "zero-shot top-1 / recall@1".into(),
        series,
        y_range: Some((0.0, 1.05)),
    })
}
