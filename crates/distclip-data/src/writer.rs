//! Writing LAION-layout WebDataset shards: `00000.tar` holding `KEY.jpg`, `KEY.json`, `KEY.txt`,
//! plus `sizes.json` (`{"00000.tar": n, ...}`, what OpenCLIP's `get_dataset_size` reads).
//!
//! Tar headers are written byte for byte as python webdataset 1.0.2's `TarWriter` writes them
//! through `tarfile` in USTAR format: mode `0444`, uid/gid 0, user and group `bigdata`, mtime
//! "now" unless pinned, members of a sample in sorted extension order, two zero blocks at the end
//! and the file padded to a 10240-byte record (`tests/fixtures/wds/writer-reference.json` holds
//! python's headers; a test compares). The `webdataset` crate's `TarWriter` goes through the
//! `tar` crate, whose checksum and device fields are formatted differently, so it is not used.
//!
//! Keys follow img2dataset: the shard number (5 digits) then the index in the shard, zero padded
//! to `ceil(log10(samples_per_shard))` digits (`000000000`, `000000001`, ... for 10,000 per shard).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

const BLOCK: usize = 512;
const RECORD: u64 = 20 * 512;

/// Shard writing failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// An output file or folder could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An input (folder, CSV, JSONL) could not be read or parsed.
    #[error("cannot read input {path}: {message}")]
    Input {
        /// The input.
        path: String,
        /// What is wrong, and where.
        message: String,
    },
    /// A member name that USTAR cannot hold.
    #[error("member name {0:?} is longer than 100 bytes; use shorter keys")]
    NameTooLong(String),
    /// A setting out of range.
    #[error("invalid setting: {0}")]
    Config(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Seconds since the epoch, as python's `time.time()` truncated by `tarfile`.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One USTAR header as python's `tarfile.TarInfo.tobuf(USTAR_FORMAT)` writes it for a regular
/// file: octal fields zero padded and NUL terminated, checksum as six digits, NUL, space.
pub fn ustar_header(
    name: &str,
    size: u64,
    mode: u32,
    mtime: u64,
    user: &str,
    group: &str,
) -> Result<[u8; BLOCK], WriteError> {
    if name.len() > 100 {
        return Err(WriteError::NameTooLong(name.to_string()));
    }
    let mut h = [0u8; BLOCK];
    let octal = |h: &mut [u8; BLOCK], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}", width = len - 1);
        // Values too large for the field would need GNU base-256; sizes under 8 GiB fit.
        let s = &s.as_bytes()[s.len().saturating_sub(len - 1)..];
        h[at..at + s.len()].copy_from_slice(s);
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h, 100, 8, u64::from(mode & 0o7777));
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, mtime);
    h[148..156].copy_from_slice(b"        ");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let user = &user.as_bytes()[..user.len().min(31)];
    let group = &group.as_bytes()[..group.len().min(31)];
    h[265..265 + user.len()].copy_from_slice(user);
    h[297..297 + group.len()].copy_from_slice(group);
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let ck = format!("{sum:06o}\0");
    h[148..155].copy_from_slice(ck.as_bytes());
    Ok(h)
}

/// A tar stream written the way python webdataset's `TarWriter` writes it.
pub struct TarWriter<W: Write> {
    out: W,
    written: u64,
    mtime: Option<u64>,
    mode: u32,
    user: String,
    group: String,
}

