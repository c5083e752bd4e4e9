//! `distclip embed`: OpenCLIP's `encode_image(normalize=True)` / `encode_text(normalize=True)`
//! after its eval preprocessing, plus zero-shot probabilities when both images and texts are
//! given.

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::{Device, Int, Tensor, TensorData};
use distclip_model::checkpoint::{load_state_dict, read_state_dict};
use distclip_model::{Clip, ClipConfig, l2_normalize};
use distclip_tokenizer::Tokenizer;

/// Arguments of `distclip embed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A built-in config name (see `distclip models`) or an OpenCLIP config JSON file.
    #[arg(long)]
    model: String,
    /// Weights: OpenCLIP or distclip `.safetensors`, or a PyTorch `.bin`/`.pt` state dict.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// An image file (JPEG, PNG or WebP); repeat for several.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A text; repeat for several.
    #[arg(long = "text")]
    texts: Vec<String>,
    /// `flex`, `cpu` (libtorch) or `cuda:N` (libtorch).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Images or texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

/// Load a model from a config name or file and an optional checkpoint.
pub fn load_model(model: &str, checkpoint: Option<&PathBuf>, device: &Device) -> anyhow::Result<Clip> {
    let cfg = ClipConfig::from_name_or_path(model)?;
    let clip = cfg.init(device);
    match checkpoint {
        Some(path) => {
            let mut state = read_state_dict(path)?;
            if let Some((from, to)) = distclip_model::pos_embed::resize_pos_embed(&mut state, cfg.grid_size())? {
                tracing::info!(from, to, "resized the checkpoint's positional embedding to the model's patch grid");
            }
            Ok(load_state_dict(clip, &state).with_context(|| format!("loading {}", path.display()))?)
        }
        None => {
            tracing::warn!("no --checkpoint given: embedding with randomly initialised weights");
            Ok(clip)
        }
    }
}

fn rows(t: Tensor<2>) -> anyhow::Result<Vec<Vec<f32>>> {
    let [_, d] = t.dims();
    let flat = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading embeddings back: {e:?}"))?;
    Ok(flat.chunks(d).map(<[f32]>::to_vec).collect())
}

/// Preprocessed `[n, 3, s, s]` pixels of image files, each error naming its file.
pub fn load_images(paths: &[PathBuf], size: usize) -> anyhow::Result<Vec<f32>> {
    let mut pixels = Vec::with_capacity(paths.len() * 3 * size * size);
    for path in paths {
        let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
        let img = distclip_image::decode(&bytes, distclip_image::DEFAULT_MAX_PIXELS)
            .with_context(|| format!("image {}", path.display()))?;
        pixels.extend(distclip_image::eval_transform(&img, size).with_context(|| format!("image {}", path.display()))?);
    }
    Ok(pixels)
}

/// Normalised image embeddings of image files, `batch` at a time.
pub fn embed_images(model: &Clip, paths: &[PathBuf], batch: usize, device: &Device) -> anyhow::Result<Vec<Vec<f32>>> {
    let s = model.image_size();
    let mut out = Vec::new();
    for chunk in paths.chunks(batch.max(1)) {
        let pixels = load_images(chunk, s)?;
        let images = Tensor::<4>::from_data(TensorData::new(pixels, [chunk.len(), 3, s, s]), device);
        out.extend(rows(l2_normalize(model.encode_image(images)))?);
    }
    Ok(out)
}

/// Normalised text embeddings, `batch` at a time.
pub fn embed_texts(model: &Clip, texts: &[String], batch: usize, device: &Device) -> anyhow::Result<Vec<Vec<f32>>> {
    let ctx = model.context_length();
    let tok = Tokenizer::shared();
    let mut out = Vec::new();
    for chunk in texts.chunks(batch.max(1)) {
        let ids: Vec<i64> = tok
            .tokenize_batch(chunk, ctx)
            .into_iter()
            .flatten()
            .map(i64::from)
            .collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [chunk.len(), ctx]), device);
        out.extend(rows(l2_normalize(model.encode_text(tokens)))?);
    }
    Ok(out)
}

/// Row-wise softmax of `scale * cosine` (+ bias): zero-shot class probabilities.
pub fn zero_shot_probs(images: &[Vec<f32>], texts: &[Vec<f32>], scale: f32, bias: f32) -> Vec<Vec<f32>> {
    images
        .iter()
        .map(|im| {
            let logits: Vec<f32> = texts
                .iter()
                .map(|t| scale * im.iter().zip(t).map(|(a, b)| a * b).sum::<f32>() + bias)
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.iter().map(|e| e / sum).collect()
        })
        .collect()
}

/// Run the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.images.is_empty() || !args.texts.is_empty(),
        "nothing to embed: pass at least one --image PATH or --text TEXT"
    );
    let device = distclip_model::device::parse_device(&args.device)?;
    let model = load_model(&args.model, args.checkpoint.as_ref(), &device)?;
    let image_embeddings = embed_images(&model, &args.images, args.batch_size, &device)?;
    let text_embeddings = embed_texts(&model, &args.texts, args.batch_size, &device)?;
    let scale = model.logit_scale_exp();
    let bias = model
        .logit_bias
        .as_ref()
        .map(|b| b.val().into_scalar::<f32>());
    let mut out = serde_json::json!({
        "image_embeddings": image_embeddings,
        "text_embeddings": text_embeddings,
        "logit_scale": scale,
    });
    if let Some(b) = bias {
        out["logit_bias"] = b.into();
    }
    if !image_embeddings.is_empty() && !text_embeddings.is_empty() {
        out["probs"] = serde_json::json!(zero_shot_probs(&image_embeddings, &text_embeddings, scale, bias.unwrap_or(0.0)));
    }
    super::print_json(&out)
}
