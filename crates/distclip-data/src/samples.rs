//! Tar members to samples, exactly as OpenCLIP groups them, with positions and skip reasons.
//!
//! The tar stream is parsed by the `webdataset` crate's streaming reader
//! (`webdataset::shard::TarEntries`: ustar, GNU long names, PAX paths, bounded allocation for
//! hostile headers). Grouping is our own port of OpenCLIP's `group_by_keys_nothrow`
//! (`open_clip_train/data.py`), not the crate's `Grouper`: OpenCLIP starts a new sample when an
//! extension repeats under the same key, where the crate (like python webdataset's throwing
//! `group_by_keys`) reports a duplicate; and positions need the ordinal of every group, valid or
//! not. One deliberate difference from OpenCLIP: a sample never spans two shards (OpenCLIP's
//! grouping runs over the concatenated member stream), because a sample's position is
//! (shard, index).

use std::collections::VecDeque;
use std::io::{BufRead, Read};
use std::ops::Range;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use webdataset::shard::TarEntries;

/// Where a sample came from: the shard's index in the [`crate::spec::ShardList`] and the
/// sample's ordinal within the shard (counting every group of members, including skipped ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SamplePos {
    /// Index of the shard in the expanded shard list.
    pub shard: usize,
    /// Ordinal of the sample within the shard, from 0.
    pub index: u64,
}

/// Why a sample was skipped, with detail for the warning.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    /// The counted reason.
    pub reason: SkipReason,
    /// A human-readable detail (the decoder's message, the caption length, ...).
    pub detail: String,
}

pub(crate) fn skip(reason: SkipReason, detail: impl Into<String>) -> Skip {
    Skip {
        reason,
        detail: detail.into(),
    }
}

/// Why a sample, a member, or the rest of a shard was skipped. The snake_case names are stable:
/// they are the keys of `skipped` in `distclip data stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// A tar member whose name has no extension (belongs to no sample).
    NoExtension,
    /// The sample's image or caption member has zero bytes.
    ZeroByteMember,
    /// No `jpg`/`png`/`jpeg`/`webp` member.
    MissingImage,
    /// No `txt` member (or no caption field in `json` when a caption key is set).
    MissingCaption,
    /// An incomplete sample cut off because an extension repeated under the same key.
    DuplicateKey,
    /// An incomplete sample cut off because the tar broke (truncated or corrupt) in it.
    CutShort,
    /// The image bytes do not decode (corrupt or truncated).
    ImageDecodeError,
    /// The image header announces more pixels than the limit.
    ImageTooLarge,
    /// The caption is not valid UTF-8.
    CaptionNotUtf8,
    /// The caption is longer than the character limit (10,000 by default).
    CaptionTooLong,
    /// The `json` member does not parse, or its caption field is not a string.
    BadCaptionJson,
    /// A gzip-compressed caption member (`txt.gz`, `json.gz`) does not decompress.
    BadCaptionGzip,
    /// The shard is not a tar archive (bad first header, or an empty file).
    NotATar,
    /// A tar header later in the shard is corrupt; the rest of the shard is skipped.
    CorruptTar,
    /// The tar ends mid-header or mid-member; the rest of the shard is skipped.
    TruncatedTar,
    /// Reading the shard failed mid-stream after the retries; the rest is skipped.
    ShardReadFailed,
    /// The shard could not be opened (not found, permission denied, unreachable).
    ShardOpenFailed,
}

impl SkipReason {
    /// Every reason, in a fixed order.
    pub const ALL: [SkipReason; 17] = [
        SkipReason::NoExtension,
        SkipReason::ZeroByteMember,
        SkipReason::MissingImage,
        SkipReason::MissingCaption,
        SkipReason::DuplicateKey,
        SkipReason::CutShort,
        SkipReason::ImageDecodeError,
        SkipReason::ImageTooLarge,
        SkipReason::CaptionNotUtf8,
        SkipReason::CaptionTooLong,
        SkipReason::BadCaptionJson,
        SkipReason::BadCaptionGzip,
        SkipReason::NotATar,
        SkipReason::CorruptTar,
        SkipReason::TruncatedTar,
        SkipReason::ShardReadFailed,
        SkipReason::ShardOpenFailed,
    ];