impl<W: Write> TarWriter<W> {
    /// Write to `out` with webdataset's defaults (mode 0444, `bigdata:bigdata`, mtime now).
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            mtime: None,
            mode: 0o444,
            user: "bigdata".into(),
            group: "bigdata".into(),
        }
    }

    /// Pin every member's mtime, for byte-reproducible shards.
    pub fn with_mtime(mut self, mtime: Option<u64>) -> Self {
        self.mtime = mtime;
        self
    }

    /// Append one regular file.
    pub fn write_member(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let header = ustar_header(
            name,
            data.len() as u64,
            self.mode,
            self.mtime.unwrap_or_else(now),
            &self.user,
            &self.group,
        )
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.out.write_all(&[0u8; BLOCK][..pad])?;
        self.written += (BLOCK + data.len() + pad) as u64;
        Ok(())
    }

    /// Append a sample: `KEY.EXT` for each member, in sorted extension order (as python sorts
    /// the sample dict's keys). Returns the payload bytes.
    pub fn write_sample(&mut self, key: &str, members: &[(&str, &[u8])]) -> std::io::Result<u64> {
        let mut sorted: Vec<&(&str, &[u8])> = members.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let mut total = 0;
        for (ext, data) in sorted {
            self.write_member(&format!("{key}.{ext}"), data)?;
            total += data.len() as u64;
        }
        Ok(total)
    }

    /// Write the end-of-archive blocks, pad to a whole record, flush, and return the sink.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        self.written += 2 * BLOCK as u64;
        let rem = self.written % RECORD;
        if rem != 0 {
            let pad = (RECORD - rem) as usize;
            self.out.write_all(&vec![0u8; pad])?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Writes numbered shards into a folder and `sizes.json` at the end.
pub struct ShardWriter {
    dir: PathBuf,
    samples_per_shard: usize,
    key_digits: usize,
    mtime: Option<u64>,
    current: Option<(PathBuf, TarWriter<std::io::BufWriter<std::fs::File>>)>,
    in_shard: usize,
    shard: usize,
    sizes: BTreeMap<String, u64>,
}

impl ShardWriter {
    /// Shards `00000.tar`, `00001.tar`, ... of `samples_per_shard` samples in `dir` (created).
    pub fn new(dir: &Path, samples_per_shard: usize) -> Result<Self, WriteError> {
        if samples_per_shard == 0 {
            return Err(WriteError::Config(
                "samples per shard must be at least 1".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            samples_per_shard,
            key_digits: key_digits(samples_per_shard),
            mtime: None,
            current: None,
            in_shard: 0,
            shard: 0,
            sizes: BTreeMap::new(),
        })
    }

    /// Pin member mtimes (reproducible output).
    pub fn with_mtime(mut self, mtime: Option<u64>) -> Self {
        self.mtime = mtime;
        self
    }

    /// The key the next sample will get.
    pub fn next_key(&self) -> String {
        let (shard, index) = if self.current.is_some() && self.in_shard >= self.samples_per_shard {
            (self.shard + 1, 0)
        } else if self.current.is_some() {
            (self.shard, self.in_shard)
        } else {
            (self.shard, 0)
        };
        format!("{shard:05}{index:0width$}", width = self.key_digits)
    }

    /// Write one sample under the next key; returns the key.
    pub fn write(&mut self, members: &[(&str, &[u8])]) -> Result<String, WriteError> {
        if self.current.is_some() && self.in_shard >= self.samples_per_shard {
            self.close_shard()?;
            self.shard += 1;
        }
        if self.current.is_none() {
            let path = self.dir.join(format!("{:05}.tar.partial", self.shard));
            let file = std::fs::File::create(&path).map_err(io_err(&path))?;
            self.current = Some((
                path,
                TarWriter::new(std::io::BufWriter::with_capacity(1 << 20, file))
                    .with_mtime(self.mtime),
            ));
            self.in_shard = 0;
        }
        let key = format!(
            "{:05}{:0width$}",
            self.shard,
            self.in_shard,
            width = self.key_digits
        );
        if let Some((path, w)) = self.current.as_mut() {
            w.write_sample(&key, members).map_err(io_err(path))?;
        }
        self.in_shard += 1;
        Ok(key)
    }

    /// Finish the open shard: trailer, then rename `NNNNN.tar.partial` to `NNNNN.tar` so a
    /// reader never sees half a shard.
    fn close_shard(&mut self) -> Result<(), WriteError> {
        if let Some((partial, w)) = self.current.take() {
            w.finish().map_err(io_err(&partial))?;
            let name = format!("{:05}.tar", self.shard);
            let done = self.dir.join(&name);
            distclip_checkpoint::durable::publish(&partial, &done).map_err(io_err(&done))?;
            self.sizes.insert(name, self.in_shard as u64);
        }
        Ok(())
    }

    /// Close the last shard and write `sizes.json`; returns the shard sizes.
    pub fn finish(mut self) -> Result<BTreeMap<String, u64>, WriteError> {
        self.close_shard()?;
        let path = self.dir.join("sizes.json");
        let text = serde_json::to_string_pretty(&self.sizes).unwrap_or_default();
        distclip_checkpoint::durable::write_atomic(&path, (text + "\n").as_bytes()).map_err(io_err(&path))?;
        Ok(self.sizes)
    }
}

/// img2dataset's `oom_sample_per_shard = ceil(log10(n))`, at least 1.
fn key_digits(samples_per_shard: usize) -> usize {
    let mut digits = 0;
    let mut p: u128 = 1;
    while p < samples_per_shard as u128 {
        p *= 10;
        digits += 1;
    }
    digits.max(1)
}

/// The brace spec naming a folder's shards (`DIR/{00000..00012}.tar`).
pub fn spec_for(dir: &Path, shards: usize) -> String {
    match shards {
        0 | 1 => dir.join("00000.tar").display().to_string(),
        n => format!("{}/{{00000..{:05}}}.tar", dir.display(), n - 1),
    }
}

/// Where `distclip shards write` reads samples from.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardInput {
    /// A folder of images (searched recursively, in sorted order) with a caption in a sibling
    /// `NAME.txt` for each `NAME.jpg|jpeg|png|webp`.
    Images(PathBuf),
    /// A CSV with a header row; image paths (relative to the CSV's folder) in the image column,
    /// captions in the caption column.
    Csv(PathBuf),
    /// JSON lines, one object per sample with the image path and caption fields.
    Jsonl(PathBuf),
}

/// Options for [`write_shards`].
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOptions {
    /// Samples per shard (img2dataset's default: 10,000).
    pub samples_per_shard: usize,
    /// Resize images whose longest side is larger to this (bicubic), re-encoded as JPEG q95.
    pub resize_max: Option<u32>,
    /// CSV column / JSONL field holding the image path (OpenCLIP's CSV default is `filepath`;
    /// that name is accepted when this one is absent).
    pub image_column: String,
    /// CSV column / JSONL field holding the caption (`title` is accepted when this is absent).
    pub caption_column: String,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Pin tar mtimes (reproducible shards).
    pub mtime: Option<u64>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            samples_per_shard: 10_000,
            resize_max: None,
            image_column: "image".into(),
            caption_column: "caption".into(),
            progress: true,
            mtime: None,
        }
    }
}

