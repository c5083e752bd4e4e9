//! Quick pipeline throughput check on synthetic shards (the real benchmark, on photo shards and
//! against OpenCLIP, is `distclip bench data`).
//!
//! `cargo run --release -p distclip-data --example data_bench -- [THREADS] [SAMPLES] [SOURCE_PX] [OUT_PX]`
//! prints JSON: the full train path (read, group, decode, RandomResizedCrop, tokenize, batch)
//! and JPEG decoding alone on one thread, both in samples per second.

use std::time::Instant;

use distclip_data::samples::{ShardEvent, ShardReader};
use distclip_data::stats::bench_data;
use distclip_data::synth::{SynthConfig, synth};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let threads = args.first().copied().unwrap_or(2);
    let samples = args.get(1).copied().unwrap_or(2000);
    let source_px = args.get(2).copied().unwrap_or(384) as u32;
    let out_px = args.get(3).copied().unwrap_or(224);
    let dir = std::env::temp_dir().join(format!("distclip-data-bench-{}", std::process::id()));
    let summary = synth(
        &dir,
        &SynthConfig {
            samples,
            val_samples: 0,
            samples_per_shard: 250,
            image_size: source_px,
            jpeg_quality: 90,
            progress: false,
            ..Default::default()
        },
    )
    .expect("synth");
    let stats = bench_data(&summary.train_spec, threads, out_px, None).expect("bench");
    // Decode alone, one thread: the floor any pipeline pays per image.
    let start = Instant::now();
    let mut decoded = 0usize;
    for s in 0..summary.shards {
        let f = std::fs::File::open(dir.join(format!("train/{s:05}.tar"))).expect("shard");
        for ev in ShardReader::new(f, s, 0) {
            if let ShardEvent::Sample(raw) = ev {
                let img =
                    distclip_image::decode(raw.get("jpg").expect("jpg"), u64::MAX).expect("decode");
                decoded += img.width;
            }
        }
    }
    let decode_s = start.elapsed().as_secs_f64();
    let _ = decoded;
    let out = serde_json::json!({
        "threads": threads,
        "samples": stats.samples,
        "source_px": source_px,
        "image_size": out_px,
        "samples_per_s": stats.samples_per_s,
        "samples_per_s_per_thread": stats.samples_per_s / threads as f64,
        "decode_only_samples_per_s_1_thread": samples as f64 / decode_s,
        "skipped": stats.skipped,
    });
    println!("{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
