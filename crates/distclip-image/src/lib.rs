//! Image decoding and CLIP preprocessing, bit-for-bit with OpenCLIP's PIL + torchvision path.
//!
//! OpenCLIP's eval transform is `Resize(size, BICUBIC)` (shortest side), `CenterCrop(size)`,
//! convert to RGB, `ToTensor()`, `Normalize(mean, std)` (`open_clip/transform.py`,
//! `image_transform`). A one-level difference in one pixel moves a normalised value by ~0.015,
//! far outside the 1e-4 that embedding parity asks for, so the resampler here is a port of
//! Pillow's fixed-point `ImagingResample` (`src/libImaging/Resample.c`), not a generic bicubic.
//! The train transform's `RandomResizedCrop` uses the same resampler on a crop box.

// The only unsafe code is the call into the AVX2 builds of the resize passes, after checking
// the CPU has AVX2 (`resample.rs`).
#![deny(unsafe_code)]

mod jpeg;
mod resample;

pub use resample::{Raw8, bicubic_filter, resize_bicubic, resize_crop_bicubic};

/// CLIP's normalisation mean (OpenAI dataset statistics), per RGB channel.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's normalisation standard deviation, per RGB channel (digits as OpenCLIP writes them).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// Default decompression-bomb limit, in pixels (OpenCLIP refuses images above 25M pixels).
pub const DEFAULT_MAX_PIXELS: u64 = 25_000_000;

/// Why an image could not be turned into a tensor.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The bytes are not a decodable JPEG/PNG/WebP (or are truncated).
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// The header announces more pixels than the limit allows.
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit}; raise the pixel limit if this is intended")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// width × height.
        pixels: u64,
        /// The limit in force.
        limit: u64,
    },
    /// A zero-sized image or crop.
    #[error("image has no pixels ({0})")]
    Empty(String),
}

/// Refuse images over the pixel limit (checked from the header, before any allocation).
pub(crate) fn check_pixels(width: u32, height: u32, max_pixels: u64) -> Result<(), ImageError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    if pixels == 0 {
        return Err(ImageError::Empty(format!("{width}x{height}")));
    }
    Ok(())
}

/// Decode JPEG, PNG or WebP bytes into 8-bit pixels in the mode PIL would open them in
/// (L, LA, RGB or RGBA), refusing images over `max_pixels` before allocating them.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Raw8, ImageError> {
    if jpeg::is_jpeg(bytes) {
        return jpeg::decode_jpeg(bytes, max_pixels);
    }
    let err = |e: image::ImageError| ImageError::Decode(e.to_string());
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let (width, height) = reader.into_dimensions().map_err(err)?;
    check_pixels(width, height, max_pixels)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    // The header check above is the real guard; this keeps the decoder's own allocation bounded.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(1 << 26));
    reader.limits(limits);
    Ok(Raw8::from_dynamic(reader.decode().map_err(err)?))
}

/// The output size of torchvision's `Resize(size)` with an int: the shorter side becomes `size`,
/// the longer `int(size * long / short)` (`_compute_resized_output_size`).
pub fn shortest_side_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Python's `round()` on a half-integer-or-integer `x / 2` rounds half to even, which decides
/// the centre-crop offset when the excess is odd.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let res = if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        r - x.signum()
    } else {
        r
    };
    res.max(0.0) as usize
}

/// torchvision's `center_crop` offsets: `int(round((h - th) / 2.0))`.
pub fn center_crop_offset(len: usize, target: usize) -> usize {
    round_half_even((len as f64 - target as f64) / 2.0)
}

