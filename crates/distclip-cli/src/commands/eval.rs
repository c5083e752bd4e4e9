//! `distclip eval --checkpoint FILE --model NAME (--zeroshot DIR|FILE | --retrieval SPEC)`:
//! zero-shot classification or image-text retrieval, as OpenCLIP evaluates, printed as JSON.

use std::path::{Path, PathBuf};

use anyhow::Context;
use distclip_eval::{EvalOptions, ZeroShotFile, retrieval, zero_shot_folder, zero_shot_webdataset};

/// Arguments of `distclip eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Weights (OpenCLIP or distclip safetensors, .bin, .pt). Without it the model is randomly
    /// initialised with `--seed`, which gives the chance-level baseline.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// A built-in config name or an OpenCLIP config JSON.
    #[arg(long)]
    model: String,
    /// An image folder with one subfolder per class, or a zero-shot task file (`zeroshot.json`
    /// as `distclip synth` writes it: a labelled WebDataset and its class names and templates).
    #[arg(long, conflicts_with = "retrieval", required_unless_present = "retrieval")]
    zeroshot: Option<PathBuf>,
    /// Prompt templates for an image folder (`{}` is the class name), repeatable.
    #[arg(long)]
    template: Vec<String>,
    /// A captioned WebDataset spec for image<->text retrieval.
    #[arg(long)]
    retrieval: Option<String>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Evaluate at most this many samples.
    #[arg(long)]
    max_samples: Option<usize>,
    /// `flex`, `cpu` or `cuda:N`.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Compute threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the random initialisation when no checkpoint is given.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Run the evaluation and print its JSON.
pub fn run(args: Args) -> anyhow::Result<()> {
    super::set_threads(args.threads)?;
    let device = distclip_model::device::parse_device(&args.device)?;
    device.seed(args.seed);
    let model = super::embed::load_model(&args.model, args.checkpoint.as_ref(), &device)?;
    let opts = EvalOptions { batch_size: args.batch_size.max(1), max_samples: args.max_samples, ..Default::default() };
    let out = if let Some(spec) = &args.retrieval {
        let m = retrieval(&model, &device, spec, &opts).context("retrieval evaluation")?;
        serde_json::json!({ "retrieval": m })
    } else {
        let path = args.zeroshot.as_deref().context("give --zeroshot or --retrieval")?;
        serde_json::json!({ "zeroshot": zero_shot(&model, &device, path, &args.template, &opts)? })
    };
    super::print_json(&out)
}

/// Zero-shot accuracy per task (`{task: {top1, top5, samples, chance}}`) for a task file, or
/// `{"folder": ...}` for an image folder.
pub fn zero_shot(
    model: &distclip_model::Clip,
    device: &burn::tensor::Device,
    path: &Path,
    templates: &[String],
    opts: &EvalOptions,
) -> anyhow::Result<serde_json::Value> {
    if path.is_dir() {
        let acc = zero_shot_folder(model, device, path, templates, opts).context("zero-shot evaluation")?;
        return Ok(serde_json::json!({ "folder": acc }));
    }
    let file = ZeroShotFile::load(path)?;
    let results = zero_shot_webdataset(model, device, &file, opts).context("zero-shot evaluation")?;
    Ok(serde_json::Value::Object(
        results.into_iter().map(|(name, acc)| (name, serde_json::to_value(acc).unwrap_or_default())).collect(),
    ))
}
