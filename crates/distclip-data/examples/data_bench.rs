//! Quick pipeline throughput check without the CLI (the real benchmark, on photo shards and
//! against OpenCLIP, is `distclip bench data`; see `tools/bench/data_pipeline.sh`).
//!
//! `cargo run --release -p distclip-data --example data_bench -- SPEC THREADS [IMAGE_SIZE] [--decode-only]`
//! runs the same library calls as `distclip bench data` (the train path, or decoding alone) on
//! a spec; with no SPEC (`-- synth THREADS SAMPLES SOURCE_PX OUT_PX`) it first writes synthetic
//! shards. Prints JSON with `samples_per_s`.

use std::sync::Arc;

use distclip_data::stats::{bench_data, decode_only};
use distclip_data::synth::{SynthConfig, synth};
use distclip_data::{ShardList, ShardOpener};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let decode = args.iter().any(|a| a == "--decode-only");
    let nums: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let first = args.first().cloned().unwrap_or_else(|| "synth".into());
    let mut tmp = None;
    let (spec, threads, out_px) = if first == "synth" {
        let threads = nums.first().copied().unwrap_or(2);
        let samples = nums.get(1).copied().unwrap_or(2000);
        let source_px = nums.get(2).copied().unwrap_or(384) as u32;
        let dir = std::env::temp_dir().join(format!("distclip-data-bench-{}", std::process::id()));
        let summary = synth(
            &dir,
            &SynthConfig {
                samples,
                val_samples: 0,
                samples_per_shard: 250,
                image_size: source_px,
                progress: false,
                ..Default::default()
            },
        )
        .expect("synth");
        tmp = Some(dir);
        (
            summary.train_spec,
            threads,
            nums.get(3).copied().unwrap_or(224),
        )
    } else {
        (
            first,
            nums.first().copied().unwrap_or(1),
            nums.get(1).copied().unwrap_or(224),
        )
    };
    let stats = if decode {
        let list = Arc::new(ShardList::parse(&spec).expect("spec"));
        decode_only(
            list,
            ShardOpener::default(),
            threads,
            distclip_image::DEFAULT_MAX_PIXELS,
            None,
        )
    } else {
        bench_data(&spec, threads, out_px, None).expect("bench")
    };
    let out = serde_json::json!({
        "bench": if decode { "data-decode-only" } else { "data" },
        "threads": threads,
        "image_size": out_px,
        "samples": stats.samples,
        "seconds": stats.seconds,
        "samples_per_s": stats.samples_per_s,
        "samples_per_s_per_thread": stats.samples_per_s / threads as f64,
        "skipped": stats.skipped,
    });
    println!("{out}");
    if let Some(dir) = tmp {
        let _ = std::fs::remove_dir_all(dir);
    }
}
