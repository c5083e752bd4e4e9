//! Streaming a whole spec through the pipeline and counting: `distclip data stats` and
//! `distclip bench data`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::loader::{FailedShard, Loader, LoaderConfig, LoaderError, Order};
use crate::samples::{ShardEvent, ShardReader, SkipReason};
use crate::source::{RetryPolicy, ShardOpener};
use crate::spec::{ShardList, SpecError};
use crate::transform::{Augment, IMAGE_KEYS, TransformConfig};

/// What `distclip data stats` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// Examples that decoded and would be trained on.
    pub samples: u64,
    /// Shards read (or attempted).
    pub shards: u64,
    /// Skips by reason name; reasons that never occurred are absent.
    pub skipped: BTreeMap<String, u64>,
    /// Shards that ended early.
    pub failed_shards: Vec<FailedShard>,
    /// Examples per second, wall clock, including open and read time.
    pub samples_per_s: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Shard bytes read.
    pub bytes: u64,
    /// Opens tried again and reads resumed after a broken stream (errors that cannot heal,
    /// such as a missing file or HTTP 404, are not retried).
    pub retries: u64,
    /// Decode threads.
    pub threads: usize,
    /// Output image side.
    pub image_size: usize,
}

/// Options for [`data_stats`] and [`bench_data`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatsOptions {
    /// Decode threads.
    pub threads: usize,
    /// Decoding and transform: image size, eval (`Augment::None`, the default here) or train
    /// augmentation, caption key, pixel and caption limits.
    pub transform: TransformConfig,
    /// Stop after this many examples (`None`: the whole spec).
    pub max_samples: Option<u64>,
    /// Retry policy for opening and reading shards.
    pub retry: RetryPolicy,
}

impl Default for StatsOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            transform: TransformConfig {
                augment: Augment::None,
                ..Default::default()
            },
            max_samples: None,
            retry: RetryPolicy::default(),
        }
    }
}

/// Why a stats run could not start.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The spec is malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The loader refused the settings or a worker died.
    #[error(transparent)]
    Loader(#[from] LoaderError),
}

/// `distclip data stats SPEC [--image-size PX] [--threads T]`: stream every shard of `spec` once
/// (in spec order, no shuffle) through decoding and the transform, and count.
pub fn data_stats(spec: &str, opts: &StatsOptions) -> Result<DataStats, StatsError> {
    let list = ShardList::parse(spec)?;
    data_stats_with(Arc::new(list), ShardOpener::new(opts.retry.clone()), opts)
}

/// `distclip bench data SPEC --threads T --image-size 224`: the train path (RandomResizedCrop)
/// over the spec (or its first `max_samples` examples); read `samples_per_s`.
pub fn bench_data(
    spec: &str,
    threads: usize,
    image_size: usize,
    max_samples: Option<u64>,
) -> Result<DataStats, StatsError> {
    let opts = StatsOptions {
        threads,
        transform: TransformConfig {
            image_size,
            augment: Augment::train(),
            ..Default::default()
        },
        max_samples,
        ..Default::default()
    };
    data_stats(spec, &opts)
}

