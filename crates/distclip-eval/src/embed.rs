//! Streaming a WebDataset through the eval transform and the model, batch by batch, so that only
//! embeddings (never decoded images of the whole set) are held.

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};
use distclip_data::{RetryPolicy, ShardEvent, ShardList, ShardOpener, ShardReader};
use distclip_model::{Clip, l2_normalize};
use distclip_tokenizer::Tokenizer;
use rayon::prelude::*;

use crate::EvalError;

/// Evaluation settings.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Images (or texts) encoded per forward pass.
    pub batch_size: usize,
    /// Stop after this many usable samples.
    pub max_samples: Option<usize>,
    /// Images announcing more pixels are skipped.
    pub max_pixels: u64,
    /// Where the caption is (`data.caption_key`: `txt`, another member, or `json:FIELD`), read
    /// exactly as training reads it.
    pub caption_key: distclip_data::CaptionKey,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 64,
            max_samples: None,
            max_pixels: distclip_image::DEFAULT_MAX_PIXELS,
            caption_key: distclip_data::CaptionKey::default(),
        }
    }
}

/// One usable sample: its preprocessed image, caption and JSON metadata.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Sample key.
    pub key: String,
    /// `3 × S × S`, CLIP-normalised (eval transform).
    pub image: Vec<f32>,
    /// Caption (empty when the sample has none).
    pub caption: String,
    /// The parsed `json` member, if any.
    pub json: Option<serde_json::Value>,
}

fn to_pair(raw: &distclip_data::RawSample, size: usize, opts: &EvalOptions) -> Option<Pair> {
    let bytes = distclip_data::transform::IMAGE_KEYS.iter().find_map(|e| raw.get(e))?;
    let decoded = distclip_image::decode(bytes, opts.max_pixels).ok()?;
    let rgb = if decoded.channels == 3 { decoded } else { decoded.to_rgb() };
    let image = distclip_image::eval_transform(&rgb, size).ok()?;
    let json = raw.get("json").and_then(|b| serde_json::from_slice(b).ok());
    // Read as training reads it. Zero-shot sets need no caption, so a sample without a usable
    // one keeps an empty caption here and retrieval leaves it out.
    let caption = opts.caption_key.caption(raw).map(|c| c.trim().to_owned()).unwrap_or_default();
    Some(Pair { key: raw.key.clone(), image, caption, json })
}

/// Read every shard of `spec` in order and call `f` with batches of up to `opts.batch_size`
/// usable pairs (eval transform at `image_size`). Returns (pairs delivered, samples skipped).
/// Unreadable shards are an error: an evaluation over part of a set would mislead.
pub fn read_pairs(
    spec: &str,
    image_size: usize,
    opts: &EvalOptions,
    mut f: impl FnMut(Vec<Pair>) -> Result<(), EvalError>,
) -> Result<(usize, usize), EvalError> {
    let list = Arc::new(ShardList::parse(spec).map_err(|e| EvalError::Input(format!("eval data {spec:?}: {e}")))?);
    if list.is_empty() {
        return Err(EvalError::Empty(spec.to_owned()));
    }
    let opener = ShardOpener::new(RetryPolicy::default());
    let limit = opts.max_samples.unwrap_or(usize::MAX);
    let (mut delivered, mut skipped) = (0usize, 0usize);
    let mut raw = Vec::with_capacity(opts.batch_size);
    let mut flush = |raw: &mut Vec<distclip_data::RawSample>, delivered: &mut usize, skipped: &mut usize| {
        let pairs: Vec<Option<Pair>> = raw.par_iter().map(|r| to_pair(r, image_size, opts)).collect();
        raw.clear();
        let before = pairs.len();
        let mut good: Vec<Pair> = pairs.into_iter().flatten().collect();
        *skipped += before - good.len();
        good.truncate(limit - *delivered);
        *delivered += good.len();
        if good.is_empty() { Ok(()) } else { f(good) }
    };
    for (i, shard) in list.shards.iter().enumerate() {
        let stream = opener.open(&shard.url).map_err(|e| EvalError::Input(format!("eval shard {}: {e}", shard.url)))?;
        for event in ShardReader::new(stream, i, 0) {
            match event {
                ShardEvent::Sample(s) => {
                    raw.push(s);
                    if raw.len() == opts.batch_size.max(1) {
                        flush(&mut raw, &mut delivered, &mut skipped)?;
                        if delivered >= limit {
                            return Ok((delivered, skipped));
                        }
                    }
                }
                ShardEvent::Member { .. } => skipped += 1,
                ShardEvent::Failed { message, .. } => {
                    return Err(EvalError::Input(format!("eval shard {} is unreadable: {message}", shard.url)));
                }
            }
        }
    }
    flush(&mut raw, &mut delivered, &mut skipped)?;
    Ok((delivered, skipped))
}

