//! Fine-tuning at another image size: the patch grid of a checkpoint's
//! `visual.positional_embedding` resized to the model's grid, as OpenCLIP's
//! `resize_pos_embed` (`model.py`) does it on load: the class token's row is kept, the grid is
//! resampled by `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`.
//!
//! PyTorch's antialiased bicubic is Pillow's separable filter (Keys' cubic with a = -0.5, the
//! support widened by the scale when shrinking, weights normalised per output pixel), in
//! floating point: the kernel is the image crate's, the resampling is written out here because
//! the image crate's resize works on 8-bit pixels in fixed point.

use distclip_image::bicubic_filter;

use crate::ModelError;
use crate::checkpoint::{HostTensor, StateDict};

const KEY: &str = "visual.positional_embedding";

/// For each output index, the first input index and the normalised weights
/// (`_compute_indices_min_size_weights_aa`).
fn weights(input: usize, output: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // C++ truncates toward zero before the max with 0.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64).max(0) as usize;
            let mut w: Vec<f64> = (xmin..xmax).map(|j| bicubic_filter((j as f64 - center + 0.5) * invscale)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|x| *x /= total);
            }
            (xmin, w)
        })
        .collect()
}

/// Resample a `[old*old, width]` grid (row-major over (y, x)) to `[new*new, width]`:
/// horizontally, then vertically, each channel on its own.
pub fn resize_grid(src: &[f32], old: usize, new: usize, width: usize) -> Vec<f32> {
    let wx = weights(old, new);
    // Horizontal pass: [old rows, new cols, width].
    let mut mid = vec![0f64; old * new * width];
    for y in 0..old {
        for (x, (start, w)) in wx.iter().enumerate() {
            let out = &mut mid[(y * new + x) * width..(y * new + x + 1) * width];
            for (k, wk) in w.iter().enumerate() {
                let row = &src[(y * old + start + k) * width..(y * old + start + k + 1) * width];
                for (o, &v) in out.iter_mut().zip(row) {
                    *o += wk * f64::from(v);
                }
            }
        }
    }
    let mut out = vec![0f32; new * new * width];
    for (y, (start, w)) in wx.iter().enumerate() {
        for x in 0..new {
            let dst = &mut out[(y * new + x) * width..(y * new + x + 1) * width];
            for (c, d) in dst.iter_mut().enumerate() {
                let v: f64 = w.iter().enumerate().map(|(k, wk)| wk * mid[((start + k) * new + x) * width + c]).sum();
                *d = v as f32;
            }
        }
    }
    out
}

/// If `state`'s image positional embedding is for another patch grid than `grid`, resize it in
/// place and return `(old_grid, grid)`; `None` when it already fits or is absent. The class
/// token's row is kept as is.
pub fn resize_pos_embed(state: &mut StateDict, grid: usize) -> Result<Option<(usize, usize)>, ModelError> {
    let Some(pos) = state.get(KEY) else { return Ok(None) };
    let [rows, width] = pos.shape[..] else {
        return Err(ModelError::Checkpoint(format!("{KEY} has shape {:?}, expected [tokens, width]", pos.shape)));
    };
    if rows == grid * grid + 1 {
        return Ok(None);
    }
    let old = (rows.saturating_sub(1) as f64).sqrt() as usize;
    if rows < 2 || old * old + 1 != rows {
        return Err(ModelError::Checkpoint(format!(
            "{KEY} has {rows} rows, which is not a class token plus a square patch grid; \
             it cannot be resized to the model's {grid}x{grid} grid"
        )));
    }
    let mut data = pos.data[..width].to_vec();
    data.extend(resize_grid(&pos.data[width..], old, grid, width));
    state.insert(
        KEY.to_string(),
        HostTensor {
            shape: vec![grid * grid + 1, width],
            data,
        },
    );
    Ok(Some((old, grid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_identity_is_exact() {
        for (i, o) in [(2, 3), (4, 3), (7, 14), (14, 7)] {
            for (_, w) in weights(i, o) {
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
        let src: Vec<f32> = (0..9 * 2).map(|v| v as f32).collect();
        assert_eq!(resize_grid(&src, 3, 3, 2), src);
    }

    #[test]
    fn a_constant_grid_stays_constant() {
        let src = vec![0.25f32; 16 * 3];
        for v in resize_grid(&src, 4, 7, 3) {
            assert!((v - 0.25).abs() < 1e-6);
        }
    }

    #[test]
    fn non_square_grids_are_refused_with_the_key_named() {
        let mut s = StateDict::new();
        s.insert(KEY.into(), HostTensor { shape: vec![7, 2], data: vec![0.0; 14] });
        let e = resize_pos_embed(&mut s, 2).unwrap_err().to_string();
        assert!(e.contains(KEY) && e.contains("square"), "{e}");
        assert_eq!(resize_pos_embed(&mut StateDict::new(), 2).unwrap(), None);
    }
}
