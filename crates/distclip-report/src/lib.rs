//! Plots and a Markdown summary of a distclip training run, from the files the coordinator
//! writes to its run directory (`metrics.jsonl`, `events.jsonl`, `config.toml`,
//! `state.json`).
//!
//! [`write_report`] writes `loss.png`, `lr.png`, `logit_scale.png`, `throughput.png`,
//! `step_time.png` (one line per worker), `eval.png` (when the run evaluated) and `report.md`.
//! Plots are drawn with plotters into memory and encoded as PNG; their text uses an embedded
//! DejaVu Sans, so nothing depends on the machine's fonts.

mod charts;
mod error;
mod font;
mod plot;
mod run;
mod stats;
mod summary;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use error::ReportError;
pub use run::{ConfigSummary, EvalRecord, EventRecord, Run, StepRecord, WorkerStep, ZeroShotScore, load_run};

/// What [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `report.md`.
    pub markdown: PathBuf,
    /// The PNG files, in the order the summary shows them.
    pub plots: Vec<PathBuf>,
    /// Committed steps in the run (after a resumed run's duplicates are merged).
    pub steps: usize,
}

/// Read the run in `run_dir` and write its plots and `report.md` to `out` (default
/// `run_dir/report`, created if missing). Files of an earlier report there are replaced; an
/// earlier `eval.png` is removed when the run has no evaluation to plot, so the folder never
/// shows a stale plot.
pub fn write_report(run_dir: &Path, out: Option<&Path>) -> Result<Report, ReportError> {
    let run = load_run(run_dir)?;
    let out = out.map_or_else(|| run_dir.join("report"), Path::to_path_buf);
    std::fs::create_dir_all(&out).map_err(|source| ReportError::Io { action: "create", path: out.clone(), source })?;
    let charts = charts::charts(&run);
    let mut plots = Vec::with_capacity(charts.len());
    for (file, chart) in &charts {
        let path = out.join(file);
        plot::write_png(chart, &path)?;
        plots.push(path);
    }
    if !charts.iter().any(|(f, _)| *f == "eval.png") {
        let stale = out.join("eval.png");
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ReportError::Io { action: "remove", path: stale, source: e });
            }
            _ => {}
        }
    }
    let names: Vec<&str> = charts.iter().map(|(f, _)| *f).collect();
    let markdown = out.join("report.md");
    std::fs::write(&markdown, summary::markdown(&run, &names))
        .map_err(|source| ReportError::Io { action: "write", path: markdown.clone(), source })?;
    Ok(Report { markdown, plots, steps: run.steps.len() })
}
