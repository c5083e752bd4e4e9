//! `distclip report RUN_DIR [--out DIR]`: plots (PNG) and a Markdown summary of a training run;
//! the written paths as JSON on stdout.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `distclip report`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run directory (`--run-dir` of `distclip launch` or `distclip coordinator`).
    run_dir: PathBuf,
    /// Output folder (default: RUN_DIR/report).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Write the report and print `{"report", "plots", "steps"}`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let report = distclip_report::write_report(&args.run_dir, args.out.as_deref())
        .with_context(|| format!("reporting on the run in {}", args.run_dir.display()))?;
    super::print_json(&serde_json::json!({
        "report": report.markdown,
        "plots": report.plots,
        "steps": report.steps,
    }))
}
