//! A synthetic captioned dataset a tiny CLIP learns in minutes: shapes x colours x positions,
//! drawn procedurally ("a red circle at the top left"), JPEG-encoded, in the same layout as
//! [`crate::writer`] (`train/00000.tar`, `sizes.json`), with a held-out split in separate shards
//! (`val/`), `classes.json` and `zeroshot.json` (class names and prompt templates for zero-shot
//! classification of the shape and of the colour).
//!
//! Every sample is a pure function of (seed, split, index), so output is reproducible.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::writer::{ShardWriter, WriteError, encode_jpeg, spec_for};

/// Shape names, in class order.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];
/// Colour names and RGB values, in class order.
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 60, 220]),
    ("yellow", [240, 220, 30]),
    ("orange", [245, 140, 20]),
    ("purple", [140, 40, 180]),
    ("white", [250, 250, 250]),
    ("black", [15, 15, 15]),
];
/// Position names (quadrants), in class order.
pub const POSITIONS: [&str; 4] = ["top left", "top right", "bottom left", "bottom right"];

/// Settings for [`synth`].
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Training samples.
    pub samples: usize,
    /// Held-out samples (written to `val/`).
    pub val_samples: usize,
    /// Samples per shard.
    pub samples_per_shard: usize,
    /// Image side in pixels.
    pub image_size: u32,
    /// Seed.
    pub seed: u64,
    /// JPEG quality.
    pub jpeg_quality: u8,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            samples: 10_000,
            val_samples: 1_000,
            samples_per_shard: 1_000,
            image_size: 64,
            seed: 0,
            jpeg_quality: 90,
            progress: true,
        }
    }
}

/// What [`synth`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthSummary {
    /// Training samples and shards.
    pub samples: usize,
    /// Training shards.
    pub shards: usize,
    /// Held-out samples.
    pub val_samples: usize,
    /// Held-out shards.
    pub val_shards: usize,
    /// Spec of the training shards.
    pub train_spec: String,
    /// Spec of the held-out shards (empty when there are none).
    pub val_spec: String,
    /// `classes.json`.
    pub classes: String,
    /// `zeroshot.json`.
    pub zeroshot: String,
}

/// The labels of one synthetic sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Labels {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`POSITIONS`].
    pub position: usize,
}

impl Labels {
    /// "a red circle at the top left".
    pub fn caption(&self) -> String {
        caption(COLOURS[self.colour].0, SHAPES[self.shape], POSITIONS[self.position])
    }
}

/// The one caption form, shared by the training captions and the zero-shot prompts.
fn caption(colour: &str, shape: &str, position: &str) -> String {
    format!("a {colour} {shape} at the {position}")
}

/// Draw one sample: RGB8 pixels (`size x size`) and its labels.
pub fn draw(rng: &mut impl Rng, size: u32) -> (Vec<u8>, Labels) {
    let labels = Labels {
        shape: rng.random_range(0..SHAPES.len()),
        colour: rng.random_range(0..COLOURS.len()),
        position: rng.random_range(0..POSITIONS.len()),
    };
    let s = size as f64;
    // A mid-grey background (so white and black shapes show), slightly varied.
    let bg = rng.random_range(95..=160) as f64;
    let tint: [f64; 3] = std::array::from_fn(|_| rng.random_range(-12.0..12.0));
    // Shape radius 14-20% of the side, centred in its quadrant with jitter.
    let r = s * rng.random_range(0.14..0.20);
    let (qx, qy) = (labels.position % 2, labels.position / 2);
    let cx = s * (0.25 + 0.5 * qx as f64) + s * rng.random_range(-0.05..0.05);
    let cy = s * (0.25 + 0.5 * qy as f64) + s * rng.random_range(-0.05..0.05);
    let rot = rng.random_range(-0.3..0.3f64);
    let colour = COLOURS[labels.colour].1;
    let mut px = Vec::with_capacity((size * size * 3) as usize);
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
            let inside = inside(labels.shape, dx, dy, r, rot);
            let noise = rng.random_range(-6.0..6.0);
            for c in 0..3 {
                let v = if inside {
                    f64::from(colour[c])
                } else {
                    bg + tint[c]
                };
                px.push((v + noise).clamp(0.0, 255.0) as u8);
            }
        }
    }
    (px, labels)
}

