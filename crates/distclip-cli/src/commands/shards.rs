//! `distclip shards write (--images DIR | --csv FILE | --jsonl FILE) --out DIR
//! [--samples-per-shard N] [--resize-max PX]`: LAION-layout WebDataset shards (`00000.tar` with
//! `key.jpg`, `key.txt`, `key.json`) and `sizes.json`; a summary as JSON on stdout, a progress
//! bar on stderr.

use std::path::PathBuf;

use anyhow::Context;
use distclip_data::writer::{ShardInput, WriteOptions, write_shards};

/// `distclip shards ...`
#[derive(clap::Subcommand, Debug)]
pub enum ShardsCommand {
    /// Write images and captions as WebDataset shards.
    Write(WriteArgs),
}

/// Arguments of `distclip shards write`.
#[derive(clap::Args, Debug)]
#[command(group(
    clap::ArgGroup::new("input")
        .required(true)
        .args(["images", "csv", "jsonl"])
))]
pub struct WriteArgs {
    /// A folder of images (searched recursively), each with its caption in `NAME.txt` beside it.
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// A CSV with a header row: image paths (relative to the CSV's folder) and captions.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// JSON lines, one object per sample with the image path and caption fields.
    #[arg(long, value_name = "FILE")]
    jsonl: Option<PathBuf>,
    /// Output folder (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Samples per shard.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    samples_per_shard: usize,
    /// Downscale images whose longest side is larger (bicubic, re-encoded as JPEG).
    #[arg(long, value_name = "PX")]
    resize_max: Option<u32>,
    /// CSV column / JSONL field with the image path (`filepath` is accepted when absent).
    #[arg(long, default_value = "image")]
    image_column: String,
    /// CSV column / JSONL field with the caption (`title` is accepted when absent).
    #[arg(long, default_value = "caption")]
    caption_column: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Run a `shards` command.
pub fn run(cmd: ShardsCommand) -> anyhow::Result<()> {
    match cmd {
        ShardsCommand::Write(a) => write(a),
    }
}

fn write(args: WriteArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.samples_per_shard > 0, "--samples-per-shard must be at least 1");
    anyhow::ensure!(args.resize_max != Some(0), "--resize-max must be at least 1 pixel");
    let input = match (args.images, args.csv, args.jsonl) {
        (Some(d), None, None) => ShardInput::Images(d),
        (None, Some(f), None) => ShardInput::Csv(f),
        (None, None, Some(f)) => ShardInput::Jsonl(f),
        // clap's group already requires exactly one.
        _ => anyhow::bail!("give exactly one of --images, --csv or --jsonl"),
    };
    let opts = WriteOptions {
        samples_per_shard: args.samples_per_shard,
        resize_max: args.resize_max,
        image_column: args.image_column,
        caption_column: args.caption_column,
        progress: !args.quiet,
        mtime: None,
    };
    let summary = write_shards(&input, &args.out, &opts)
        .with_context(|| format!("writing shards to {}", args.out.display()))?;
    super::print_json(&serde_json::to_value(&summary)?)
}
