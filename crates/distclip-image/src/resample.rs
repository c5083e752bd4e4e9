//! A port of Pillow's `ImagingResample` for 8-bit images with the bicubic filter
//! (`src/libImaging/Resample.c`: `precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResampleHorizontal_8bpc`, `ImagingResampleVertical_8bpc`, `ImagingResampleInner`),
//! including its fixed-point rounding, so results match `Image.resize(..., BICUBIC)` exactly.

use crate::ImageError;

use std::borrow::Cow;

/// Pillow's fixed-point precision for 8-bit resampling: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 22;

/// 8-bit pixels, interleaved, row-major. `channels` is 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Interleaved channels per pixel.
    pub channels: usize,
    /// `width * height * channels` bytes.
    pub data: Vec<u8>,
}

impl Raw8 {
    /// Convert a decoded image into the PIL mode it would open as. Images of more than 8 bits
    /// per channel are reduced to 8 bits (PIL would open 16-bit PNGs as `I;16`, which OpenCLIP's
    /// RGB conversion also clips to 8 bits).
    pub fn from_dynamic(img: image::DynamicImage) -> Self {
        use image::DynamicImage as D;
        let (width, height) = (img.width() as usize, img.height() as usize);
        let (channels, data) = match img {
            D::ImageLuma8(b) => (1, b.into_raw()),
            D::ImageLumaA8(b) => (2, b.into_raw()),
            D::ImageRgb8(b) => (3, b.into_raw()),
            D::ImageRgba8(b) => (4, b.into_raw()),
            other if other.color().has_alpha() => (4, other.to_rgba8().into_raw()),
            other if other.color().channel_count() == 1 => (1, other.to_luma8().into_raw()),
            other => (3, other.to_rgb8().into_raw()),
        };
        Self {
            width,
            height,
            channels,
            data,
        }
    }

    /// PIL's `convert("RGB")`: grey replicated, alpha dropped (not composited).
    pub fn to_rgb(&self) -> Raw8 {
        if self.channels == 3 {
            return self.clone();
        }
        let mut data = Vec::with_capacity(self.width * self.height * 3);
        for px in self.data.chunks_exact(self.channels) {
            match self.channels {
                1 | 2 => data.extend_from_slice(&[px[0], px[0], px[0]]),
                _ => data.extend_from_slice(&px[..3]),
            }
        }
        Raw8 {
            width: self.width,
            height: self.height,
            channels: 3,
            data,
        }
    }

    /// The `w x h` window at `(left, top)`; errors if it leaves the image.
    pub fn crop(&self, left: usize, top: usize, w: usize, h: usize) -> Result<Raw8, ImageError> {
        if w == 0 || h == 0 || left + w > self.width || top + h > self.height {
            return Err(ImageError::Empty(format!(
                "crop {w}x{h} at ({left},{top}) outside a {}x{} image",
                self.width, self.height
            )));
        }
        let c = self.channels;
        let mut data = Vec::with_capacity(w * h * c);
        for y in top..top + h {
            let start = (y * self.width + left) * c;
            data.extend_from_slice(&self.data[start..start + w * c]);
        }
        Ok(Raw8 {
            width: w,
            height: h,
            channels: c,
            data,
        })
    }

    /// PIL `RGBA -> RGBa` (and `LA -> La`): premultiply colour by alpha with `MULDIV255`.
    fn premultiply(&mut self) {
        let c = self.channels;
        for px in self.data.chunks_exact_mut(c) {
            let a = u32::from(px[c - 1]);
            for v in &mut px[..c - 1] {
                let t = u32::from(*v) * a + 128;
                *v = (((t >> 8) + t) >> 8) as u8;
            }
        }
    }

    /// PIL `RGBa -> RGBA`: undo the premultiplication, `clip8(255 * v / a)` for 0 < a < 255.
    fn unpremultiply(&mut self) {
        let c = self.channels;
        for px in self.data.chunks_exact_mut(c) {
            let a = u32::from(px[c - 1]);
            if a == 0 || a == 255 {
                continue;
            }
            for v in &mut px[..c - 1] {
                *v = (255 * u32::from(*v) / a).min(255) as u8;
            }
        }
    }
}

