//! `report.md`: the run's settings, its numbers, evaluation, events, and links to the plots.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use crate::run::{EventRecord, Run, StepRecord};
use crate::stats::{Extent, extent, mean, overall_samples_per_s, worker_stats};

/// Event kinds listed one by one (the rest are only counted): failures, membership losses,
/// and the run's checkpoints, resumes and end.
const NOTABLE: [&str; 12] = [
    "death",
    "failed",
    "failed_shard",
    "commit_failed",
    "commit_refused",
    "commit_undone",
    "checksum_mismatch",
    "ledger_conflict",
    "step_reset",
    "checkpoint",
    "resume",
    "finish",
];

/// Notable events listed before the rest are only counted (a flapping worker can die
/// hundreds of times).
const MAX_NOTABLE: usize = 50;

/// The Markdown summary of `run`; `plots` are the file names written beside it.
pub(crate) fn markdown(run: &Run, plots: &[&str]) -> String {
    let mut md = String::new();
    let title = run.run_id.as_deref().map_or("Training report".into(), |id| format!("Training report: {id}"));
    let _ = writeln!(md, "# {}\n", cell(&title));
    let _ = writeln!(md, "Run directory `{}`, summarised by `distclip report`.\n", run.dir.display());
    run_table(&mut md, run);
    curves(&mut md, run, plots);
    throughput(&mut md, run, plots);
    evaluation(&mut md, run, plots);
    events(&mut md, run);
    md
}

fn run_table(md: &mut String, run: &Run) {
    let steps = &run.steps;
    let (Some(first), Some(last)) = (steps.first(), steps.last()) else {
        let _ = writeln!(md, "No steps.\n");
        return;
    };
    let cfg = run.config.clone().unwrap_or_default();
    let none = if run.config.is_some() { "not set" } else { "n/a (no config.toml)" };
    let mut rows: Vec<(&str, String)> = vec![
        ("run id", run.run_id.as_deref().map_or("unknown (no state.json)".into(), |id| format!("`{id}`"))),
        ("model", cfg.model.map_or(none.into(), |m| format!("`{m}`"))),
        ("batch size per worker", cfg.batch_size.map_or(none.into(), |b| b.to_string())),
        ("learning rate (peak)", cfg.lr.map_or(none.into(), num)),
        ("warmup steps", cfg.warmup.map_or(none.into(), |w| w.to_string())),
        ("epochs (configured)", cfg.epochs.map_or(none.into(), |e| e.to_string())),
    ];
    if let Some(m) = cfg.max_steps {
        rows.push(("max steps", m.to_string()));
    }
    rows.push(("steps committed", format!("{} (steps {} to {})", steps.len(), first.step, last.step)));
    let epochs: Vec<u64> = steps.iter().filter_map(|s| s.epoch).collect();
    if let (Some(lo), Some(hi)) = (epochs.iter().min(), epochs.iter().max()) {
        rows.push(("epochs reached", if lo == hi { lo.to_string() } else { format!("{lo} to {hi}") }));
    }
    if let Some(seen) = steps.iter().rev().find_map(|s| s.samples_seen) {
        rows.push(("samples seen", seen.to_string()));
    }
    let workers = worker_stats(steps).len();
    let world = last.world_size.map_or(String::new(), |w| format!(", world size {w} at the last step"));
    rows.push(("workers", format!("{workers} seen{world}")));
    if let (Some(t0), Some(t1)) = (first.time, last.time) {
        rows.push(("wall time", format!("{} s from the first to the last step line", num(t1 - t0))));
    }
    table(md, &["run", ""], rows.into_iter().map(|(k, v)| vec![k.to_string(), v]));
    let span = last.step - first.step + 1;
    if span > steps.len() as u64 {
        let _ = writeln!(md, "{} steps between {} and {} have no line.\n", span - steps.len() as u64, first.step, last.step);
    }
    if run.superseded > 0 {
        let _ = writeln!(
            md,
            "{} step lines were superseded by later lines for the same step (a resumed run redoes the \
             steps after its last saved state); the report uses the later ones.\n",
            run.superseded
        );
    }
}

