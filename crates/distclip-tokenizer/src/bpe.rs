//! CLIP's byte-level BPE: the byte <-> unicode mapping, the vocabulary built from the merge
//! list exactly as `SimpleTokenizer.__init__` builds it, and the merge loop of
//! `SimpleTokenizer.bpe`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

/// Number of merges OpenCLIP reads from the file: `merges[1:49152-256-2+1]`.
const NUM_MERGES: usize = 49152 - 256 - 2;
/// The special tokens, in vocabulary order (after the merges).
pub(crate) const SPECIAL_TOKENS: [&str; 2] = ["<start_of_text>", "<end_of_text>"];

/// `bytes_to_unicode()`: byte -> the printable character that stands for it, in the
/// order the Python dict yields its values (printable bytes first).
pub(crate) fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("below 512")))
        .collect()
}

/// Shards of the word -> ids cache: a lock per shard keeps threads from queueing on one.
const CACHE_SHARDS: usize = 32;
/// Entries per shard before it is cleared; the cache only saves work, so forgetting is safe.
const CACHE_SHARD_CAP: usize = 8192;

/// One shard of the word cache: pre-token -> ids.
type CacheShard = Mutex<HashMap<Box<str>, Box<[u32]>>>;

pub(crate) struct Bpe {
    /// Vocabulary strings by id (every id, even ones Python's decoder dict would lose).
    pub(crate) vocab: Vec<String>,
    /// id of byte `b` as a word-initial/middle symbol.
    byte_id: [u32; 256],
    /// id of byte `b` with `</w>` (word-final symbol).
    byte_end_id: [u32; 256],
    /// character (all are below U+0200) -> the byte it stands for.
    char_byte: [Option<u8>; 512],
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    cache: Vec<CacheShard>,
    hasher: std::collections::hash_map::RandomState,
}

impl Bpe {
    /// Build from the decompressed merge file.
    pub(crate) fn new(merges_txt: &str) -> Self {
        let b2u = bytes_to_unicode();
        let merges: Vec<(&str, &str)> = merges_txt
            .split('\n')
            .skip(1)
            .take(NUM_MERGES)
            .map(|line| {
                let mut parts = line.split_whitespace();
                (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
            })
            .collect();
        let mut vocab: Vec<String> = b2u.iter().map(|&(_, c)| c.to_string()).collect();
        vocab.extend(b2u.iter().map(|&(_, c)| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
        // dict(zip(vocab, range)): a repeated string keeps its last id.
        let mut encoder: HashMap<&str, u32> = HashMap::with_capacity(vocab.len());
        for (i, v) in vocab.iter().enumerate() {
            encoder.insert(v, i as u32);
        }
        let mut byte_id = [0u32; 256];
        let mut byte_end_id = [0u32; 256];
        let mut char_byte = [None; 512];
        for &(b, c) in &b2u {
            char_byte[c as usize] = Some(b);
            byte_id[b as usize] = encoder[c.to_string().as_str()];
            byte_end_id[b as usize] = encoder[format!("{c}</w>").as_str()];
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let (Some(&l), Some(&r)) = (encoder.get(a), encoder.get(b)) else {
                continue;
            };
            let merged = encoder[format!("{a}{b}").as_str()];
            // dict(zip(merges, range)): a repeated pair keeps its last rank.
            merge_map.insert((l, r), (rank as u32, merged));
        }
        Bpe {
            byte_id,
            byte_end_id,
            char_byte,
            merges: merge_map,
            cache: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher: Default::default(),
            vocab,
        }
    }

    /// The merge loop of `SimpleTokenizer.bpe` on one pre-token's UTF-8 bytes.
    fn merge_word(&self, bytes: &[u8]) -> Vec<u32> {
        let Some((&last, init)) = bytes.split_last() else {
            return Vec::new();
        };
        let mut word: Vec<u32> = init.iter().map(|&b| self.byte_id[b as usize]).collect();
        word.push(self.byte_end_id[last as usize]);
        while word.len() > 1 {
            // The pair of lowest rank; pairs without a rank never merge.
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, merged)| (rank, w[0], w[1], merged))
                })
                .min_by_key(|m| m.0);
            let Some((_, left, right, merged)) = best else {
                break;
            };
            let mut out = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if word[i] == left && word.get(i + 1) == Some(&right) {
                    out.push(merged);
                    i += 2;
                } else {
                    out.push(word[i]);
                    i += 1;
                }
            }
            word = out;
        }
        word
    }

    /// Ids for one pre-token, through the cache (keyed by the pre-token itself, which the
    /// byte mapping turns one-to-one into Python's cache key).
    pub(crate) fn encode_word(&self, token: &str, out: &mut Vec<u32>) {
        let shard = &self.cache[(self.hasher.hash_one(token) as usize) % CACHE_SHARDS];
        if let Ok(map) = shard.lock()
            && let Some(ids) = map.get(token)
        {
            out.extend_from_slice(ids);
            return;
        }
        let ids = self.merge_word(token.as_bytes());
        out.extend_from_slice(&ids);
        // A poisoned lock only means another thread panicked mid-insert; skip caching then.
        if let Ok(mut map) = shard.lock() {
            if map.len() >= CACHE_SHARD_CAP {
                map.clear();
            }
            map.insert(token.into(), ids.into_boxed_slice());
        }
    }

    /// The byte a vocabulary character stands for.
    pub(crate) fn char_to_byte(&self, c: char) -> Option<u8> {
        self.char_byte.get(c as usize).copied().flatten()
    }

    /// Uncached merge, for tests.
    #[cfg(test)]
    pub(crate) fn merge_uncached(&self, bytes: &[u8]) -> Vec<u32> {
        self.merge_word(bytes)
    }
}