/// Whether `(dx, dy)` (from the centre) is inside the shape of radius `r`, rotated by `rot`.
fn inside(shape: usize, dx: f64, dy: f64, r: f64, rot: f64) -> bool {
    let (sin, cos) = rot.sin_cos();
    let (x, y) = (dx * cos + dy * sin, -dx * sin + dy * cos);
    match shape {
        0 => x * x + y * y <= r * r,
        1 => x.abs() <= r * 0.85 && y.abs() <= r * 0.85,
        2 => {
            // Upright triangle: apex at (0, -r), base at y = r/2.
            let h = 1.5 * r;
            let t = (y + r) / h; // 0 at the apex, 1 at the base
            (0.0..=1.0).contains(&t) && x.abs() <= t * r * 0.95
        }
        _ => {
            // Five-pointed star: radius alternates between r and 0.45 r with the angle.
            let angle = y.atan2(x) + std::f64::consts::FRAC_PI_2;
            let sector = std::f64::consts::TAU / 10.0;
            let k = (angle.rem_euclid(2.0 * sector) - sector).abs() / sector; // 0 at a tip, 1 at a notch
            let limit = r * (1.0 - 0.55 * k);
            (x * x + y * y).sqrt() <= limit
        }
    }
}

fn sample_seed(seed: u64, split: u64, index: usize) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&split.to_le_bytes());
    s[16..24].copy_from_slice(&(index as u64).to_le_bytes());
    s[24..].copy_from_slice(b"synthclp");
    s
}

fn write_split(
    dir: &Path,
    split: u64,
    n: usize,
    cfg: &SynthConfig,
    bar: &indicatif::ProgressBar,
) -> Result<usize, WriteError> {
    let mut w = ShardWriter::new(dir, cfg.samples_per_shard)?.with_mtime(Some(0));
    for i in 0..n {
        let mut rng = ChaCha8Rng::from_seed(sample_seed(cfg.seed, split, i));
        let (px, labels) = draw(&mut rng, cfg.image_size);
        let jpg = encode_jpeg(&px, cfg.image_size, cfg.image_size, cfg.jpeg_quality)
            .map_err(WriteError::Config)?;
        let caption = labels.caption();
        let meta = serde_json::json!({
            "caption": caption,
            "shape": SHAPES[labels.shape],
            "colour": COLOURS[labels.colour].0,
            "position": POSITIONS[labels.position],
            "shape_id": labels.shape,
            "colour_id": labels.colour,
            "position_id": labels.position,
            "width": cfg.image_size,
            "height": cfg.image_size,
        });
        let meta = serde_json::to_vec(&meta).unwrap_or_default();
        w.write(&[("jpg", &jpg), ("txt", caption.as_bytes()), ("json", &meta)])?;
        bar.inc(1);
    }
    Ok(w.finish()?.len())
}