fn curves(md: &mut String, run: &Run, plots: &[&str]) {
    let _ = writeln!(md, "## Training curves\n");
    type Metric = (&'static str, fn(&StepRecord) -> Option<f64>);
    let metrics: [Metric; 4] = [
        ("loss", |s| s.loss),
        ("learning rate", |s| s.lr),
        ("logit scale", |s| s.logit_scale),
        ("gradient norm", |s| s.grad_norm),
    ];
    let at = |p: (u64, f64)| format!("{} (step {})", num(p.1), p.0);
    let rows = metrics.iter().map(|(name, f)| match extent(&run.steps, *f) {
        Some(Extent { first, last, min, max }) => vec![name.to_string(), at(first), at(last), at(min), at(max)],
        None => vec![name.to_string(), "no finite value".into(), String::new(), String::new(), String::new()],
    });
    table(md, &["metric", "first", "last", "min", "max"], rows);
    images(md, plots, &[("loss.png", "loss"), ("lr.png", "learning rate"), ("logit_scale.png", "logit scale")]);
}

fn throughput(md: &mut String, run: &Run, plots: &[&str]) {
    let _ = writeln!(md, "## Throughput and step time\n");
    let s = &run.steps;
    let opt = |v: Option<f64>| v.map_or("n/a".into(), num);
    let rows = [
        ("mean samples/s (mean of the steps' rates)", opt(mean(s.iter().map(|x| x.samples_per_s)))),
        ("samples/s (samples over summed step seconds)", opt(overall_samples_per_s(s))),
        ("mean step s (slowest worker)", opt(mean(s.iter().map(|x| x.step_s)))),
        ("mean data s", opt(mean(s.iter().map(|x| x.data_s)))),
        ("mean compute s", opt(mean(s.iter().map(|x| x.compute_s)))),
        ("mean communication s", opt(mean(s.iter().map(|x| x.comm_s)))),
    ];
    table(md, &["throughput", ""], rows.into_iter().map(|(k, v)| vec![k.to_string(), v]));
    images(md, plots, &[("throughput.png", "throughput")]);
    let _ = writeln!(md, "### Per worker\n");
    let _ = writeln!(md, "Means over the steps each worker took part in.\n");
    let rows = worker_stats(s).into_iter().map(|w| {
        let ranks: Vec<String> = w.ranks.iter().map(u64::to_string).collect();
        vec![
            format!("`{}`", w.id),
            ranks.join(", "),
            w.steps.to_string(),
            opt(w.step_s),
            opt(w.data_s),
            opt(w.compute_s),
            opt(w.comm_s),
            opt(w.samples_per_s),
        ]
    });
    table(md, &["worker", "rank", "steps", "step s", "data s", "compute s", "comm s", "samples/s"], rows);
    images(md, plots, &[("step_time.png", "step time per worker")]);
}

fn evaluation(md: &mut String, run: &Run, plots: &[&str]) {
    let Some(last) = run.evals.last() else {
        return;
    };
    let _ = writeln!(md, "## Evaluation\n");
    let epoch = last.epoch.map_or(String::new(), |e| format!(" (epoch {e})"));
    let _ = writeln!(md, "{} evaluations; the last after step {}{epoch}:\n", run.evals.len(), last.step);
    let opt = |v: Option<f64>| v.map_or("n/a".into(), num);
    if !last.zeroshot.is_empty() {
        let rows = last.zeroshot.iter().map(|(task, z)| {
            let samples = z.samples.map_or("n/a".into(), |n| n.to_string());
            vec![format!("`{task}`"), opt(z.top1), opt(z.top5), opt(z.chance), samples]
        });
        table(md, &["zero-shot task", "top-1", "top-5", "chance", "samples"], rows);
    }
    if !last.retrieval.is_empty() {
        let rows = last.retrieval.iter().map(|(k, v)| vec![format!("`{k}`"), num(*v)]);
        table(md, &["retrieval", "value"], rows);
    }
    images(md, plots, &[("eval.png", "evaluation")]);
}

fn events(md: &mut String, run: &Run) {
    let _ = writeln!(md, "## Events\n");
    let Some(events) = &run.events else {
        let _ = writeln!(md, "No `events.jsonl` in the run directory.\n");
        return;
    };
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events {
        *counts.entry(e.kind.as_str()).or_default() += 1;
    }
    let _ = writeln!(md, "{} events.\n", events.len());
    if counts.is_empty() {
        return;
    }
    table(md, &["kind", "count"], counts.iter().map(|(k, n)| vec![k.to_string(), n.to_string()]));
    let notable: Vec<&EventRecord> = events.iter().filter(|e| NOTABLE.contains(&e.kind.as_str())).collect();
    if notable.is_empty() {
        return;
    }
    let _ = writeln!(md, "### Notable events\n");
    let t0 = events.iter().find_map(|e| e.time);
    for e in notable.iter().take(MAX_NOTABLE) {
        let when = match (e.time, t0) {
            (Some(t), Some(t0)) => format!("+{} s", num(t - t0)),
            _ => format!("line {}", e.line),
        };
        let step = e.step.map_or(String::new(), |s| format!(", step {s}"));
        let detail = detail(&e.fields);
        let detail = if detail.is_empty() { String::new() } else { format!(": `{detail}`") };
        let _ = writeln!(md, "- {when}{step}: **{}**{detail}", e.kind);
    }
    if notable.len() > MAX_NOTABLE {
        let _ = writeln!(md, "- ... and {} more", notable.len() - MAX_NOTABLE);
    }
    md.push('\n');
}

/// An event's own fields on one line, cut short so one verbose event cannot swamp the list.
fn detail(fields: &serde_json::Map<String, Value>) -> String {
    const MAX: usize = 200;
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}: {s}"),
            other => format!("{k}: {other}"),
        })
        .collect();
    // Backticks would end the code span the detail sits in.
    let text = parts.join(", ").replace('`', "'").replace('\n', " ");
    if text.chars().count() > MAX { format!("{}...", text.chars().take(MAX).collect::<String>()) } else { text }
}

fn images(md: &mut String, plots: &[&str], wanted: &[(&str, &str)]) {
    for (file, alt) in wanted {
        if plots.contains(file) {
            let _ = writeln!(md, "![{alt}]({file})\n");
        }
    }
}

fn table(md: &mut String, header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    let line = |cells: Vec<String>| format!("| {} |", cells.join(" | "));
    let _ = writeln!(md, "{}", line(header.iter().map(|h| cell(h)).collect()));
    let _ = writeln!(md, "{}", line(header.iter().map(|_| "---".to_string()).collect()));
    for r in rows {
        let _ = writeln!(md, "{}", line(r.iter().map(|c| cell(c)).collect()));
    }
    md.push('\n');
}

/// A table cell: a `|` would split the cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A number as the summary prints it: up to four decimals without trailing zeros for
/// ordinary magnitudes, scientific notation for tiny or huge ones (learning rates).
pub(crate) fn num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        format!("{v}")
    } else if a == 0.0 {
        "0".into()
    } else if (1e-3..1e7).contains(&a) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" { "0".into() } else { s.to_string() }
    } else {
        format!("{v:.3e}")
    }
}