/// What [`write_shards`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriteSummary {
    /// Samples written.
    pub samples: u64,
    /// Shards written.
    pub shards: usize,
    /// Inputs skipped, by reason (`missing_caption`, `unreadable_image`, `not_an_image`,
    /// `image_decode_error`).
    pub skipped: BTreeMap<String, u64>,
    /// The output folder.
    pub out: String,
    /// A spec naming the shards, for `--train-data` style arguments.
    pub spec: String,
}

/// One input row: an image path and its caption (or why it has none).
struct Item {
    image: PathBuf,
    caption: Option<String>,
    /// Where the row came from, for messages and the json member.
    source: String,
}

/// Write the samples of `input` as shards in `out`.
pub fn write_shards(
    input: &ShardInput,
    out: &Path,
    opts: &WriteOptions,
) -> Result<WriteSummary, WriteError> {
    let items = read_items(input, opts)?;
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(items.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} samples [{elapsed_precise}] {per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut writer = ShardWriter::new(out, opts.samples_per_shard)?.with_mtime(opts.mtime);
    let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples = 0u64;
    for item in items {
        bar.inc(1);
        let mut skip = |reason: &str, detail: String| {
            tracing::warn!(reason, input = %item.source, "skipping: {detail}");
            *skipped.entry(reason.to_string()).or_insert(0) += 1;
        };
        let Some(caption) = item.caption.clone() else {
            skip("missing_caption", "no caption".into());
            continue;
        };
        let bytes = match std::fs::read(&item.image) {
            Ok(b) => b,
            Err(e) => {
                skip("unreadable_image", format!("{}: {e}", item.image.display()));
                continue;
            }
        };
        let prepared = match prepare_image(bytes, opts.resize_max) {
            Ok(p) => p,
            Err((reason, detail)) => {
                skip(reason, detail);
                continue;
            }
        };
        let key = writer.next_key();
        let meta = serde_json::json!({
            "key": key,
            "caption": caption,
            "source": item.source,
            "width": prepared.width,
            "height": prepared.height,
            "original_width": prepared.original_width,
            "original_height": prepared.original_height,
        });
        let meta = serde_json::to_vec(&meta).unwrap_or_default();
        writer.write(&[
            (prepared.ext, &prepared.bytes),
            ("txt", caption.as_bytes()),
            ("json", &meta),
        ])?;
        samples += 1;
    }
    bar.finish_and_clear();
    let sizes = writer.finish()?;
    Ok(WriteSummary {
        samples,
        shards: sizes.len(),
        skipped,
        out: out.display().to_string(),
        spec: spec_for(out, sizes.len()),
    })
}

struct Prepared {
    ext: &'static str,
    bytes: Vec<u8>,
    width: u32,
    height: u32,
    original_width: u32,
    original_height: u32,
}

/// The image's format from its magic bytes.
pub fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("jpg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("webp")
    } else {
        None
    }
}

