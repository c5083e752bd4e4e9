//! `distclip data stats SPEC [--image-size PX] [--threads T]`: stream a dataset spec through the
//! whole pipeline (read, group, decode, transform, tokenize) and print JSON
//! `{"samples", "shards", "skipped": {reason: count}, "failed_shards": [...], "samples_per_s", ...}`.
//! Bad samples and bad shards are counted, not errors: the exit status is 0 whenever the spec
//! could be streamed.

use std::sync::Arc;

use anyhow::Context;
use distclip_data::stats::{StatsOptions, data_stats_with};
use distclip_data::transform::MAX_CAPTION_CHARS;
use distclip_data::{Augment, RetryPolicy, ShardList, ShardOpener, TransformConfig};

/// `distclip data ...`
#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Stream a spec through the pipeline and count samples, skips by reason and failed shards.
    Stats(StatsArgs),
}

/// Where shards come from: settings shared by the data commands.
#[derive(clap::Args, Debug)]
pub struct SourceArgs {
    /// Object-store setting as `KEY=VALUE`, over the environment (AWS_*, GOOGLE_*, AZURE_*):
    /// e.g. `aws_endpoint=http://127.0.0.1:9000`, `aws_allow_http=true`, `aws_region=us-east-1`.
    /// Repeatable.
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub store_options: Vec<(String, String)>,
    /// Tries per shard open or broken read before the shard is reported as failed.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub retries: u32,
}

impl SourceArgs {
    /// The opener these settings describe.
    pub fn opener(&self) -> anyhow::Result<ShardOpener> {
        anyhow::ensure!(self.retries >= 1, "--retries must be at least 1");
        let retry = RetryPolicy {
            attempts: self.retries,
            ..Default::default()
        };
        Ok(ShardOpener::new(retry).with_options(self.store_options.clone()))
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE (e.g. aws_endpoint=http://127.0.0.1:9000), got {s:?}")),
    }
}

/// Arguments of `distclip data stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Dataset spec: `/data/{00000..00099}.tar`, `s3://bucket/{000..999}.tar`, sources joined
    /// with `::`, or a `.txt` file listing shard patterns.
    spec: String,
    /// Output image side: images are decoded and transformed at this size.
    #[arg(long, default_value_t = 224, value_name = "PX")]
    image_size: usize,
    /// Decode threads (default: the CPUs available).
    #[arg(long, value_name = "T")]
    threads: Option<usize>,
    /// Take captions from this field of each sample's `json` member instead of its `txt`.
    #[arg(long, value_name = "KEY")]
    caption_key: Option<String>,
    /// `none` (the eval transform: resize and centre crop) or `train` (RandomResizedCrop).
    #[arg(long, default_value = "none", value_parser = ["none", "train"])]
    augment: String,
    /// Images with more pixels are skipped (decompression bombs).
    #[arg(long, default_value_t = distclip_image::DEFAULT_MAX_PIXELS, value_name = "N")]
    max_pixels: u64,
    /// Captions with more characters are skipped.
    #[arg(long, default_value_t = MAX_CAPTION_CHARS, value_name = "N")]
    max_caption_chars: usize,
    /// Stop after this many examples.
    #[arg(long, value_name = "N")]
    max_samples: Option<u64>,
    #[command(flatten)]
    source: SourceArgs,
}

/// Run a `data` command.
pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Stats(a) => stats(a),
    }
}

fn stats(args: StatsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.image_size > 0, "--image-size must be at least 1");
    anyhow::ensure!(args.threads != Some(0), "--threads must be at least 1");
    let list = ShardList::parse(&args.spec).with_context(|| format!("dataset spec {:?}", args.spec))?;
    let opts = StatsOptions {
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        transform: TransformConfig {
            image_size: args.image_size,
            augment: if args.augment == "train" { Augment::train() } else { Augment::None },
            max_pixels: args.max_pixels,
            caption_key: args.caption_key.map_or_else(Default::default, distclip_data::CaptionKey::JsonField),
            max_caption_chars: args.max_caption_chars,
            ..Default::default()
        },
        max_samples: args.max_samples,
        retry: RetryPolicy {
            attempts: args.source.retries.max(1),
            ..Default::default()
        },
    };
    let stats = data_stats_with(Arc::new(list), args.source.opener()?, &opts)
        .with_context(|| format!("streaming {}", args.spec))?;
    super::print_json(&serde_json::to_value(&stats)?)
}
