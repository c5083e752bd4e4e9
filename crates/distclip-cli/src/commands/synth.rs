//! `distclip synth --out DIR --samples N [--samples-per-shard M] [--image-size PX] [--seed S]`:
//! the synthetic shapes dataset (`train/`, `val/` shards in the `shards write` layout,
//! `classes.json`, `zeroshot.json`); a summary as JSON on stdout.

use std::path::PathBuf;

use anyhow::Context;
use distclip_data::synth::{SynthConfig, synth};

/// Arguments of `distclip synth`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Training samples.
    #[arg(long, value_name = "N")]
    samples: usize,
    /// Held-out samples for zero-shot evaluation (default: a tenth of `--samples`, at least 1).
    #[arg(long, value_name = "N")]
    val_samples: Option<usize>,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000, value_name = "M")]
    samples_per_shard: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64, value_name = "PX")]
    image_size: u32,
    /// Seed: the same seed gives the same dataset.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Run the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.samples > 0, "--samples must be at least 1");
    anyhow::ensure!(args.samples_per_shard > 0, "--samples-per-shard must be at least 1");
    anyhow::ensure!(args.image_size >= 8, "--image-size must be at least 8 pixels");
    let cfg = SynthConfig {
        samples: args.samples,
        val_samples: args.val_samples.unwrap_or((args.samples / 10).max(1)),
        samples_per_shard: args.samples_per_shard,
        image_size: args.image_size,
        seed: args.seed,
        progress: !args.quiet,
        ..Default::default()
    };
    let summary =
        synth(&args.out, &cfg).with_context(|| format!("writing the synthetic dataset to {}", args.out.display()))?;
    super::print_json(&serde_json::to_value(&summary)?)
}
