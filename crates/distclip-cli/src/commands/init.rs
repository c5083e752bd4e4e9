//! `distclip init`: a freshly initialised model (OpenCLIP's init scheme) as OpenCLIP-named
//! safetensors that `open_clip` loads with `strict=True`.

use std::path::PathBuf;

use anyhow::Context;
use distclip_model::{ClipConfig, checkpoint::save_safetensors};

/// Arguments of `distclip init`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A built-in config name (see `distclip models`) or an OpenCLIP config JSON file.
    #[arg(long)]
    model: String,
    /// Output `.safetensors` file.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Run the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = ClipConfig::from_name_or_path(&args.model)?;
    let device = distclip_model::device::parse_device("flex")?;
    device.seed(args.seed);
    let model = cfg.init(&device);
    save_safetensors(&model, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(model = %args.model, params = cfg.num_params(), out = %args.out.display(), "wrote initialised model");
    super::print_json(&serde_json::json!({
        "out": args.out.display().to_string(),
        "model": args.model,
        "params": cfg.num_params(),
        "seed": args.seed,
    }))
}