/// `distclip synth --out DIR --samples N [--samples-per-shard M] [--image-size PX] [--seed S]`.
pub fn synth(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary, WriteError> {
    if cfg.samples == 0 || cfg.image_size < 8 {
        return Err(WriteError::Config(
            "synth needs at least 1 sample and an image size of at least 8".into(),
        ));
    }
    let bar = if cfg.progress {
        indicatif::ProgressBar::new((cfg.samples + cfg.val_samples) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let train = out.join("train");
    let val = out.join("val");
    let shards = write_split(&train, 0, cfg.samples, cfg, &bar)?;
    let val_shards = if cfg.val_samples > 0 {
        write_split(&val, 1, cfg.val_samples, cfg, &bar)?
    } else {
        0
    };
    bar.finish_and_clear();
    let write_json = |name: &str, v: serde_json::Value| -> Result<String, WriteError> {
        let path = out.join(name);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        )
        .map_err(|source| WriteError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(path.display().to_string())
    };
    let colours: Vec<&str> = COLOURS.iter().map(|c| c.0).collect();
    let classes = write_json(
        "classes.json",
        serde_json::json!({"shape": SHAPES, "colour": colours, "position": POSITIONS}),
    )?;
    let val_spec = if val_shards > 0 {
        spec_for(&val, val_shards)
    } else {
        String::new()
    };
    // Prompts read exactly like the training captions, ensembled over the attributes that are
    // not classified ("a {} circle at the top left", ...). Shorter prompts ("a {} circle") end
    // where no training caption ends, so the text tower pools at a position it never learnt;
    // that made the demo's accuracy swing by 10 points between runs that trained equally well
    // (BENCHMARKS.md, convergence against OpenCLIP).
    let shape_templates: Vec<String> = colours
        .iter()
        .flat_map(|c| POSITIONS.iter().map(move |p| caption(c, "{}", p)))
        .collect();
    let colour_templates: Vec<String> = SHAPES
        .iter()
        .flat_map(|s| POSITIONS.iter().map(move |p| caption("{}", s, p)))
        .collect();
    let zeroshot = write_json(
        "zeroshot.json",
        serde_json::json!({
            "spec": val_spec,
            "tasks": [
                {"name": "shape", "label_key": "shape_id", "classnames": SHAPES, "templates": shape_templates},
                {"name": "colour", "label_key": "colour_id", "classnames": colours, "templates": colour_templates},
            ],
        }),
    )?;
    Ok(SynthSummary {
        samples: cfg.samples,
        shards,
        val_samples: cfg.val_samples,
        val_shards,
        train_spec: spec_for(&train, shards),
        val_spec,
        classes,
        zeroshot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::{ShardEvent, ShardReader};

    #[test]
    fn shapes_are_where_the_caption_says() {
        let size = 64;
        for i in 0..40 {
            let mut rng = ChaCha8Rng::from_seed(sample_seed(1, 0, i));
            let (px, l) = draw(&mut rng, size);
            let colour = COLOURS[l.colour].1;
            // Count pixels near the shape colour in each quadrant: the labelled one dominates.
            let mut quad = [0usize; 4];
            for y in 0..size {
                for x in 0..size {
                    let p = &px[((y * size + x) * 3) as usize..][..3];
                    if (0..3).all(|c| (i32::from(p[c]) - i32::from(colour[c])).abs() <= 8) {
                        quad[((y >= size / 2) as usize) * 2 + (x >= size / 2) as usize] += 1;
                    }
                }
            }
            let best = (0..4).max_by_key(|&q| quad[q]).unwrap();
            assert_eq!(best, l.position, "sample {i}: {} {quad:?}", l.caption());
            assert!(quad[best] > 60, "sample {i}: shape too small {quad:?}");
        }
        assert_eq!(
            Labels {
                shape: 0,
                colour: 0,
                position: 0
            }
            .caption(),
            "a red circle at the top left"
        );
    }

    #[test]
    fn synth_writes_train_val_classes_and_prompts_reproducibly() {
        let root = std::env::temp_dir().join(format!("distclip-synth-{}", std::process::id()));
        let cfg = SynthConfig {
            samples: 10,
            val_samples: 3,
            samples_per_shard: 4,
            image_size: 16,
            seed: 7,
            progress: false,
            ..Default::default()
        };
        let s = synth(&root.join("a"), &cfg).unwrap();
        assert_eq!((s.shards, s.val_shards), (3, 1));
        assert_eq!(
            s.train_spec,
            format!("{}/{{00000..00002}}.tar", root.join("a/train").display())
        );
        let sizes: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("a/train/sizes.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            sizes,
            serde_json::json!({"00000.tar": 4, "00001.tar": 4, "00002.tar": 2})
        );
        synth(&root.join("b"), &cfg).unwrap();
        for f in [
            "train/00000.tar",
            "train/00002.tar",
            "val/00000.tar",
            "classes.json",
        ] {
            let a = std::fs::read(root.join("a").join(f)).unwrap();
            let b = std::fs::read(root.join("b").join(f)).unwrap();
            assert!(a == b, "{f} differs between runs");
        }
        let zs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&s.zeroshot).unwrap()).unwrap();
        assert_eq!(zs["tasks"][0]["classnames"], serde_json::json!(SHAPES));
        assert_eq!(zs["tasks"][1]["templates"][0], "a {} circle at the top left");
        assert_eq!(zs["tasks"][1]["templates"][1], "a {} circle at the top right");
        assert_eq!(zs["tasks"][0]["templates"][4], "a green {} at the top left");
        let events: Vec<_> = ShardReader::new(
            std::fs::File::open(root.join("a/val/00000.tar")).unwrap(),
            0,
            0,
        )
        .collect();
        assert_eq!(events.len(), 3);
        let ShardEvent::Sample(first) = &events[0] else {
            panic!()
        };
        let meta: serde_json::Value = serde_json::from_slice(first.get("json").unwrap()).unwrap();
        let caption = std::str::from_utf8(first.get("txt").unwrap()).unwrap();
        assert_eq!(caption, meta["caption"].as_str().unwrap());
        assert!(caption.contains(meta["shape"].as_str().unwrap()));
        let img = distclip_image::decode(first.get("jpg").unwrap(), u64::MAX).unwrap();
        assert_eq!((img.width, img.height, img.channels), (16, 16, 3));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
