//! `distclip config`: the documented default run configuration as TOML, with `model.name` set
//! to a preset or an OpenCLIP model JSON. Printed on stdout, or written with `--out`. Edit it
//! and pass it to `distclip coordinator --config` or `distclip launch --config`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use distclip_model::ClipConfig;
use distclip_model::config::{preset, preset_names};

/// Arguments of `distclip config`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A built-in preset (see `distclip models`) or an OpenCLIP model config JSON (model.name).
    #[arg(long, default_value_t = distclip_config::RunConfig::default().model.name)]
    model: String,
    /// Write the file here instead of printing it (refuses to replace a file without --force).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace the --out file if it exists.
    #[arg(long, requires = "out")]
    force: bool,
}

/// Refuse a model name that is neither a preset nor a readable OpenCLIP config, listing the
/// presets, so the mistake shows now rather than when the workers build the model.
fn check_model(name: &str) -> anyhow::Result<()> {
    if preset(name).is_none() && !Path::new(name).exists() {
        let presets: Vec<&str> = preset_names().collect();
        anyhow::bail!(
            "unknown model {name:?}: not a built-in preset and no such file; the presets are {} \
             (or pass the path of an OpenCLIP model config JSON)",
            presets.join(", ")
        );
    }
    ClipConfig::from_name_or_path(name).with_context(|| format!("checking the model {name:?}"))?;
    Ok(())
}

/// Run the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    check_model(&args.model)?;
    let text = distclip_config::documented_default(&args.model);
    let Some(out) = &args.out else {
        let mut stdout = std::io::stdout().lock();
        return match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
            // `distclip config | head` has what it wanted.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(e).context("writing the config to stdout")
            }
            _ => Ok(()),
        };
    };
    anyhow::ensure!(
        args.force || !out.exists(),
        "{} exists; pass --force to replace it, or choose another --out",
        out.display()
    );
    std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    super::print_json(&serde_json::json!({
        "out": out.display().to_string(),
        "model": args.model,
    }))
}