/// Keep the original bytes, or (with `resize_max` and a larger image) decode, resize the
/// longest side to `resize_max` with Pillow's bicubic and re-encode as JPEG quality 95.
fn prepare_image(
    bytes: Vec<u8>,
    resize_max: Option<u32>,
) -> Result<Prepared, (&'static str, String)> {
    let ext =
        sniff_image(&bytes).ok_or(("not_an_image", "not a JPEG, PNG or WebP file".to_string()))?;
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| ("image_decode_error", e.to_string()))?
        .into_dimensions()
        .map_err(|e| ("image_decode_error", e.to_string()))?;
    let Some(max) = resize_max.filter(|&m| w.max(h) > m && m > 0) else {
        return Ok(Prepared {
            ext,
            bytes,
            width: w,
            height: h,
            original_width: w,
            original_height: h,
        });
    };
    let img = distclip_image::decode(&bytes, distclip_image::DEFAULT_MAX_PIXELS)
        .map_err(|e| ("image_decode_error", e.to_string()))?;
    let long = w.max(h) as f64;
    let nw = ((f64::from(w) * f64::from(max) / long).round() as u32).max(1);
    let nh = ((f64::from(h) * f64::from(max) / long).round() as u32).max(1);
    let rgb = img.to_rgb();
    let resized = distclip_image::resize_bicubic(&rgb, nw as usize, nh as usize);
    let jpeg = encode_jpeg(&resized.data, nw, nh, 95).map_err(|e| ("image_decode_error", e))?;
    Ok(Prepared {
        ext: "jpg",
        bytes: jpeg,
        width: nw,
        height: nh,
        original_width: w,
        original_height: h,
    })
}

/// Encode RGB8 pixels as a baseline JPEG.
pub fn encode_jpeg(rgb: &[u8], width: u32, height: u32, quality: u8) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode(rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn read_items(input: &ShardInput, opts: &WriteOptions) -> Result<Vec<Item>, WriteError> {
    match input {
        ShardInput::Images(dir) => image_folder(dir),
        ShardInput::Csv(path) => csv_items(path, opts),
        ShardInput::Jsonl(path) => jsonl_items(path, opts),
    }
}

fn image_folder(dir: &Path) -> Result<Vec<Item>, WriteError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| WriteError::Input {
            path: d.display().to_string(),
            message: e.to_string(),
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["jpg", "jpeg", "png", "webp"].contains(&e.to_ascii_lowercase().as_str())
            }) {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files
        .into_iter()
        .map(|image| {
            let caption = std::fs::read_to_string(image.with_extension("txt"))
                .ok()
                .map(|c| c.trim().to_string());
            let source = image
                .strip_prefix(dir)
                .unwrap_or(&image)
                .display()
                .to_string();
            Item {
                image,
                caption,
                source,
            }
        })
        .collect())
}

