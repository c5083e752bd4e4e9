//! `distclip eval --checkpoint FILE --model NAME (--zeroshot DIR|FILE | --retrieval SPEC)`:
//! zero-shot classification or image-text retrieval, as OpenCLIP evaluates, printed as JSON.

use std::path::PathBuf;

use anyhow::Context;
use distclip_eval::{EvalOptions, Suite, evaluate};

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
    /// Where the retrieval captions are, as `data.caption_key` in a run config: `txt`, another
    /// member such as `caption`, or `json:FIELD`.
    #[arg(long, default_value = "txt", value_parser = clap::value_parser!(distclip_data::CaptionKey))]
    caption_key: distclip_data::CaptionKey,
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
    let opts = EvalOptions {
        batch_size: args.batch_size.max(1),
        max_samples: args.max_samples,
        caption_key: args.caption_key.clone(),
        ..Default::default()
    };
    let suite = Suite {
        zeroshot: args.zeroshot.as_ref().map(|p| p.display().to_string()),
        templates: args.template.clone(),
        retrieval: args.retrieval.clone(),
    };
    let what = if suite.retrieval.is_some() { "retrieval evaluation" } else { "zero-shot evaluation" };
    let out = evaluate(&model, &device, &suite, &opts).context(what)?;
    super::print_json(&out)
}
