//! A raw sample to a training example: pick the image and caption as OpenCLIP does, decode with
//! the pixel limit, augment, normalise, tokenize.
//!
//! OpenCLIP's WebDataset path (`get_wds_dataset`) filters samples without `txt` or an image,
//! decodes with `wds.decode("pilrgb")` (so images are RGB *before* any transform: alpha is
//! dropped, grey replicated), renames `image="jpg;png;jpeg;webp"` (first present wins) and applies
//! `RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=BICUBIC)` then `ToTensor` and
//! `Normalize` for training, or the eval transform. This module does the same, with the crop and
//! resize from `distclip-image` (Pillow-exact bicubic).

use distclip_image::{ImageError, Raw8};
use rand::Rng;
use rand::SeedableRng;

use crate::caption::CaptionKey;
use crate::samples::{RawSample, SamplePos, Skip, SkipReason, skip};

/// Image member extensions, in OpenCLIP's order of preference.
pub const IMAGE_KEYS: [&str; 4] = ["jpg", "png", "jpeg", "webp"];
/// Captions longer than this many characters are skipped.
pub const MAX_CAPTION_CHARS: usize = 10_000;

/// How training images are augmented.
#[derive(Debug, Clone, PartialEq)]
pub enum Augment {
    /// The eval transform (resize shortest side, centre crop): `--augment none`.
    None,
    /// torchvision `RandomResizedCrop(size, scale, ratio, BICUBIC)`.
    RandomResizedCrop {
        /// Area fraction range (OpenCLIP: 0.9 to 1.0).
        scale: (f64, f64),
        /// Aspect ratio range (torchvision default: 3/4 to 4/3).
        ratio: (f64, f64),
    },
}

impl Augment {
    /// OpenCLIP's train augmentation: `RandomResizedCrop(scale=(0.9, 1.0))`.
    pub fn train() -> Self {
        Augment::RandomResizedCrop {
            scale: (0.9, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

/// Decoding, augmentation and tokenization settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformConfig {
    /// Output images are `3 x image_size x image_size`.
    pub image_size: usize,
    /// Train or eval transform.
    pub augment: Augment,
    /// Images whose header announces more pixels are skipped (decompression bombs).
    pub max_pixels: u64,
    /// Tokens per caption (77 for CLIP).
    pub context_length: usize,
    /// Where the caption is (`data.caption_key`): the `txt` member by default.
    pub caption_key: CaptionKey,
    /// Captions longer than this many characters are skipped.
    pub max_caption_chars: usize,
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self {
            image_size: 224,
            augment: Augment::train(),
            max_pixels: distclip_image::DEFAULT_MAX_PIXELS,
            context_length: 77,
            caption_key: CaptionKey::default(),
            max_caption_chars: MAX_CAPTION_CHARS,
        }
    }
}

/// One decoded, augmented, tokenized sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// `3 x H x W`, normalised with CLIP's mean and std.
    pub image: Vec<f32>,
    /// `context_length` token ids.
    pub tokens: Vec<i64>,
    /// Where it came from.
    pub pos: SamplePos,
    /// The sample key.
    pub key: String,
}

/// The image bytes (and extension) and caption of a sample, or why it has none. Checks run in a
/// fixed order so each bad sample is counted under exactly one reason.
pub fn select<'a>(
    raw: &'a RawSample,
    cfg: &TransformConfig,
) -> Result<(&'a str, &'a [u8], String), Skip> {
    let image = IMAGE_KEYS
        .iter()
        .find_map(|k| raw.members.iter().find(|(e, _)| e == k))
        .map(|(e, d)| (e.as_str(), d.as_slice()));
    let caption_member = cfg.caption_key.find(raw);
    let (Some((ext, image)), Some((caption_ext, caption))) = (image, caption_member) else {
        match raw.cut {
            Some(SkipReason::DuplicateKey) => {
                return Err(skip(SkipReason::DuplicateKey, "extension repeated under the same key"));
            }
            Some(reason) => {
                return Err(skip(reason, format!("the tar broke after members {}", member_list(raw))));
            }
            None => {}
        }
        return Err(match image {
            None => skip(
                SkipReason::MissingImage,
                format!("members: {}", member_list(raw)),
            ),
            Some(_) => skip(
                SkipReason::MissingCaption,
                format!("members: {}", member_list(raw)),
            ),
        });
    };
    if image.is_empty() {
        return Err(skip(
            SkipReason::ZeroByteMember,
            format!("{ext} has 0 bytes"),
        ));
    }
    if caption.is_empty() {
        return Err(skip(
            SkipReason::ZeroByteMember,
            "caption member has 0 bytes",
        ));
    }
    let text = cfg.caption_key.text_of(caption_ext, caption)?;
    let chars = text.chars().count();
    if chars > cfg.max_caption_chars {
        return Err(skip(
            SkipReason::CaptionTooLong,
            format!(
                "{chars} characters, over the limit of {}",
                cfg.max_caption_chars
            ),
        ));
    }
    Ok((ext, image, text))
}