/// Keys' cubic convolution kernel with a = -0.5, Pillow's `bicubic_filter` (and PyTorch's
/// antialiased bicubic); support 2.
pub fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, number of taps, and fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)`.
fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; the +0.5 makes it a rounding.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = v * f64::from(1u32 << PRECISION_BITS);
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, kk }
}

// Sums are i32, as Pillow's `INT32 ss`: the weights of one output pixel sum to 2^22 (their
// absolute values to under 1.3 x 2^22), so 255 times them stays below 2^31. i32 also lets the
// compiler vectorise the passes, which i64 multiplies did not.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over rows `y0..y0+rows` of `src`. All channels of a pixel are accumulated
/// in one walk over its taps (the taps of one output pixel are contiguous in the row); the
/// channel count is a const parameter so the inner loop unrolls.
/// `x0` is the first column of the window being resized (`co` is relative to it).
fn horizontal(src: &Raw8, x0: usize, y0: usize, rows: usize, out_w: usize, co: &Coeffs) -> Raw8 {
    let data = match src.channels {
        1 => horizontal_c::<1>(src, x0, y0, rows, out_w, co),
        2 => horizontal_c::<2>(src, x0, y0, rows, out_w, co),
        3 => horizontal_c::<3>(src, x0, y0, rows, out_w, co),
        _ => horizontal_c::<4>(src, x0, y0, rows, out_w, co),
    };
    Raw8 {
        width: out_w,
        height: rows,
        channels: src.channels,
        data,
    }
}

fn horizontal_c<const C: usize>(src: &Raw8, x0: usize, y0: usize, rows: usize, out_w: usize, co: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        #[allow(unsafe_code)]
        return unsafe { horizontal_avx2::<C>(src, x0, y0, rows, out_w, co) };
    }
    horizontal_body::<C>(src, x0, y0, rows, out_w, co)
}

/// The horizontal pass compiled for AVX2 (same integer arithmetic, so the same bytes): the
/// portable x86-64 baseline has no 32-bit lane multiply, AVX2 has `vpmulld` over 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn horizontal_avx2<const C: usize>(src: &Raw8, x0: usize, y0: usize, rows: usize, out_w: usize, co: &Coeffs) -> Vec<u8> {
    horizontal_body::<C>(src, x0, y0, rows, out_w, co)
}

#[inline(always)]
fn horizontal_body<const C: usize>(src: &Raw8, x0: usize, y0: usize, rows: usize, out_w: usize, co: &Coeffs) -> Vec<u8> {
    let stride = src.width * C;
    let mut data = vec![0u8; out_w * rows * C];
    for (yy, out_row) in data.chunks_exact_mut(out_w * C).enumerate() {
        let row = &src.data[(yy + y0) * stride + x0 * C..(yy + y0 + 1) * stride];
        for (xx, out_px) in out_row.chunks_exact_mut(C).enumerate() {
            let (xmin, xmax) = co.bounds[xx];
            let k = &co.kk[xx * co.ksize..xx * co.ksize + xmax];
            let taps = &row[xmin * C..(xmin + xmax) * C];
            let mut ss = [1i32 << (PRECISION_BITS - 1); C];
            for (px, &w) in taps.chunks_exact(C).zip(k) {
                for ch in 0..C {
                    ss[ch] += i32::from(px[ch]) * w;
                }
            }
            for ch in 0..C {
                out_px[ch] = clip8(ss[ch]);
            }
        }
    }
    data
}

/// Vertical pass; `co.bounds` are relative to `src`'s first row plus `shift`. Whole source rows
/// are accumulated into a row of sums, which walks memory in order instead of down columns.
fn vertical(src: &Raw8, out_h: usize, co: &Coeffs, shift: usize) -> Raw8 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        #[allow(unsafe_code)]
        return unsafe { vertical_avx2(src, out_h, co, shift) };
    }
    vertical_body(src, out_h, co, shift)
}

/// The vertical pass compiled for AVX2; see `horizontal_avx2`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn vertical_avx2(src: &Raw8, out_h: usize, co: &Coeffs, shift: usize) -> Raw8 {
    vertical_body(src, out_h, co, shift)
}

#[inline(always)]
fn vertical_body(src: &Raw8, out_h: usize, co: &Coeffs, shift: usize) -> Raw8 {
    let stride = src.width * src.channels;
    let mut data = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in data.chunks_exact_mut(stride).enumerate() {
        let (ymin, ymax) = co.bounds[yy];
        let ymin = ymin - shift;
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for (y, &w) in co.kk[yy * co.ksize..yy * co.ksize + ymax].iter().enumerate() {
            let row = &src.data[(y + ymin) * stride..(y + ymin + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += i32::from(v) * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    Raw8 {
        width: src.width,
        height: out_h,
        channels: src.channels,
        data,
    }
}

/// PIL's `Image.resize((out_w, out_h), Image.BICUBIC)`, including its premultiplied-alpha
/// round trip for images with alpha. Same size returns a copy, as PIL does.
pub fn resize_bicubic(img: &Raw8, out_w: usize, out_h: usize) -> Raw8 {
    if (img.width, img.height) == (out_w, out_h) || out_w == 0 || out_h == 0 {
        return img.clone();
    }
    resize_window(img, (0, 0, img.width, img.height), out_w, out_h)
}

/// PIL's `img.crop((left, top, left + w, top + h)).resize((out_w, out_h), Image.BICUBIC)`
/// (torchvision's `resized_crop`), with the same pixels, but without copying the window out
/// first: the horizontal pass reads it in place. Errors if the window leaves the image.
pub fn resize_crop_bicubic(
    img: &Raw8,
    (left, top, w, h): (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
) -> Result<Raw8, ImageError> {
    let inside = left.checked_add(w).is_some_and(|r| r <= img.width)
        && top.checked_add(h).is_some_and(|b| b <= img.height);
    // The in-place path needs a horizontal pass (it is the one that reads the window), and an
    // image without alpha (premultiplying copies anyway).
    if !inside || w == out_w || out_w == 0 || out_h == 0 || w == 0 || h == 0 || img.channels == 2 || img.channels == 4 {
        return Ok(resize_bicubic(&img.crop(left, top, w, h)?, out_w, out_h));
    }
    Ok(resize_window(img, (left, top, w, h), out_w, out_h))
}

/// The resize of the window `(left, top, w, h)` of `img`; `left` and `top` must be 0 unless the
/// window's width changes (only the horizontal pass reads at an offset).
fn resize_window(img: &Raw8, (left, top, w, h): (usize, usize, usize, usize), out_w: usize, out_h: usize) -> Raw8 {
    let has_alpha = img.channels == 2 || img.channels == 4;
    // Only an image with alpha is copied (to premultiply it); the passes read the rest in place.
    let src: Cow<Raw8> = if has_alpha {
        let mut s = img.clone();
        s.premultiply();
        Cow::Owned(s)
    } else {
        Cow::Borrowed(img)
    };
    let need_h = out_w != w;
    let need_v = out_h != h;
    let horiz = precompute(w, out_w);
    let vert = precompute(h, out_h);
    // Rows of the source that the vertical pass will read.
    let y_first = vert.bounds[0].0;
    let (last_min, last_n) = vert.bounds[out_h - 1];
    let y_last = last_min + last_n;
    let mut out = src;
    let mut shift = 0;
    if need_h {
        out = Cow::Owned(horizontal(&out, left, top + y_first, y_last - y_first, out_w, &horiz));
        shift = y_first;
    }
    if need_v {
        out = Cow::Owned(vertical(&out, out_h, &vert, shift));
    }
    let mut out = out.into_owned();
    if has_alpha {
        out.unpremultiply();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `width x height` image of pseudo-random bytes from a linear congruential generator
    /// whose state is `state` (so successive calls draw different images).
    fn noise(width: usize, height: usize, channels: usize, state: &mut u32) -> Raw8 {
        let data = (0..width * height * channels)
            .map(|_| {
                *state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (*state >> 24) as u8
            })
            .collect();
        Raw8 { width, height, channels, data }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Raw8 {
            width: 7,
            height: 5,
            channels: 3,
            data: vec![200; 7 * 5 * 3],
        };
        for (w, h) in [(3, 2), (14, 11), (7, 9), (1, 1)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!((out.width, out.height), (w, h));
            assert!(out.data.iter().all(|&v| v == 200), "{w}x{h}");
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(57, 44), (20, 32), (100, 3)] {
            let co = precompute(i, o);
            for xx in 0..o {
                let s: i64 = co.kk[xx * co.ksize..(xx + 1) * co.ksize].iter().map(|&v| i64::from(v)).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= co.ksize as i64, "{i}->{o} at {xx}: {s}");
            }
        }
    }

    #[test]
    fn the_dispatched_passes_equal_the_portable_build() {
        // On a CPU with AVX2 this compares the AVX2 build with the portable one.
        let (width, height) = (97, 61);
        let img = noise(width, height, 3, &mut 11);
        for (ow, oh) in [(40, 25), (130, 90), (1, 1)] {
            let co = precompute(width, ow);
            assert_eq!(horizontal_c::<3>(&img, 0, 0, height, ow, &co), horizontal_body::<3>(&img, 0, 0, height, ow, &co));
            let co = precompute(height, oh);
            assert_eq!(vertical(&img, oh, &co, 0), vertical_body(&img, oh, &co, 0));
        }
    }

    #[test]
    fn premultiply_round_trip_keeps_opaque_pixels() {
        let mut img = Raw8 {
            width: 2,
            height: 1,
            channels: 4,
            data: vec![10, 20, 30, 255, 100, 50, 25, 0],
        };
        img.premultiply();
        assert_eq!(&img.data[..4], &[10, 20, 30, 255]);
        assert_eq!(&img.data[4..], &[0, 0, 0, 0]);
    }

    #[test]
    fn resizing_a_window_in_place_equals_cropping_it_first() {
        let mut state = 7;
        for channels in [1, 3, 4] {
            let img = noise(53, 41, channels, &mut state);
            for window in [(0, 0, 53, 41), (5, 3, 40, 30), (13, 11, 40, 30), (0, 0, 20, 41), (30, 20, 23, 21), (2, 1, 9, 9)] {
                for (ow, oh) in [(16, 16), (24, 12), (60, 50), (window.2, 17)] {
                    let (l, t, w, h) = window;
                    let want = resize_bicubic(&img.crop(l, t, w, h).unwrap(), ow, oh);
                    let got = resize_crop_bicubic(&img, window, ow, oh).unwrap();
                    assert_eq!(got, want, "{channels} channels, window {window:?} to {ow}x{oh}");
                }
            }
        }
        let img = Raw8 { width: 4, height: 4, channels: 3, data: vec![0; 48] };
        assert!(resize_crop_bicubic(&img, (2, 2, 3, 2), 8, 8).is_err());
    }
}
