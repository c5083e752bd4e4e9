//! `distclip models`: built-in configs and their sizes.

use distclip_model::config::{preset, preset_names};

/// Arguments of `distclip models`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Run the command: one JSON object with a row per preset.
pub fn run(_args: Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for name in preset_names() {
        let cfg = preset(name).expect("listed preset exists")?;
        rows.push(serde_json::json!({
            "name": name,
            "params": cfg.num_params(),
            "embed_dim": cfg.embed_dim,
            "image_size": cfg.vision_cfg.image_size,
            "patch_size": cfg.vision_cfg.patch_size,
            "vision_width": cfg.vision_cfg.width,
            "vision_layers": cfg.vision_cfg.layers,
            "text_width": cfg.text_cfg.width,
            "text_layers": cfg.text_cfg.layers,
            "context_length": cfg.text_cfg.context_length,
        }));
    }
    super::print_json(&serde_json::json!({ "models": rows }))
}