/// OpenCLIP's eval transform for a square `size`: resize the shortest side (bicubic), centre
/// crop, convert to RGB, scale to [0, 1] and normalise. Returns `3 x size x size` f32, CHW.
pub fn eval_transform(img: &Raw8, size: usize) -> Result<Vec<f32>, ImageError> {
    if img.width == 0 || img.height == 0 {
        return Err(ImageError::Empty(format!("{}x{}", img.width, img.height)));
    }
    let (w, h) = shortest_side_size(img.width, img.height, size);
    let resized = resize_bicubic(img, w, h);
    let crop = resized.crop(
        center_crop_offset(resized.width, size),
        center_crop_offset(resized.height, size),
        size,
        size,
    )?;
    Ok(to_normalized_chw(&crop.to_rgb()))
}

/// `ToTensor()` then `Normalize(CLIP_MEAN, CLIP_STD)` on RGB pixels, in f32 exactly as torch
/// computes it (`x.float().div(255)`, then `sub_(mean).div_(std)`).
pub fn to_normalized_chw(rgb: &Raw8) -> Vec<f32> {
    let n = rgb.width * rgb.height;
    let mut out = vec![0f32; 3 * n];
    for (i, px) in rgb.data.chunks_exact(rgb.channels).enumerate() {
        for c in 0..3 {
            let v = f32::from(px[c]) / 255.0;
            out[c * n + i] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_side_follows_torchvision() {
        assert_eq!(shortest_side_size(57, 41, 32), (44, 32)); // int(32*57/41) = 44
        assert_eq!(shortest_side_size(30, 50, 32), (32, 53));
        assert_eq!(shortest_side_size(20, 20, 32), (32, 32));
    }

    #[test]
    fn crop_offset_rounds_half_to_even_like_python() {
        assert_eq!(center_crop_offset(33, 32), 0); // round(0.5) = 0
        assert_eq!(center_crop_offset(35, 32), 2); // round(1.5) = 2
        assert_eq!(center_crop_offset(37, 32), 2); // round(2.5) = 2
        assert_eq!(center_crop_offset(44, 32), 6);
    }

    #[test]
    fn normalisation_of_a_mid_grey_pixel() {
        let img = Raw8 {
            width: 1,
            height: 1,
            channels: 3,
            data: vec![128, 128, 128],
        };
        let v = to_normalized_chw(&img);
        assert!((v[0] - (128.0 / 255.0 - 0.481_454_66) / 0.268_629_54).abs() < 1e-7);
    }

    #[test]
    fn garbage_and_empty_bytes_are_decode_errors() {
        assert!(matches!(decode(b"", DEFAULT_MAX_PIXELS), Err(ImageError::Decode(_))));
        assert!(matches!(decode(b"\xff\xd8\xff\xe0garbage", DEFAULT_MAX_PIXELS), Err(ImageError::Decode(_))));
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let mut png = Vec::new();
        let img = image::RgbImage::new(64, 64);
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let err = decode(&png, 1000).unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { pixels: 4096, .. }), "{err}");
        assert_eq!(decode(&png, DEFAULT_MAX_PIXELS).unwrap().width, 64);
    }

    fn jpeg_bytes() -> Vec<u8> {
        let mut jpg = Vec::new();
        let img = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 9) as u8, 90]));
        img.write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg)
            .unwrap();
        jpg
    }

    #[test]
    fn jpeg_decodes_and_truncated_or_corrupt_jpeg_is_an_error() {
        let jpg = jpeg_bytes();
        let img = decode(&jpg, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((img.width, img.height, img.channels), (40, 24, 3));
        let err = decode(&jpg[..jpg.len() / 2], DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut corrupt = jpg.clone();
        for b in corrupt.iter_mut().skip(2).take(200) {
            *b = 0x55;
        }
        assert!(decode(&corrupt, DEFAULT_MAX_PIXELS).is_err());
        assert!(matches!(decode(&jpg, 100), Err(ImageError::TooLarge { .. })));
    }

    #[test]
    fn truncated_png_is_an_error_not_a_panic() {
        let mut png = Vec::new();
        let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8, y as u8, 7]));
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png.truncate(png.len() / 2);
        assert!(decode(&png, DEFAULT_MAX_PIXELS).is_err());
    }
}