/// JPEG (PNG, WebP) decoding alone over the spec, the floor any pipeline pays per image: each
/// of `threads` threads reads its share of the shards (shard `i` goes to thread `i % threads`)
/// with the same reader as the loader and decodes each sample's image to pixels, with no
/// crop, resize, normalisation or tokenization. Bad images are counted by reason; samples
/// without an image are ignored. Stops after about `max_samples` decoded images (`None`: all).
pub fn decode_only(
    list: Arc<ShardList>,
    opener: ShardOpener,
    threads: usize,
    max_pixels: u64,
    max_samples: Option<u64>,
) -> DataStats {
    use std::sync::atomic::{AtomicU64, Ordering};
    let threads = threads.max(1);
    let decoded = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let shards = AtomicU64::new(0);
    let skipped: std::sync::Mutex<BTreeMap<String, u64>> = Default::default();
    let failed: std::sync::Mutex<Vec<FailedShard>> = Default::default();
    let count = |reason: SkipReason| {
        if let Ok(mut m) = skipped.lock() {
            *m.entry(reason.name().to_string()).or_insert(0) += 1;
        }
    };
    let enough = || max_samples.is_some_and(|m| decoded.load(Ordering::Relaxed) >= m);
    let retries_before = opener.retries();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (list, opener) = (&list, &opener);
            let (decoded, bytes, shards, failed, count) =
                (&decoded, &bytes, &shards, &failed, &count);
            let enough = &enough;
            scope.spawn(move || {
                for (i, shard) in list.shards.iter().enumerate().skip(t).step_by(threads) {
                    if enough() {
                        return;
                    }
                    shards.fetch_add(1, Ordering::Relaxed);
                    let stream = match opener.open(&shard.url) {
                        Ok(s) => s,
                        Err(e) => {
                            count(SkipReason::ShardOpenFailed);
                            if let Ok(mut f) = failed.lock() {
                                f.push(FailedShard {
                                    shard: i,
                                    url: shard.url.clone(),
                                    reason: SkipReason::ShardOpenFailed,
                                    error: e.to_string(),
                                    samples_read: 0,
                                });
                            }
                            continue;
                        }
                    };
                    let mut reader = ShardReader::new(stream, i, 0);
                    for event in reader.by_ref() {
                        match event {
                            ShardEvent::Sample(raw) => {
                                let Some(img) = IMAGE_KEYS.iter().find_map(|k| raw.get(k)) else {
                                    continue;
                                };
                                match distclip_image::decode(img, max_pixels) {
                                    Ok(_) => {
                                        decoded.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(distclip_image::ImageError::TooLarge { .. }) => {
                                        count(SkipReason::ImageTooLarge)
                                    }
                                    Err(_) => count(SkipReason::ImageDecodeError),
                                }
                                if enough() {
                                    break;
                                }
                            }
                            ShardEvent::Member { reason, .. } => count(reason),
                            ShardEvent::Failed {
                                reason,
                                message,
                                next_index,
                            } => {
                                count(reason);
                                if let Ok(mut f) = failed.lock() {
                                    f.push(FailedShard {
                                        shard: i,
                                        url: shard.url.clone(),
                                        reason,
                                        error: message,
                                        samples_read: next_index,
                                    });
                                }
                            }
                        }
                    }
                    bytes.fetch_add(reader.bytes_read(), Ordering::Relaxed);
                }
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    let samples = decoded.load(Ordering::Relaxed);
    DataStats {
        samples,
        shards: shards.load(Ordering::Relaxed),
        skipped: skipped.into_inner().unwrap_or_default(),
        failed_shards: failed.into_inner().unwrap_or_default(),
        samples_per_s: if seconds > 0.0 {
            samples as f64 / seconds
        } else {
            0.0
        },
        seconds,
        bytes: bytes.load(Ordering::Relaxed),
        retries: opener.retries() - retries_before,
        threads,
        image_size: 0,
    }
}

/// [`data_stats`] over an already expanded list with a given opener (tests, injected stores).
/// Every shard is read once; upsampling weights are ignored.
pub fn data_stats_with(
    list: Arc<ShardList>,
    opener: ShardOpener,
    opts: &StatsOptions,
) -> Result<DataStats, StatsError> {
    let list = if list.is_unweighted() {
        list
    } else {
        let mut l = (*list).clone();
        l.shards.iter_mut().for_each(|s| s.weight = 1.0);
        Arc::new(l)
    };
    let cfg = LoaderConfig {
        threads: opts.threads.max(1),
        // Smaller batches under a small cap, so that the count stops at the cap.
        batch_size: opts.max_samples.map_or(64, |m| m.clamp(1, 64) as usize),
        order: Order::Epoch,
        shuffle: false,
        prefetch: 32,
        keep_partial: true,
        transform: opts.transform.clone(),
        ..Default::default()
    };
    let start = Instant::now();
    let retries_before = opener.retries();
    let loader = Loader::new(list, opener.clone(), cfg)?;
    let counters = loader.counters();
    let mut seen = 0u64;
    for batch in loader {
        seen += batch?.len() as u64;
        if opts.max_samples.is_some_and(|m| seen >= m) {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let snap = counters.snapshot();
    Ok(DataStats {
        samples: seen,
        shards: snap.shards,
        skipped: snap
            .skipped
            .iter()
            .map(|(r, n)| (r.name().to_string(), *n))
            .collect(),
        failed_shards: snap.failed_shards,
        samples_per_s: if seconds > 0.0 {
            seen as f64 / seconds
        } else {
            0.0
        },
        seconds,
        bytes: snap.bytes,
        retries: opener.retries() - retries_before,
        threads: opts.threads.max(1),
        image_size: opts.transform.image_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::tests::tar_of;
    use crate::source::testing::{FlakyStore, put_all};
    use crate::transform::tests::jpeg;
    use object_store::ObjectStore;

    /// One shard per kind of bad input, in a store where `flaky/` bodies break after 1000 bytes.
    #[test]
    fn bad_input_is_skipped_and_counted_exactly_by_reason() {
        let good = jpeg(12, 10, 1);
        let big = jpeg(200, 100, 2); // 20,000 pixels, over the 10,000 limit below
        let long = "x".repeat(10_001);
        let mut corrupt = good.clone();
        for b in corrupt.iter_mut().skip(2).take(200) {
            *b = 0x11;
        }
        let truncated = &good[..good.len() / 2];
        let bad_samples = tar_of(&[
            ("ok0.jpg", &good),
            ("ok0.txt", b"fine"),
            ("zero.jpg", b""),
            ("zero.txt", b"empty image"),
            ("corrupt.jpg", &corrupt),
            ("corrupt.txt", b"x"),
            ("trunc.jpg", truncated),
            ("trunc.txt", b"x"),
            ("big.jpg", &big),
            ("big.txt", b"x"),
            ("nocap.jpg", &good),
            ("noimg.txt", b"x"),
            ("utf.jpg", &good),
            ("utf.txt", b"caf\xe9"),
            ("long.jpg", &good),
            ("long.txt", long.as_bytes()),
            ("README", b"no extension"),
            ("dup.jpg", &good),
            ("dup.jpg", &good),
            ("dup.txt", b"second dup is complete"),
            ("ok1.png", &good), // a JPEG named .png: PIL sniffs content, so do we
            ("ok1.txt", b"fine"),
        ]);
        let three = tar_of(&[
            ("a.jpg", &good),
            ("a.txt", b"1"),
            ("b.jpg", &good),
            ("b.txt", b"2"),
            ("c.jpg", &good),
            ("c.txt", b"3"),
        ]);
        // A cut inside c.txt's header keeps a and b (c.jpg closed b).
        let truncated_tar = {
            // Find c.txt's header by name and cut inside it.
            let at = (0..three.len())
                .step_by(512)
                .find(|&o| three[o..].starts_with(b"c.txt"))
                .unwrap();
            three[..at + 100].to_vec()
        };
        let corrupt_tar = {
            let at = (0..three.len())
                .step_by(512)
                .find(|&o| three[o..].starts_with(b"c.jpg"))
                .unwrap();
            let mut t = three.clone();
            t[at + 3] ^= 0x40;
            t
        };
        let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        put_all(
            &inner,
            &[
                ("d/0.tar", bad_samples),
                ("d/1.tar", truncated_tar),
                ("d/2.tar", b"this is not a tar file at all".repeat(40)),
                ("d/4.tar", corrupt_tar),
                ("5.tar", three.clone()),
            ],
        );
        // Bodies from memory://flaky/ always break at byte 1000 (and every resume at once).
        let flaky = Arc::new(FlakyStore::new(inner.clone(), 1000, u32::MAX));
        let opener = ShardOpener::new(RetryPolicy::fast(2))
            .with_store("memory", "", inner)
            .with_store("memory", "flaky", flaky);
        let list = ShardList::parse("memory:///d/{0..4}.tar::memory://flaky/5.tar").unwrap();
        let opts = StatsOptions {
            threads: 2,
            transform: TransformConfig {
                image_size: 8,
                max_pixels: 10_000,
                augment: Augment::None,
                ..Default::default()
            },
            retry: RetryPolicy::fast(2),
            ..Default::default()
        };
        let stats = data_stats_with(Arc::new(list), opener, &opts).unwrap();
        let want: BTreeMap<String, u64> = [
            ("zero_byte_member", 1),
            ("image_decode_error", 2),
            ("image_too_large", 1),
            ("missing_caption", 1),
            ("missing_image", 1),
            ("caption_not_utf8", 1),
            ("caption_too_long", 1),
            ("no_extension", 1),
            ("duplicate_key", 1),
            ("cut_short", 1),
            ("truncated_tar", 1),
            ("not_a_tar", 1),
            ("shard_open_failed", 1),
            ("corrupt_tar", 1),
            ("shard_read_failed", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(stats.skipped, want);
        // Good: ok0, dup (second), ok1 from shard 0; a, b from the truncated tar (c has only
        // c.jpg when the tar ends inside c.txt's header: cut short); a and b from the corrupt tar
        // (b was complete when c.jpg's header failed, and python webdataset yields it too); none
        // from the flaky shard (the cut comes inside a.jpg).
        assert_eq!(stats.samples, 3 + 2 + 2);
        assert_eq!(stats.shards, 6);
        // The flaky shard's read was resumed once (two attempts); the missing shard is final.
        assert_eq!(stats.retries, 1);
        let mut failed: Vec<(usize, &str, u64)> = stats
            .failed_shards
            .iter()
            .map(|f| (f.shard, f.reason.name(), f.samples_read))
            .collect();
        failed.sort();
        assert_eq!(
            failed,
            [
                (1, "truncated_tar", 3),
                (2, "not_a_tar", 0),
                (3, "shard_open_failed", 0),
                (4, "corrupt_tar", 2),
                (5, "shard_read_failed", 0)
            ]
        );
        let f3 = stats.failed_shards.iter().find(|f| f.shard == 3).unwrap();
        assert_eq!(f3.url, "memory:///d/3.tar");
        assert!(f3.error.contains("not retried"), "{}", f3.error);
    }

    #[test]
    fn decode_only_decodes_every_image_and_counts_the_bad_ones() {
        let good = jpeg(12, 10, 1);
        let big = jpeg(200, 100, 2);
        let mut corrupt = good.clone();
        for b in corrupt.iter_mut().skip(2).take(200) {
            *b = 0x11;
        }
        let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        put_all(
            &inner,
            &[
                (
                    "d/0.tar",
                    tar_of(&[
                        ("a.jpg", &good),
                        ("a.txt", b"x"),
                        ("b.png", &good),
                        ("c.jpg", &corrupt),
                        ("d.jpg", &big),
                        ("e.txt", b"no image: ignored"),
                    ]),
                ),
                ("d/1.tar", b"not a tar".repeat(100)),
            ],
        );
        let opener = ShardOpener::new(RetryPolicy::fast(1)).with_store("memory", "", inner);
        let list = ShardList::parse("memory:///d/{0..2}.tar").unwrap();
        let stats = decode_only(Arc::new(list), opener, 2, 10_000, None);
        assert_eq!((stats.samples, stats.shards), (2, 3));
        let want: BTreeMap<String, u64> = [
            ("image_decode_error", 1),
            ("image_too_large", 1),
            ("not_a_tar", 1),
            ("shard_open_failed", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(stats.skipped, want);
        assert_eq!(stats.failed_shards.len(), 2);
    }
}
