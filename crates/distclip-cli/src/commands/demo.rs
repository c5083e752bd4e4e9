//! `distclip demo`: the whole system in a few minutes on a laptop. It synthesises a captioned
//! dataset of coloured shapes, measures the zero-shot accuracy of a freshly initialised tiny
//! CLIP on held-out images, trains it with a coordinator and two worker processes on loopback
//! (`distclip launch`), and measures again. The last stdout line is JSON (a contract):
//! `{"zero_shot_top1_before", "zero_shot_top1_after", "chance", "run_dir", "seconds"}`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use distclip_data::synth::{SynthConfig, synth};
use distclip_eval::{EvalOptions, ZeroShotFile, zero_shot_webdataset};

/// Arguments of `distclip demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the dataset and the run go (default: a new folder under the system temp dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Training samples to synthesise.
    #[arg(long, default_value_t = 4000)]
    samples: usize,
    /// Passes over the training data.
    #[arg(long, default_value_t = 12)]
    epochs: u64,
    /// Samples per worker per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Seed of the data, the initialisation and the shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The zero-shot task the demo reports: the colour of the shape (8 classes).
const TASK: &str = "colour";

/// Run the demo.
pub fn run(args: Args, log_format: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = args.out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("distclip-demo-{}-{}", std::process::id(), args.seed))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let data_dir = out.join("data");
    let run_dir = out.join("run");
    eprintln!("demo: writing {} synthetic training samples to {}", args.samples, data_dir.display());
    let summary = synth(
        &data_dir,
        &SynthConfig {
            samples: args.samples,
            val_samples: 500,
            samples_per_shard: 250,
            image_size: 32,
            seed: args.seed,
            progress: false,
            ..Default::default()
        },
    )
    .context("writing the synthetic dataset")?;

    let tasks = ZeroShotFile::load(std::path::Path::new(&summary.zeroshot))?;
    let device = distclip_model::device::parse_device("flex")?;
    let accuracy = |checkpoint: Option<&PathBuf>| -> anyhow::Result<(f64, f64)> {
        // The workers initialise from `train.seed` in the same way, so "before" is the very
        // model training starts from.
        device.seed(args.seed);
        let model = super::embed::load_model("tiny", checkpoint, &device)?;
        let results = zero_shot_webdataset(&model, &device, &tasks, &EvalOptions::default())?;
        let (_, acc) = results.into_iter().find(|(name, _)| name == TASK).context("the colour task")?;
        Ok((acc.top1, acc.chance))
    };
    let (before, chance) = accuracy(None)?;
    eprintln!("demo: zero-shot {TASK} accuracy before training: {before:.3} (chance {chance:.3})");

    eprintln!("demo: training with a coordinator and {} workers on loopback; run directory {}", args.workers, run_dir.display());
    let exe = std::env::current_exe().context("finding the distclip executable")?;
    let status = Command::new(exe)
        .args(["--log-format", log_format, "launch", "--workers", &args.workers.to_string()])
        .args(["--data", &summary.train_spec, "--run-dir"])
        .arg(&run_dir)
        .args(["--model", "tiny", "--threads", "1", "--data-threads", "1"])
        .args(["--batch-size", &args.batch_size.to_string(), "--epochs", &args.epochs.to_string()])
        .args(["--lr", &format!("{:?}", args.lr), "--warmup", "50", "--seed", &args.seed.to_string()])
        // Held-out zero-shot accuracy during training (into metrics.jsonl and the report), and
        // checkpoints a run could resume from.
        .args(["--set", &format!("eval.zeroshot={:?}", summary.zeroshot), "--set", "eval.every_steps=150"])
        .args(["--set", "log.checkpoint_every=250", "--set", "log.every_steps=50"])
        .stdout(std::process::Stdio::null())
        .status()
        .context("starting distclip launch")?;
    if !status.success() {
        bail!("the training run failed ({status}); see {}", run_dir.join("events.jsonl").display());
    }
    let model = run_dir.join("checkpoints/final/model.safetensors");
    let (after, _) = accuracy(Some(&model))?;
    eprintln!("demo: zero-shot {TASK} accuracy after training: {after:.3} (chance {chance:.3})");
    let report = distclip_report::write_report(&run_dir, None).context("writing the run report")?;
    eprintln!("demo: metrics in {}, events in {}", run_dir.join("metrics.jsonl").display(), run_dir.join("events.jsonl").display());
    eprintln!("demo: report with {} plots in {}", report.plots.len(), report.markdown.display());
    eprintln!("demo: checkpoints in {}", run_dir.join("checkpoints").display());
    super::print_json(&serde_json::json!({
        "zero_shot_top1_before": before,
        "zero_shot_top1_after": after,
        "chance": chance,
        "run_dir": run_dir.display().to_string(),
        "seconds": started.elapsed().as_secs_f64(),
    }))
}