fn resolve(base: &Path, image: &str) -> PathBuf {
    let p = Path::new(image);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn column(names: &[String], want: &str, fallback: &str) -> Option<usize> {
    names
        .iter()
        .position(|n| n == want)
        .or_else(|| names.iter().position(|n| n == fallback))
}

fn csv_items(path: &Path, opts: &WriteOptions) -> Result<Vec<Item>, WriteError> {
    let input_err = |message: String| WriteError::Input {
        path: path.display().to_string(),
        message,
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let delimiter = if path.extension().is_some_and(|e| e == "tsv") {
        b'\t'
    } else {
        b','
    };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_path(path)
        .map_err(|e| input_err(e.to_string()))?;
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| input_err(e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    let (Some(ic), Some(cc)) = (
        column(&headers, &opts.image_column, "filepath"),
        column(&headers, &opts.caption_column, "title"),
    ) else {
        return Err(input_err(format!(
            "needs columns {:?} and {:?} (found {headers:?}); set the column names",
            opts.image_column, opts.caption_column
        )));
    };
    let mut items = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| input_err(format!("row {}: {e}", i + 2)))?;
        let image = rec.get(ic).unwrap_or_default();
        items.push(Item {
            image: resolve(&base, image),
            caption: rec.get(cc).map(str::to_string).filter(|c| !c.is_empty()),
            source: image.to_string(),
        });
    }
    Ok(items)
}

fn jsonl_items(path: &Path, opts: &WriteOptions) -> Result<Vec<Item>, WriteError> {
    let input_err = |message: String| WriteError::Input {
        path: path.display().to_string(),
        message,
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = std::fs::File::open(path).map_err(|e| input_err(e.to_string()))?;
    let mut items = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| input_err(format!("line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| input_err(format!("line {}: {e}", i + 1)))?;
        let field = |want: &str, fallback: &str| {
            v.get(want)
                .or_else(|| v.get(fallback))
                .and_then(|x| x.as_str())
                .map(str::to_string)
        };
        let Some(image) = field(&opts.image_column, "filepath") else {
            return Err(input_err(format!(
                "line {}: no {:?} field",
                i + 1,
                opts.image_column
            )));
        };
        items.push(Item {
            image: resolve(&base, &image),
            caption: field(&opts.caption_column, "title").filter(|c| !c.is_empty()),
            source: image,
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::{ShardEvent, ShardReader};

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
            .join("../../tests/fixtures/wds")
            .join(name)
    }

    #[test]
    fn headers_match_python_webdataset_tarwriter() {
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("writer-reference.json")).unwrap(),
        )
        .unwrap();
        let mtime = reference["mtime"].as_u64().unwrap();
        let mut w = TarWriter::new(Vec::new()).with_mtime(Some(mtime));
        for s in reference["samples"].as_array().unwrap() {
            let key = s["__key__"].as_str().unwrap();
            let members: Vec<(String, Vec<u8>)> = s
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "__key__")
                .map(|(k, v)| (k.clone(), unhex(v.as_str().unwrap())))
                .collect();
            let refs: Vec<(&str, &[u8])> = members
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            w.write_sample(key, &refs).unwrap();
        }
        let tar = w.finish().unwrap();
        assert_eq!(tar.len() as u64, reference["file_size"].as_u64().unwrap());
        let members = reference["members"].as_array().unwrap();
        assert_eq!(members.len(), 9);
        for m in members {
            let off = m["offset"].as_u64().unwrap() as usize;
            let ours = &tar[off..off + 512];
            let theirs = unhex(m["header_hex"].as_str().unwrap());
            assert_eq!(ours, &theirs[..], "header of {}", m["name"]);
        }
        // And the whole file, data and padding included, is what python wrote: the reader agrees.
        let names: Vec<String> = webdataset::shard::TarEntries::new(std::io::Cursor::new(tar))
            .map(|e| e.unwrap().name)
            .collect();
        let want: Vec<&str> = members
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, want);
    }

    #[test]
    fn key_layout_and_sizes_json() {
        assert_eq!(
            (
                key_digits(10_000),
                key_digits(10_001),
                key_digits(3),
                key_digits(1)
            ),
            (4, 5, 1, 1)
        );
        let dir = std::env::temp_dir().join(format!("distclip-writer-{}", std::process::id()));
        let mut w = ShardWriter::new(&dir, 3).unwrap().with_mtime(Some(0));
        let mut keys = Vec::new();
        for i in 0..7u8 {
            assert_eq!(w.next_key(), format!("{:05}{}", i / 3, i % 3));
            keys.push(
                w.write(&[("txt", &[b'a' + i][..]), ("jpg", b"\xff\xd8\xff")])
                    .unwrap(),
            );
        }
        assert_eq!(
            keys,
            [
                "000000", "000001", "000002", "000010", "000011", "000012", "000020"
            ]
        );
        let sizes = w.finish().unwrap();
        assert_eq!(
            sizes,
            BTreeMap::from([
                ("00000.tar".into(), 3),
                ("00001.tar".into(), 3),
                ("00002.tar".into(), 1)
            ])
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("sizes.json")).unwrap())
                .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"00000.tar": 3, "00001.tar": 3, "00002.tar": 1})
        );
        let events: Vec<_> =
            ShardReader::new(std::fs::File::open(dir.join("00001.tar")).unwrap(), 1, 0).collect();
        let got: Vec<(String, Vec<String>)> = events
            .into_iter()
            .map(|e| match e {
                ShardEvent::Sample(s) => (s.key, s.members.into_iter().map(|m| m.0).collect()),
                e => panic!("{e:?}"),
            })
            .collect();
        assert_eq!(
            got[0],
            (
                "000010".to_string(),
                vec!["jpg".to_string(), "txt".to_string()]
            )
        );
        assert!(!dir.join("00000.tar.partial").exists());
        assert_eq!(
            spec_for(&dir, 3),
            format!("{}/{{00000..00002}}.tar", dir.display())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn write_jpeg(path: &Path, w: u32, h: u32) {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 100]));
        img.save(path).unwrap();
    }

    #[test]
    fn folder_csv_and_jsonl_inputs_with_resize() {
        let root = std::env::temp_dir().join(format!("distclip-writer-in-{}", std::process::id()));
        let imgs = root.join("imgs");
        std::fs::create_dir_all(imgs.join("sub")).unwrap();
        write_jpeg(&imgs.join("a.jpg"), 40, 20);
        std::fs::write(imgs.join("a.txt"), "a wide picture\n").unwrap();
        write_jpeg(&imgs.join("sub/b.png"), 10, 12);
        std::fs::write(imgs.join("sub/b.txt"), "a small png").unwrap();
        write_jpeg(&imgs.join("c.jpg"), 8, 8); // no caption
        std::fs::write(imgs.join("d.jpg"), b"not an image").unwrap();
        std::fs::write(imgs.join("d.txt"), "broken").unwrap();
        let opts = WriteOptions {
            samples_per_shard: 1,
            resize_max: Some(16),
            progress: false,
            ..Default::default()
        };
        let out = root.join("out");
        let s = write_shards(&ShardInput::Images(imgs.clone()), &out, &opts).unwrap();
        assert_eq!((s.samples, s.shards), (2, 2));
        assert_eq!(
            s.skipped,
            BTreeMap::from([("missing_caption".into(), 1), ("not_an_image".into(), 1)])
        );
        let first: Vec<_> =
            ShardReader::new(std::fs::File::open(out.join("00000.tar")).unwrap(), 0, 0).collect();
        let ShardEvent::Sample(a) = &first[0] else {
            panic!()
        };
        assert_eq!(a.key, "000000");
        let img = distclip_image::decode(a.get("jpg").unwrap(), u64::MAX).unwrap();
        assert_eq!((img.width, img.height), (16, 8));
        assert_eq!(a.get("txt").unwrap(), b"a wide picture");
        let meta: serde_json::Value = serde_json::from_slice(a.get("json").unwrap()).unwrap();
        assert_eq!(
            (&meta["width"], &meta["original_width"], &meta["source"]),
            (
                &serde_json::json!(16),
                &serde_json::json!(40),
                &serde_json::json!("a.jpg")
            )
        );
        // The small PNG is kept as is.
        let second: Vec<_> =
            ShardReader::new(std::fs::File::open(out.join("00001.tar")).unwrap(), 1, 0).collect();
        let ShardEvent::Sample(b) = &second[0] else {
            panic!()
        };
        assert!(b.get("png").is_some());

        std::fs::write(
            root.join("data.csv"),
            "filepath,title\nimgs/a.jpg,\"a, quoted caption\"\nimgs/missing.jpg,gone\n",
        )
        .unwrap();
        let s = write_shards(
            &ShardInput::Csv(root.join("data.csv")),
            &root.join("csv"),
            &WriteOptions {
                progress: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (s.samples, s.skipped.get("unreadable_image")),
            (1, Some(&1))
        );
        std::fs::write(
            root.join("data.jsonl"),
            format!("{{\"image\": \"{}\", \"caption\": \"abs path\"}}\n\n{{\"image\": \"imgs/sub/b.png\", \"caption\": \"rel\"}}\n", imgs.join("a.jpg").display()),
        )
        .unwrap();
        let s = write_shards(
            &ShardInput::Jsonl(root.join("data.jsonl")),
            &root.join("jsonl"),
            &WriteOptions {
                progress: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((s.samples, s.shards), (2, 1));
        std::fs::write(root.join("bad.csv"), "x,y\n1,2\n").unwrap();
        let err = write_shards(
            &ShardInput::Csv(root.join("bad.csv")),
            &root.join("bad"),
            &opts,
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs columns"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