    /// The stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::NoExtension => "no_extension",
            SkipReason::ZeroByteMember => "zero_byte_member",
            SkipReason::MissingImage => "missing_image",
            SkipReason::MissingCaption => "missing_caption",
            SkipReason::DuplicateKey => "duplicate_key",
            SkipReason::CutShort => "cut_short",
            SkipReason::ImageDecodeError => "image_decode_error",
            SkipReason::ImageTooLarge => "image_too_large",
            SkipReason::CaptionNotUtf8 => "caption_not_utf8",
            SkipReason::CaptionTooLong => "caption_too_long",
            SkipReason::BadCaptionJson => "bad_caption_json",
            SkipReason::BadCaptionGzip => "bad_caption_gzip",
            SkipReason::NotATar => "not_a_tar",
            SkipReason::CorruptTar => "corrupt_tar",
            SkipReason::TruncatedTar => "truncated_tar",
            SkipReason::ShardReadFailed => "shard_read_failed",
            SkipReason::ShardOpenFailed => "shard_open_failed",
        }
    }

    /// Whether this reason ends the shard (the shard is then reported as failed).
    pub fn is_shard_level(self) -> bool {
        matches!(
            self,
            SkipReason::NotATar
                | SkipReason::CorruptTar
                | SkipReason::TruncatedTar
                | SkipReason::ShardReadFailed
                | SkipReason::ShardOpenFailed
        )
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One sample's members, undecoded.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSample {
    /// The sample key (member name up to the first dot of the base name).
    pub key: String,
    /// `(extension lowercased, bytes)` in archive order.
    pub members: Vec<(String, Vec<u8>)>,
    /// Where it came from.
    pub pos: SamplePos,
    /// Why this group was closed before its key changed, if it was: [`SkipReason::DuplicateKey`]
    /// when the next member repeated one of its extensions under the same key (OpenCLIP then
    /// starts a new sample), [`SkipReason::CutShort`] when the tar broke (truncated or corrupt)
    /// after its last member. A cut group that lacks its image or caption is counted under this
    /// reason; one that has both is a complete sample and is used, as python webdataset does.
    pub cut: Option<SkipReason>,
    /// Which draw of its shard produced the sample: 0, except in resampled mode, where a shard
    /// drawn twice in one epoch gives its samples different augmentations.
    pub draw: u64,
}

impl RawSample {
    /// The bytes of the member with this (lowercase) extension.
    pub fn get(&self, ext: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(e, _)| e == ext)
            .map(|(_, d)| d.as_slice())
    }
}

/// What reading a shard yields, in order.
#[derive(Debug)]
pub enum ShardEvent {
    /// A complete group of members (validity is checked by the decoder).
    Sample(RawSample),
    /// A member that belongs to no sample (counted as [`SkipReason::NoExtension`]).
    Member {
        /// The reason.
        reason: SkipReason,
        /// The member's name.
        name: String,
    },
    /// The shard ended early: the rest is skipped. Always the last event.
    Failed {
        /// [`SkipReason::NotATar`], `CorruptTar`, `TruncatedTar` or `ShardReadFailed`.
        reason: SkipReason,
        /// What went wrong.
        message: String,
        /// Groups read before the failure (the next index a resume would start at).
        next_index: u64,
    },
}

/// Sort and merge ranges into disjoint, non-empty ones.
fn normalize_ranges(ranges: impl Iterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.filter(|r| r.start < r.end).collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// webdataset's `base_plus_ext` regex, `^((?:.*/|)[^.]+)[.]([^/]*)$`: the key is the path up to
/// the first dot after the last slash. (The `webdataset` crate's `base_plus_ext` differs on names
/// like `x/.hidden.txt`, which the regex splits as `("x/", "hidden.txt")`.)
pub fn base_plus_ext(name: &str) -> Option<(&str, &str)> {
    static RE: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"^((?:.*/|)[^.]+)[.]([^/]*)$").expect("valid regex"));
    let caps = RE.captures(name)?;
    Some((caps.get(1)?.as_str(), caps.get(2)?.as_str()))
}