fn member_list(raw: &RawSample) -> String {
    raw.members
        .iter()
        .map(|(e, _)| e.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A per-sample RNG that depends only on (seed, epoch, position), so augmentation is the same
/// whatever thread decodes the sample.
pub fn sample_rng(seed: u64, epoch: u64, pos: SamplePos) -> rand_chacha::ChaCha8Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&epoch.to_le_bytes());
    s[16..24].copy_from_slice(&(pos.shard as u64).to_le_bytes());
    s[24..].copy_from_slice(&pos.index.to_le_bytes());
    rand_chacha::ChaCha8Rng::from_seed(s)
}

/// Decode, augment and tokenize one sample.
pub fn decode_sample(
    raw: &RawSample,
    cfg: &TransformConfig,
    rng: &mut impl Rng,
) -> Result<Example, Skip> {
    let (ext, bytes, caption) = select(raw, cfg)?;
    let image = image_tensor(bytes, cfg, rng).map_err(|e| match e {
        ImageError::TooLarge { .. } => skip(SkipReason::ImageTooLarge, format!("{ext}: {e}")),
        other => skip(SkipReason::ImageDecodeError, format!("{ext}: {other}")),
    })?;
    let tokens = distclip_tokenizer::Tokenizer::shared()
        .tokenize(&caption, cfg.context_length)
        .into_iter()
        .map(i64::from)
        .collect();
    Ok(Example {
        image,
        tokens,
        pos: raw.pos,
        key: raw.key.clone(),
    })
}

/// Decode image bytes (as PIL's `pilrgb`: RGB first) and apply the configured transform.
pub fn image_tensor(
    bytes: &[u8],
    cfg: &TransformConfig,
    rng: &mut impl Rng,
) -> Result<Vec<f32>, ImageError> {
    let decoded = distclip_image::decode(bytes, cfg.max_pixels)?;
    let rgb = if decoded.channels == 3 {
        decoded
    } else {
        decoded.to_rgb()
    };
    match cfg.augment {
        Augment::None => distclip_image::eval_transform(&rgb, cfg.image_size),
        Augment::RandomResizedCrop { scale, ratio } => {
            let (top, left, h, w) =
                random_resized_crop_params(rgb.width, rgb.height, scale, ratio, rng);
            random_resized_crop(&rgb, (top, left, h, w), cfg.image_size)
        }
    }
}

/// Crop `(top, left, h, w)` and resize to `size x size` with Pillow's bicubic, then normalise.
pub fn random_resized_crop(
    img: &Raw8,
    (top, left, h, w): (usize, usize, usize, usize),
    size: usize,
) -> Result<Vec<f32>, ImageError> {
    let resized = distclip_image::resize_crop_bicubic(img, (left, top, w, h), size, size)?;
    Ok(if resized.channels == 3 {
        distclip_image::to_normalized_chw(&resized)
    } else {
        distclip_image::to_normalized_chw(&resized.to_rgb())
    })
}

