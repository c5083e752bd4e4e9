//! Image↔text retrieval metrics, as `open_clip_train/train.py::get_clip_metrics`, computed in row
//! chunks: the rank of each true pair is the number of candidates scoring strictly higher, so
//! only one chunk of similarities exists at a time (100k × 100k never sits in memory).

use burn::tensor::Device;
use distclip_model::Clip;
use serde::Serialize;

use crate::embed::{EvalOptions, encode_images, encode_texts, read_pairs};
use crate::EvalError;

/// Recall at 1/5/10 and mean/median rank (1 = best) in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetrievalMetrics {
    /// Pairs scored.
    pub samples: usize,
    /// Image → text recall at 1.
    pub image_to_text_r1: f64,
    /// Image → text recall at 5.
    pub image_to_text_r5: f64,
    /// Image → text recall at 10.
    pub image_to_text_r10: f64,
    /// Image → text mean rank.
    pub image_to_text_mean_rank: f64,
    /// Image → text median rank.
    pub image_to_text_median_rank: f64,
    /// Text → image recall at 1.
    pub text_to_image_r1: f64,
    /// Text → image recall at 5.
    pub text_to_image_r5: f64,
    /// Text → image recall at 10.
    pub text_to_image_r10: f64,
    /// Text → image mean rank.
    pub text_to_image_mean_rank: f64,
    /// Text → image median rank.
    pub text_to_image_median_rank: f64,
}

/// Rows scored per chunk.
const CHUNK: usize = 1024;

/// 0-based rank of the true column for each query row (`queries[i]` matches `keys[i]`).
fn ranks(queries: &[f32], keys: &[f32], d: usize) -> Vec<usize> {
    let n = queries.len() / d;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(CHUNK) {
        let end = (start + CHUNK).min(n);
        let chunk: Vec<usize> = {
            use rayon::prelude::*;
            (start..end)
                .into_par_iter()
                .map(|i| {
                    let q = &queries[i * d..(i + 1) * d];
                    let dot = |k: &[f32]| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
                    let truth = dot(&keys[i * d..(i + 1) * d]);
                    keys.chunks(d).filter(|k| dot(k) > truth).count()
                })
                .collect()
        };
        out.extend(chunk);
    }
    out
}

fn summarise(ranks: &[usize]) -> (f64, f64, f64, f64, f64) {
    let n = ranks.len().max(1) as f64;
    let recall = |k: usize| ranks.iter().filter(|&&r| r < k).count() as f64 / n;
    let mean = ranks.iter().map(|&r| r as f64).sum::<f64>() / n + 1.0;
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    // torch.median of an even count returns the lower middle; OpenCLIP takes floor(...) + 1.
    let median = sorted.get(sorted.len().saturating_sub(1) / 2).copied().unwrap_or(0) as f64 + 1.0;
    (recall(1), recall(5), recall(10), mean, median)
}

/// Metrics from normalised features (`n × d` each, row i of both is a true pair).
pub fn retrieval_from_features(image: &[f32], text: &[f32], d: usize) -> RetrievalMetrics {
    let (i1, i5, i10, im, imed) = summarise(&ranks(image, text, d));
    let (t1, t5, t10, tm, tmed) = summarise(&ranks(text, image, d));
    RetrievalMetrics {
        samples: image.len() / d.max(1),
        image_to_text_r1: i1,
        image_to_text_r5: i5,
        image_to_text_r10: i10,
        image_to_text_mean_rank: im,
        image_to_text_median_rank: imed,
        text_to_image_r1: t1,
        text_to_image_r5: t5,
        text_to_image_r10: t10,
        text_to_image_mean_rank: tm,
        text_to_image_median_rank: tmed,
    }
}

/// Retrieval over a captioned WebDataset; samples without a caption are skipped.
pub fn retrieval(model: &Clip, device: &Device, spec: &str, opts: &EvalOptions) -> Result<RetrievalMetrics, EvalError> {
    let (mut image, mut text, mut rows) = (Vec::new(), Vec::new(), 0usize);
    read_pairs(spec, model.image_size(), opts, |pairs| {
        let pairs: Vec<_> = pairs.into_iter().filter(|p| !p.caption.is_empty()).collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let images: Vec<f32> = pairs.iter().flat_map(|p| p.image.iter().copied()).collect();
        image.extend(encode_images(model, device, &images, pairs.len())?);
        let captions: Vec<String> = pairs.iter().map(|p| p.caption.clone()).collect();
        text.extend(encode_texts(model, device, &captions, opts.batch_size)?);
        rows += pairs.len();
        Ok(())
    })?;
    if rows == 0 {
        return Err(EvalError::Empty(format!("{spec} (no sample has an image and a caption)")));
    }
    Ok(retrieval_from_features(&image, &text, image.len() / rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_recalls() {
        // 3 pairs in 2-d. Image 0 matches text 0 best; image 1's best text is text 2.
        let image = [1.0, 0.0, 0.0, 1.0, 0.7, 0.7];
        let text = [1.0, 0.0, 0.6, 0.8, 0.0, 1.0];
        let r = ranks(&image, &text, 2);
        // image1·text1 = 0.8; image1·text2 = 1.0 > 0.8 → rank 1. image2·text2 = .7; image2·text1 = .98 → rank 1, image2·text0 = .7 not >.
        assert_eq!(r, vec![0, 1, 1]);
        let m = retrieval_from_features(&image, &text, 2);
        assert_eq!(m.samples, 3);
        assert!((m.image_to_text_r1 - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.image_to_text_r5, 1.0);
        assert!((m.image_to_text_mean_rank - (1.0 + 2.0 + 2.0) / 3.0).abs() < 1e-12);
        assert_eq!(m.image_to_text_median_rank, 2.0);
    }
}