/// L2-normalised image embeddings of `n` preprocessed images (`n × 3 × S × S`), row-major.
pub fn encode_images(model: &Clip, device: &Device, images: &[f32], n: usize) -> Result<Vec<f32>, EvalError> {
    let s = model.image_size();
    if images.len() != n * 3 * s * s {
        return Err(EvalError::Model(format!("expected {n} images of 3x{s}x{s}, got {} values", images.len())));
    }
    let x = Tensor::<4>::from_data(TensorData::new(images.to_vec(), [n, 3, s, s]), device);
    let f = l2_normalize(model.encode_image(x));
    f.into_data().try_to_vec::<f32>().map_err(|e| EvalError::Model(format!("{e:?}")))
}

/// L2-normalised text embeddings of `texts`, tokenized as `open_clip.tokenize` does.
pub fn encode_texts(model: &Clip, device: &Device, texts: &[String], batch_size: usize) -> Result<Vec<f32>, EvalError> {
    let ctx = model.context_length();
    let tok = Tokenizer::shared();
    let mut out = Vec::new();
    for chunk in texts.chunks(batch_size.max(1)) {
        let ids: Vec<i64> = chunk.iter().flat_map(|t| tok.tokenize(t, ctx).into_iter().map(i64::from)).collect();
        let x = Tensor::<2, Int>::from_data(TensorData::new(ids, [chunk.len(), ctx]), device);
        let f = l2_normalize(model.encode_text(x));
        out.extend(f.into_data().try_to_vec::<f32>().map_err(|e| EvalError::Model(format!("{e:?}")))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distclip_data::transform::select;
    use distclip_data::{CaptionKey, RawSample, SamplePos, TransformConfig};

    fn jpeg() -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 9]))
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg)
            .unwrap();
        out
    }

    /// `data.caption_key` means the same in training (the loader's `select`) and evaluation
    /// (`to_pair`), for a plain member, another member and a JSON field; before, training read
    /// `txt` for every key that was not `json:` and evaluation ignored the run's key.
    #[test]
    fn training_and_evaluation_read_the_same_caption() {
        let members: Vec<(String, Vec<u8>)> = vec![
            ("jpg".into(), jpeg()),
            ("txt".into(), b"from txt".to_vec()),
            ("caption".into(), b"from caption".to_vec()),
            ("json".into(), br#"{"caption": "from json"}"#.to_vec()),
        ];
        let raw = RawSample { key: "k".into(), members, pos: SamplePos { shard: 0, index: 0 }, cut: None, draw: 0 };
        for (key, want) in [("txt", "from txt"), ("caption", "from caption"), ("json:caption", "from json")] {
            let key: CaptionKey = key.parse().unwrap();
            let train = TransformConfig { image_size: 8, caption_key: key.clone(), ..TransformConfig::default() };
            let (_, _, trained) = select(&raw, &train).unwrap();
            let eval = EvalOptions { caption_key: key.clone(), ..EvalOptions::default() };
            let evaluated = to_pair(&raw, 8, &eval).unwrap().caption;
            assert_eq!((trained.as_str(), evaluated.as_str()), (want, want), "{key}");
        }
        // A key the sample lacks: training skips the sample as missing its caption; evaluation
        // keeps the image (zero-shot needs no caption) with an empty caption, which retrieval
        // leaves out.
        let absent: CaptionKey = "json:alt".parse().unwrap();
        let train = TransformConfig { image_size: 8, caption_key: absent.clone(), ..TransformConfig::default() };
        assert_eq!(select(&raw, &train).unwrap_err().reason, distclip_data::SkipReason::MissingCaption);
        let eval = EvalOptions { caption_key: absent, ..EvalOptions::default() };
        assert_eq!(to_pair(&raw, 8, &eval).unwrap().caption, "");
    }
}