/// Python's `round()`: half to even.
fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// torchvision `RandomResizedCrop.get_params`: returns `(top, left, h, w)`. Ten tries at a random
/// area fraction in `scale` and log-uniform aspect ratio in `ratio`, then the fallback (a centre
/// crop clamped to the ratio range).
pub fn random_resized_crop_params(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        if 0 < w && w as usize <= width && 0 < h && h as usize <= height {
            let (w, h) = (w as usize, h as usize);
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (min_r, max_r) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < min_r {
        (
            width,
            (py_round(width as f64 / min_r).max(1) as usize).min(height),
        )
    } else if in_ratio > max_r {
        (
            (py_round(height as f64 * max_r).max(1) as usize).min(width),
            height,
        )
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// `torch.empty(1).uniform_(lo, hi)`: `lo + (hi - lo) * u`, u in [0, 1).
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn jpeg(w: u32, h: u32, seed: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 9) as u8 ^ seed, (y * 5) as u8, seed.wrapping_mul(31)])
        });
        let mut out = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut out),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        out
    }

    fn raw(members: &[(&str, &[u8])]) -> RawSample {
        RawSample {
            key: "k".into(),
            members: members
                .iter()
                .map(|(e, d)| (e.to_string(), d.to_vec()))
                .collect(),
            pos: SamplePos { shard: 0, index: 0 },
            cut: None,
            draw: 0,
        }
    }

    fn cfg(size: usize) -> TransformConfig {
        TransformConfig {
            image_size: size,
            ..Default::default()
        }
    }

    #[test]
    fn rrc_params_stay_inside_and_cover_the_scale_range() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (w, h) in [(64, 48), (200, 100), (33, 97), (1, 1), (500, 2)] {
            for _ in 0..200 {
                let (top, left, ch, cw) =
                    random_resized_crop_params(w, h, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
                assert!(
                    ch >= 1 && cw >= 1 && top + ch <= h && left + cw <= w,
                    "{w}x{h}: {top} {left} {ch} {cw}"
                );
            }
        }
        // A square 100x100 image: w*h within rounding of 9000..10000 when a try succeeds.
        let (_, _, ch, cw) =
            random_resized_crop_params(100, 100, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert!((8800..=10000).contains(&(ch * cw)), "{ch}x{cw}");
    }

    #[test]
    fn rrc_fallback_is_torchvisions() {
        // 500x2: no try fits (h would be ~31); in_ratio 250 > 4/3: h = 2, w = round(2 * 4/3) = 3.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        assert_eq!(
            random_resized_crop_params(500, 2, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng),
            (0, 248, 2, 3)
        );
        // 2x500: in_ratio < 3/4: w = 2, h = round(2 / 0.75) = 3 (2.67).
        assert_eq!(
            random_resized_crop_params(2, 500, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng),
            (248, 0, 3, 2)
        );
        // scale > 1 never fits: whole image.
        assert_eq!(
            random_resized_crop_params(40, 30, (2.0, 3.0), (0.75, 4.0 / 3.0), &mut rng),
            (0, 0, 30, 40)
        );
    }

    #[test]
    fn python_rounding_is_half_to_even() {
        assert_eq!(
            (py_round(2.5), py_round(3.5), py_round(2.6), py_round(-0.5)),
            (2, 4, 3, 0)
        );
    }

    #[test]
    fn eval_and_train_transforms_give_normalised_chw() {
        let jpg = jpeg(40, 30, 7);
        let mut rng = sample_rng(0, 0, SamplePos { shard: 0, index: 0 });
        let mut c = cfg(16);
        let t = image_tensor(&jpg, &c, &mut rng).unwrap();
        assert_eq!(t.len(), 3 * 16 * 16);
        c.augment = Augment::None;
        let e = image_tensor(&jpg, &c, &mut rng).unwrap();
        let rgb = distclip_image::decode(&jpg, u64::MAX).unwrap();
        assert_eq!(e, distclip_image::eval_transform(&rgb, 16).unwrap());
        // A full-image crop equals a plain bicubic resize.
        let full = random_resized_crop(&rgb, (0, 0, 30, 40), 16).unwrap();
        let want = distclip_image::to_normalized_chw(&distclip_image::resize_bicubic(&rgb, 16, 16));
        assert_eq!(full, want);
    }

    #[test]
    fn same_position_same_augmentation_different_position_differs() {
        let jpg = jpeg(64, 64, 1);
        let c = cfg(16);
        let p = SamplePos { shard: 3, index: 9 };
        let a = image_tensor(&jpg, &c, &mut sample_rng(5, 1, p)).unwrap();
        let b = image_tensor(&jpg, &c, &mut sample_rng(5, 1, p)).unwrap();
        assert_eq!(a, b);
        let draws: std::collections::HashSet<_> = (0..20)
            .map(|i| {
                random_resized_crop_params(
                    64,
                    64,
                    (0.9, 1.0),
                    (0.75, 4.0 / 3.0),
                    &mut sample_rng(5, 1, SamplePos { shard: 3, index: i }),
                )
            })
            .collect();
        assert!(draws.len() > 5, "{draws:?}");
    }

    #[test]
    fn sample_selection_reasons() {
        let jpg = jpeg(8, 8, 0);
        let c = cfg(8);
        let reason = |members: &[(&str, &[u8])], c: &TransformConfig| {
            select(&raw(members), c).err().map(|s| s.reason)
        };
        assert_eq!(reason(&[("jpg", &jpg), ("txt", b"a cat")], &c), None);
        assert_eq!(
            reason(&[("txt", b"a cat")], &c),
            Some(SkipReason::MissingImage)
        );
        assert_eq!(
            reason(&[("png", &jpg)], &c),
            Some(SkipReason::MissingCaption)
        );
        assert_eq!(
            reason(&[("jpg", b""), ("txt", b"x")], &c),
            Some(SkipReason::ZeroByteMember)
        );
        assert_eq!(
            reason(&[("jpg", &jpg), ("txt", b"")], &c),
            Some(SkipReason::ZeroByteMember)
        );
        assert_eq!(
            reason(&[("jpg", &jpg), ("txt", b"\xff\xfe")], &c),
            Some(SkipReason::CaptionNotUtf8)
        );
        let long = "é".repeat(10_001);
        assert_eq!(
            reason(&[("jpg", &jpg), ("txt", long.as_bytes())], &c),
            Some(SkipReason::CaptionTooLong)
        );
        let ok = "é".repeat(10_000);
        assert_eq!(reason(&[("jpg", &jpg), ("txt", ok.as_bytes())], &c), None);
        let mut dup = raw(&[("jpg", &jpg)]);
        dup.cut = Some(SkipReason::DuplicateKey);
        assert_eq!(
            select(&dup, &c).unwrap_err().reason,
            SkipReason::DuplicateKey
        );
        // Caption from a json field.
        let cj = TransformConfig {
            caption_key: "json:caption".parse().unwrap(),
            ..c.clone()
        };
        let (_, _, text) = select(
            &raw(&[("jpg", &jpg), ("json", br#"{"caption": "a dog"}"#)]),
            &cj,
        )
        .unwrap();
        assert_eq!(text, "a dog");
        assert_eq!(
            reason(&[("jpg", &jpg), ("json", br#"{"url": "x"}"#)], &cj),
            Some(SkipReason::MissingCaption)
        );
        assert_eq!(
            reason(&[("jpg", &jpg), ("json", b"{nope")], &cj),
            Some(SkipReason::BadCaptionJson)
        );
        assert_eq!(
            reason(&[("jpg", &jpg), ("json", br#"{"caption": 3}"#)], &cj),
            Some(SkipReason::BadCaptionJson)
        );
        assert_eq!(
            reason(&[("jpg", &jpg), ("txt", b"t")], &cj),
            Some(SkipReason::MissingCaption)
        );
        // OpenCLIP's preference order: jpg before png.
        let png = {
            let mut out = Vec::new();
            image::RgbImage::new(4, 4)
                .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
                .unwrap();
            out
        };
        let s = raw(&[("png", &png), ("jpg", &jpg), ("txt", b"t")]);
        assert_eq!(select(&s, &c).unwrap().0, "jpg");
    }

    #[test]
    fn decode_reasons_and_tokens() {
        let jpg = jpeg(20, 10, 0);
        let c = cfg(8);
        let mut rng = sample_rng(0, 0, SamplePos { shard: 0, index: 0 });
        let ex = decode_sample(
            &raw(&[("jpg", &jpg), ("txt", b"a photo of a cat")]),
            &c,
            &mut rng,
        )
        .unwrap();
        let want: Vec<i64> = distclip_tokenizer::Tokenizer::shared()
            .tokenize("a photo of a cat", 77)
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!((ex.tokens, ex.image.len()), (want, 3 * 8 * 8));
        let truncated = &jpg[..jpg.len() / 2];
        let err =
            decode_sample(&raw(&[("jpg", truncated), ("txt", b"x")]), &c, &mut rng).unwrap_err();
        assert_eq!(err.reason, SkipReason::ImageDecodeError);
        let err = decode_sample(
            &raw(&[("webp", b"RIFF\0\0\0\0WEBPjunk"), ("txt", b"x")]),
            &c,
            &mut rng,
        )
        .unwrap_err();
        assert_eq!(err.reason, SkipReason::ImageDecodeError);
        let small = TransformConfig {
            max_pixels: 199,
            ..c
        };
        let err =
            decode_sample(&raw(&[("jpg", &jpg), ("txt", b"x")]), &small, &mut rng).unwrap_err();
        assert_eq!(err.reason, SkipReason::ImageTooLarge);
        assert!(err.detail.contains("200"), "{}", err.detail);
    }
}