/// Counts bytes as they are read, for throughput and for telling an empty file from a bad one.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Streams one shard and yields its samples from `start` on, except those in skip ranges.
pub struct ShardReader {
    entries: TarEntries<Counting<Box<dyn Read + Send>>>,
    bytes: Arc<AtomicU64>,
    shard: usize,
    /// Sample indices not to yield (`0..start` and the caller's ranges), sorted, disjoint,
    /// non-empty, so membership is a binary search.
    skip: Vec<Range<u64>>,
    next_index: u64,
    entries_read: u64,
    current: Option<RawSample>,
    queue: VecDeque<ShardEvent>,
    done: bool,
}

impl ShardReader {
    /// Read the tar (or gzip-compressed tar, detected by its magic bytes) in `reader` as shard
    /// number `shard`, skipping the first `start` samples without decoding them.
    pub fn new(reader: impl Read + Send + 'static, shard: usize, start: u64) -> ShardReader {
        Self::with_skip(reader, shard, start, &[])
    }

    /// As [`ShardReader::new`], and also skip the samples whose indices fall in any of `skip`
    /// (ranges already committed by an earlier holder of the shard). Skipped samples are grouped
    /// (so later indices stay exact) but their member bytes are dropped unread by the decoder,
    /// and they produce no events, not even [`ShardEvent::Member`] for extensionless members
    /// that precede them. Ranges may overlap, be empty or be unsorted.
    pub fn with_skip(
        reader: impl Read + Send + 'static,
        shard: usize,
        start: u64,
        skip: &[Range<u64>],
    ) -> ShardReader {
        let mut buffered = std::io::BufReader::with_capacity(1 << 16, reader);
        let gz = matches!(buffered.fill_buf(), Ok(b) if b.starts_with(&[0x1f, 0x8b]));
        let reader: Box<dyn Read + Send> = if gz {
            Box::new(flate2::read::MultiGzDecoder::new(buffered))
        } else {
            Box::new(buffered)
        };
        let bytes = Arc::new(AtomicU64::new(0));
        ShardReader {
            entries: TarEntries::new(Counting {
                inner: reader,
                count: bytes.clone(),
            }),
            bytes,
            shard,
            skip: normalize_ranges(skip.iter().cloned().chain(std::iter::once(0..start))),
            next_index: 0,
            entries_read: 0,
            current: None,
            queue: VecDeque::new(),
            done: false,
        }
    }

    /// Sample groups seen so far, wanted or not: once the reader has ended cleanly, the number
    /// of samples in the shard.
    pub fn samples_seen(&self) -> u64 {
        self.next_index
    }

    /// Bytes read from the (decompressed) stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether sample `index` is to be yielded (not before the start, not in a skip range).
    fn wanted(&self, index: u64) -> bool {
        let i = self.skip.partition_point(|r| r.end <= index);
        self.skip.get(i).is_none_or(|r| r.start > index)
    }

    /// Close the current group and queue it if it is wanted.
    fn close_current(&mut self, cut: Option<SkipReason>) {
        if let Some(mut s) = self.current.take()
            && self.wanted(s.pos.index)
        {
            s.cut = cut;
            self.queue.push_back(ShardEvent::Sample(s));
        }
    }

    fn push_member(&mut self, name: String, data: Vec<u8>) {
        if webdataset::core::utils::is_shard_metadata(&name) {
            return;
        }
        let Some((prefix, suffix)) = base_plus_ext(&name) else {
            // Attributed to the group that follows it, so that exactly one holder reports it.
            if self.wanted(self.next_index) {
                self.queue.push_back(ShardEvent::Member {
                    reason: SkipReason::NoExtension,
                    name,
                });
            }
            return;
        };
        let suffix = suffix.to_lowercase();
        let same_key = self.current.as_ref().is_some_and(|c| c.key == prefix);
        let repeated = same_key
            && self
                .current
                .as_ref()
                .is_some_and(|c| c.get(&suffix).is_some());
        if !same_key || repeated {
            self.close_current(repeated.then_some(SkipReason::DuplicateKey));
            self.current = Some(RawSample {
                key: prefix.to_string(),
                members: Vec::new(),
                pos: SamplePos {
                    shard: self.shard,
                    index: self.next_index,
                },
                cut: None,
                draw: 0,
            });
            self.next_index += 1;
        }
        let index = self.current.as_ref().map(|c| c.pos.index);
        if let Some(i) = index
            && self.wanted(i)
            && let Some(c) = self.current.as_mut()
        {
            c.members.push((suffix, data));
        }
    }

