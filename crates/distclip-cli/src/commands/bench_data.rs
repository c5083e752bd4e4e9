//! `distclip bench data SPEC --threads T --image-size 224`: input-pipeline throughput on the
//! train path (read, group, decode, RandomResizedCrop, normalise, tokenize, batch), the
//! counterpart of `shared/bench/openclip_data_pipeline.py`; `--decode-only` times image decoding
//! alone over the same shards (the floor any pipeline pays). JSON with `samples_per_s`.

use std::sync::Arc;

use anyhow::Context;
use distclip_data::ShardList;
use distclip_data::stats::{StatsOptions, data_stats_with, decode_only};
use distclip_data::{Augment, RetryPolicy, TransformConfig};

/// Arguments of `distclip bench data`.
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    /// Dataset spec (as for `distclip data stats`).
    spec: String,
    /// Decode threads.
    #[arg(long, value_name = "T")]
    threads: usize,
    /// Output image side.
    #[arg(long, default_value_t = 224, value_name = "PX")]
    image_size: usize,
    /// Stop after this many examples (default: the whole spec).
    #[arg(long, value_name = "N")]
    max_samples: Option<u64>,
    /// Time image decoding alone (no crop, resize, normalisation, tokenization or batching).
    #[arg(long)]
    decode_only: bool,
    #[command(flatten)]
    source: super::data::SourceArgs,
}

/// Run `distclip bench data`.
pub fn run(args: DataArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.threads > 0, "--threads must be at least 1");
    anyhow::ensure!(args.image_size > 0, "--image-size must be at least 1");
    let list = Arc::new(ShardList::parse(&args.spec).with_context(|| format!("dataset spec {:?}", args.spec))?);
    let opener = args.source.opener()?;
    let stats = if args.decode_only {
        decode_only(list, opener, args.threads, distclip_image::DEFAULT_MAX_PIXELS, args.max_samples)
    } else {
        let opts = StatsOptions {
            threads: args.threads,
            transform: TransformConfig {
                image_size: args.image_size,
                augment: Augment::train(),
                ..Default::default()
            },
            max_samples: args.max_samples,
            retry: RetryPolicy {
                attempts: args.source.retries.max(1),
                ..Default::default()
            },
        };
        data_stats_with(list, opener, &opts).with_context(|| format!("streaming {}", args.spec))?
    };
    anyhow::ensure!(stats.samples > 0, "no sample of {} could be read: {:?}", args.spec, stats.skipped);
    super::print_json(&serde_json::json!({
        "bench": if args.decode_only { "data-decode-only" } else { "data" },
        "spec": args.spec,
        "threads": args.threads,
        "image_size": if args.decode_only { None } else { Some(args.image_size) },
        "samples": stats.samples,
        "seconds": stats.seconds,
        "samples_per_s": stats.samples_per_s,
        "samples_per_s_per_thread": stats.samples_per_s / args.threads as f64,
        "bytes": stats.bytes,
        "skipped": stats.skipped,
        "failed_shards": stats.failed_shards.len(),
    }))
}
