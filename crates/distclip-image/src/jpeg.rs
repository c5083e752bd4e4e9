//! JPEG decoding with libjpeg-turbo's decoder (through mozjpeg, which shares it), because
//! OpenCLIP's Pillow decodes with libjpeg-turbo and pure-Rust decoders differ from it by a few
//! levels in a quarter of the pixels (`ISLOW` IDCT and fancy chroma upsampling are libjpeg's
//! own arithmetic). Built from C source by the `cc` crate, without NASM: the C and SIMD paths of
//! libjpeg-turbo give identical output.

use crate::{ImageError, Raw8};

/// Whether the bytes start with a JPEG SOI marker.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decode a JPEG in the mode Pillow opens it in (L or RGB; CMYK converted to RGB as Pillow's
/// `convert("RGB")` does for Adobe-inverted CMYK, the form nearly all CMYK JPEGs take).
pub fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<Raw8, ImageError> {
    // libjpeg pads a truncated stream with grey and only warns; Pillow refuses it
    // ("image file is truncated"), and so do we, by requiring the EOI marker at the end.
    let trimmed = bytes.iter().rposition(|&b| b != 0).map_or(&bytes[..0], |i| &bytes[..=i]);
    if !trimmed.ends_with(&[0xFF, 0xD9]) {
        return Err(ImageError::Decode("truncated JPEG (no end-of-image marker)".into()));
    }
    // libjpeg reports fatal errors by unwinding (mozjpeg's error manager resumes an unwind
    // without invoking the panic hook); catch it here so no caller ever sees it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_inner(bytes, max_pixels)));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            Err(ImageError::Decode(msg))
        }
    }
}

fn decode_inner(bytes: &[u8], max_pixels: u64) -> Result<Raw8, ImageError> {
    let io = |e: std::io::Error| ImageError::Decode(e.to_string());
    let mut dec = mozjpeg::Decompress::new_mem(bytes).map_err(io)?;
    let (w, h) = dec.size();
    crate::check_pixels(w as u32, h as u32, max_pixels)?;
    dec.dct_method(mozjpeg::DctMethod::IntegerSlow);
    dec.do_fancy_upsampling(true);
    let (channels, data) = match dec.image().map_err(io)? {
        mozjpeg::decompress::Format::RGB(mut s) => (3, read_all(&mut s)?),
        mozjpeg::decompress::Format::Gray(mut s) => (1, read_all(&mut s)?),
        mozjpeg::decompress::Format::CMYK(mut s) => (3, cmyk_inverted_to_rgb(&read_all(&mut s)?)),
    };
    if data.len() != w * h * channels {
        return Err(ImageError::Decode(format!(
            "JPEG decoded to {} bytes, expected {w}x{h}x{channels}",
            data.len()
        )));
    }
    Ok(Raw8 {
        width: w,
        height: h,
        channels,
        data,
    })
}

fn read_all<R>(s: &mut mozjpeg::decompress::DecompressStarted<R>) -> Result<Vec<u8>, ImageError> {
    s.read_scanlines::<u8>().map_err(|e| ImageError::Decode(e.to_string()))
}

/// Pillow: rawmode `CMYK;I` (Adobe stores CMYK inverted), then `cmyk2rgb`:
/// `nk = 255 - k; out = clip8(nk - muldiv255(c, nk))`.
fn cmyk_inverted_to_rgb(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 4 * 3);
    for px in data.chunks_exact(4) {
        let k = 255 - u32::from(px[3]);
        let nk = 255 - k;
        for &c in &px[..3] {
            let c = 255 - u32::from(c);
            let t = c * nk + 128;
            let m = ((t >> 8) + t) >> 8;
            out.push(nk.saturating_sub(m) as u8);
        }
    }
    out
}