    fn fail(&mut self, err: webdataset::core::Error) {
        use webdataset::core::Error as E;
        let message = err.to_string();
        let reason = match &err {
            E::Io(_) => SkipReason::ShardReadFailed,
            // The very first header is bad: this is not a tar (or a sub-block stub of one).
            _ if self.entries_read == 0 && self.bytes_read() <= 512 => SkipReason::NotATar,
            E::Format(m) if m.contains("ends mid") => SkipReason::TruncatedTar,
            _ => SkipReason::CorruptTar,
        };
        let next_index = if reason == SkipReason::ShardReadFailed {
            // The stream broke after the retries: a resume may read the group being assembled
            // whole, so drop it here and resume at it.
            self.current.take().map_or(self.next_index, |c| c.pos.index)
        } else {
            // The bytes themselves end or break: reading again gives the same. The group being
            // assembled holds only members read whole; it is a sample if it has what training
            // needs, as in python webdataset (`CutShort` otherwise).
            self.close_current(Some(SkipReason::CutShort));
            self.next_index
        };
        self.queue.push_back(ShardEvent::Failed {
            reason,
            message,
            next_index,
        });
    }
}

impl Iterator for ShardReader {
    type Item = ShardEvent;

    fn next(&mut self) -> Option<ShardEvent> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            match self.entries.next() {
                Some(Ok(entry)) => {
                    self.entries_read += 1;
                    self.push_member(entry.name, entry.data);
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.fail(e);
                }
                None => {
                    self.done = true;
                    if self.entries_read == 0 && self.bytes_read() == 0 {
                        self.queue.push_back(ShardEvent::Failed {
                            reason: SkipReason::NotATar,
                            message: "empty file".into(),
                            next_index: 0,
                        });
                    } else {
                        self.close_current(None);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tar with these members, written by the `tar` crate (independent of our writer).
    pub(crate) fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn read(tar: Vec<u8>, start: u64) -> Vec<ShardEvent> {
        ShardReader::new(std::io::Cursor::new(tar), 7, start).collect()
    }

    fn keys(events: &[ShardEvent]) -> Vec<(String, u64, Vec<String>)> {
        events
            .iter()
            .filter_map(|e| match e {
                ShardEvent::Sample(s) => Some((
                    s.key.clone(),
                    s.pos.index,
                    s.members.iter().map(|(e, _)| e.clone()).collect(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn base_plus_ext_matches_the_python_regex() {
        assert_eq!(base_plus_ext("a/b/c.png"), Some(("a/b/c", "png")));
        assert_eq!(base_plus_ext("a/b/c.seg.PNG"), Some(("a/b/c", "seg.PNG")));
        assert_eq!(base_plus_ext("a.b/c.txt"), Some(("a.b/c", "txt")));
        assert_eq!(base_plus_ext("x/.hidden.txt"), Some(("x/", "hidden.txt")));
        assert_eq!(base_plus_ext("noext"), None);
        assert_eq!(base_plus_ext("dir.x/file"), None);
        assert_eq!(base_plus_ext(".txt"), None);
    }

    #[test]
    fn groups_by_key_lowercases_and_splits_on_repeated_extension() {
        let tar = tar_of(&[
            ("000.jpg", b"i0"),
            ("000.TXT", b"t0"),
            ("001.jpg", b"i1"),
            ("001.txt", b"t1"),
            ("001.jpg", b"i1b"), // repeated extension: a new sample with the same key
            ("001.txt", b"t1b"),
            ("noext", b"x"),
            ("__index__", b"meta"),
            ("d/002.seg.png", b"p"),
            ("d/002.json", b"{}"),
        ]);
        let events = read(tar, 0);
        assert_eq!(
            keys(&events),
            [
                ("000".into(), 0, vec!["jpg".into(), "txt".into()]),
                ("001".into(), 1, vec!["jpg".into(), "txt".into()]),
                ("001".into(), 2, vec!["jpg".into(), "txt".into()]),
                ("d/002".into(), 3, vec!["seg.png".into(), "json".into()]),
            ]
        );
        let cut: Vec<Option<SkipReason>> = events
            .iter()
            .filter_map(|e| match e {
                ShardEvent::Sample(s) => Some(s.cut),
                _ => None,
            })
            .collect();
        assert_eq!(cut, [None, Some(SkipReason::DuplicateKey), None, None]);
        // The member is reported when read, before the group it sits in is closed.
        assert!(
            matches!(&events[2], ShardEvent::Member { reason: SkipReason::NoExtension, name } if name == "noext")
        );
        match &events[3] {
            ShardEvent::Sample(s) => {
                assert_eq!(s.get("jpg"), Some(&b"i1b"[..]));
                assert_eq!(s.pos, SamplePos { shard: 7, index: 2 });
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn starting_at_an_index_skips_earlier_samples() {
        let names: Vec<String> = (0..5)
            .flat_map(|i| [format!("{i:03}.jpg"), format!("{i:03}.txt")])
            .collect();
        let members: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
        let events = read(tar_of(&members), 3);
        let k = keys(&events);
        assert_eq!(
            k.iter()
                .map(|(k, i, _)| (k.as_str(), *i))
                .collect::<Vec<_>>(),
            [("003", 3), ("004", 4)]
        );
    }

    #[test]
    fn skip_ranges_drop_exactly_those_samples() {
        let names: Vec<String> = (0..10)
            .flat_map(|i| [format!("{i:03}.jpg"), format!("{i:03}.txt")])
            .chain(["zz_noext".to_string()])
            .collect();
        let mut members: Vec<(&str, &[u8])> =
            names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
        // An extensionless member before sample 5 (skipped) and one before sample 8 (wanted).
        members.insert(10, ("noext5", b"m"));
        members.insert(17, ("noext8", b"m"));
        let tar = tar_of(&members);
        let events: Vec<ShardEvent> = ShardReader::with_skip(
            std::io::Cursor::new(tar),
            1,
            2,
            // Unsorted, overlapping and empty ranges are accepted.
            &[6..7, 4..6, 5..6, 9..9, 0..1],
        )
        .collect();
        let got: Vec<u64> = keys(&events).iter().map(|(_, i, _)| *i).collect();
        assert_eq!(got, [2, 3, 7, 8, 9]);
        let members: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                ShardEvent::Member { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        // zz_noext follows the last sample: it is attributed to index 10, which is wanted.
        assert_eq!(members, ["noext8", "zz_noext"]);
        assert_eq!(
            normalize_ranges([3..5, 1..2, 4..8, 8..9, 7..7].into_iter()),
            [1..2, 3..9]
        );
    }

    #[test]
    fn gzip_tar_is_read_transparently() {
        use std::io::Write;
        let tar = tar_of(&[("a.jpg", b"1"), ("a.txt", b"2")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        assert_eq!(keys(&read(gz.finish().unwrap(), 0)).len(), 1);
    }

    fn failure(events: &[ShardEvent]) -> (SkipReason, u64) {
        match events.last() {
            Some(ShardEvent::Failed {
                reason, next_index, ..
            }) => (*reason, *next_index),
            e => panic!("no failure: {e:?}"),
        }
    }

    #[test]
    fn truncated_corrupt_empty_and_non_tar_shards() {
        let tar = tar_of(&[
            ("a.jpg", &[1; 600]),
            ("a.txt", b"x"),
            ("b.jpg", &[2; 600]),
            ("b.txt", b"y"),
        ]);
        // Blocks: a.jpg header 0, data 1-2; a.txt 3, 4; b.jpg 5, 6-7; b.txt 8, 9.
        let cuts = |events: &[ShardEvent]| -> Vec<(String, Option<SkipReason>)> {
            events
                .iter()
                .filter_map(|e| match e {
                    ShardEvent::Sample(s) => Some((s.key.clone(), s.cut)),
                    _ => None,
                })
                .collect()
        };
        // Cut inside b.txt's data: a was closed by b.jpg; b holds only b.jpg, read whole, and
        // is handed on marked cut short (its missing caption is counted under that reason).
        let events = read(tar[..512 * 9 + 1].to_vec(), 0);
        assert_eq!(cuts(&events), [("a".into(), None), ("b".into(), Some(SkipReason::CutShort))]);
        assert_eq!(failure(&events), (SkipReason::TruncatedTar, 2));
        // Cut in the end-of-archive blocks after b.txt: b is complete and yielded, as python
        // webdataset yields it.
        let events = read(tar[..512 * 10 + 100].to_vec(), 0);
        assert_eq!(keys(&events).len(), 2);
        assert_eq!(keys(&events)[1].2, ["jpg", "txt"]);
        if let Some(ShardEvent::Failed { .. }) = events.last() {
            assert_eq!(failure(&events), (SkipReason::TruncatedTar, 2));
        }
        // Cut mid-header (b.txt's).
        let events = read(tar[..512 * 8 + 100].to_vec(), 0);
        assert_eq!(keys(&events).len(), 2);
        assert_eq!(failure(&events), (SkipReason::TruncatedTar, 2));
        // Cut inside the first member's data: a truncated tar, not "not a tar"; nothing whole.
        let events = read(tar[..700].to_vec(), 0);
        assert_eq!(keys(&events).len(), 0);
        assert_eq!(failure(&events), (SkipReason::TruncatedTar, 0));
        // Corrupt b.jpg's header: checksum mismatch while a is still being assembled; a has
        // both its members and is yielded.
        let mut bad = tar.clone();
        bad[512 * 5 + 10] ^= 0x55;
        let events = read(bad, 0);
        assert_eq!(cuts(&events), [("a".into(), Some(SkipReason::CutShort))]);
        assert_eq!(failure(&events), (SkipReason::CorruptTar, 1));
        // A resume at the failure's index reads nothing twice.
        let events = read(tar[..512 * 8 + 100].to_vec(), 2);
        assert_eq!(keys(&events).len(), 0);
        assert_eq!(failure(&read(Vec::new(), 0)).0, SkipReason::NotATar);
        assert_eq!(
            failure(&read(b"hello, not a tar".repeat(100), 0)).0,
            SkipReason::NotATar
        );
        assert_eq!(
            failure(&read(vec![0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3], 0)).0,
            SkipReason::NotATar
        );
    }

    /// A reader that fails with a connection reset after `n` bytes.
    pub(crate) struct FailAfter<R> {
        pub inner: R,
        pub left: usize,
    }

    impl<R: Read> Read for FailAfter<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                ));
            }
            let m = buf.len().min(self.left);
            let n = self.inner.read(&mut buf[..m])?;
            self.left -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_stream_failing_mid_shard_reports_the_resume_index() {
        let names: Vec<String> = (0..4)
            .flat_map(|i| [format!("{i}.jpg"), format!("{i}.txt")])
            .collect();
        let members: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
        let tar = tar_of(&members);
        // Each member is 2 blocks; fail inside the 6th member (sample 2's txt).
        let r = FailAfter {
            inner: std::io::Cursor::new(tar),
            left: 1024 * 5 + 10,
        };
        let events: Vec<_> = ShardReader::new(r, 0, 0).collect();
        assert_eq!(keys(&events).len(), 2);
        assert_eq!(failure(&events), (SkipReason::ShardReadFailed, 2));
    }

    #[test]
    fn reason_names_are_stable_snake_case() {
        for r in SkipReason::ALL {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::Value::String(r.name().into())
            );
        }
        assert_eq!(SkipReason::ImageTooLarge.name(), "image_too_large");
    }
}
