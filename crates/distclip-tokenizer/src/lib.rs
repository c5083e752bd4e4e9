//! CLIP's byte-level BPE tokenizer, giving exactly the ids of OpenCLIP 3.3.0's
//! `open_clip.tokenize` (`SimpleTokenizer`, `clean="lower"`).
//!
//! ```
//! use distclip_tokenizer::{DEFAULT_CONTEXT_LENGTH, EOT, SOT, Tokenizer};
//! let tok = Tokenizer::shared();
//! let row = tok.tokenize("A photo of a cat", DEFAULT_CONTEXT_LENGTH);
//! assert_eq!(&row[..7], &[SOT, 320, 1125, 539, 320, 2368, EOT]);
//! assert_eq!(row.len(), 77);
//! ```
//!
//! The pipeline mirrors `SimpleTokenizer.encode`:
//!
//! 1. `ftfy.fix_text` (ftfy 6.3.1, default configuration), ported in full: HTML entity
//!    unescaping (disabled from the first line containing `<` on, as ftfy's "auto" does),
//!    mojibake repair with ftfy's badness heuristic over its ten single-byte encodings,
//!    `restore_byte_a0`, `replace_lossy_sequences`, `decode_inconsistent_utf8`, CESU-8 and
//!    Java-NUL decoding, C1 controls, Latin ligatures, character width, curly quotes, line
//!    breaks, ANSI escapes, control characters and NFC, repeated until the text is stable,
//!    segment by segment (lines, at most 10^6 code points) as `fix_text` does.
//! 2. `html.unescape` twice (Python's HTML5 rules, including `&amp` without `;`).
//! 3. Python's `" ".join(text.split())` and `str.lower()` (Unicode 14 data, final sigma).
//! 4. The pre-tokenizer regex as the `regex` module runs it with IGNORECASE.
//! 5. Byte-to-unicode mapping and BPE merges by rank, with a thread-safe word cache.
//!
//! Python's and Rust's Unicode data differ (Python 3.11 has Unicode 14.0), so the character
//! tables in `tables.rs` are dumped from the reference stack by
//! `tools/parity/tokenizer/gen_tables.py`; see [`REFERENCE`]. Known limits:
//!
//! * NFC uses the `unicode-normalization` crate (a newer Unicode), applied between code
//!   points Python 3.11 has no data for, which pass through untouched as they do in Python;
//!   Unicode's stability policy makes the rest agree. Tested on characters from blocks added
//!   after Unicode 14, but it rests on that policy rather than on a dumped table.
//! * The tables pin the reference: with a different Python (Unicode) or `regex` version,
//!   OpenCLIP itself tokenizes rare characters differently; regenerate them then.
//! * Python's `fix_text` and `fix_encoding` loop until nothing changes; here each loop stops
//!   after 64 passes so no input can spin forever (no real text needs more than a few).
//! * `decode` skips ids outside the vocabulary instead of raising, and `tokenize` with
//!   `context_length == 0` uses 77, as `open_clip.tokenize`'s `context_length or 77` does.

mod bpe;
mod ftfy;
mod html;
mod pretok;
mod pystr;
#[rustfmt::skip]
mod tables;

use std::sync::OnceLock;

/// Id of `<start_of_text>`.
pub const SOT: u32 = 49406;
/// Id of `<end_of_text>`.
pub const EOT: u32 = 49407;
/// Number of ids: 256 bytes, 256 word-final bytes, 48,894 merges and the two special tokens.
pub const VOCAB_SIZE: usize = 49408;
/// The context length of every OpenAI CLIP model.
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;
/// The Python stack the Unicode, HTML and ftfy tables were dumped from.
pub const REFERENCE: &str = tables::SOURCE;

/// The BPE merge list (OpenAI CLIP, MIT; see `assets/LICENSE-bpe-vocab.md`).
static VOCAB_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");

/// The CLIP tokenizer. Cheap to share: it is `Send + Sync` and its word cache is locked
/// per shard, so one instance (see [`Tokenizer::shared`]) can serve many threads.
pub struct Tokenizer {
    bpe: bpe::Bpe,
    pretok: pretok::PreTokenizer,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.bpe.vocab.len())
            .finish()
    }
}

impl Tokenizer {
    /// Build a tokenizer from the embedded vocabulary (decompresses ~1.3 MB and builds the
    /// merge table: tens of milliseconds, so prefer [`Tokenizer::shared`]).
    pub fn new() -> Self {
        use std::io::Read;
        let mut text = String::new();
        flate2::read::GzDecoder::new(VOCAB_GZ)
            .read_to_string(&mut text)
            .expect("embedded BPE vocabulary is valid gzip UTF-8");
        let bpe = bpe::Bpe::new(&text);
        assert_eq!(
            bpe.vocab.len(),
            VOCAB_SIZE,
            "embedded vocabulary has the CLIP size"
        );
        Tokenizer {
            bpe,
            pretok: pretok::PreTokenizer::new(),
        }
    }

    /// A process-wide tokenizer, built on first use.
    pub fn shared() -> &'static Tokenizer {
        static SHARED: OnceLock<Tokenizer> = OnceLock::new();
        SHARED.get_or_init(Tokenizer::new)
    }

    /// OpenCLIP's `clean="lower"` text cleaning: ftfy, `html.unescape` twice, whitespace
    /// collapsed, lowercased.
    pub fn clean(&self, text: &str) -> String {
        let fixed = ftfy::fix_text(text);
        let once = html::unescape(&fixed);
        let twice = html::unescape(&once);
        pystr::py_lower(&pystr::collapse_whitespace(pystr::py_strip(&twice)))
    }

    /// Cleaned text to BPE ids, without `<start_of_text>`/`<end_of_text>` around them
    /// (special-token strings inside the text still map to their ids).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = self.clean(text);
        let mut ids = Vec::with_capacity(cleaned.len() / 3 + 2);
        self.pretok.for_each(&cleaned, |token| match token {
            // Python seeds its BPE cache with the special tokens, so only the exact
            // strings become their ids.
            "<start_of_text>" => ids.push(SOT),
            "<end_of_text>" => ids.push(EOT),
            _ => self.bpe.encode_word(token, &mut ids),
        });
        ids
    }

    /// Ids back to text, as `SimpleTokenizer.decode`: invalid UTF-8 becomes U+FFFD and each
    /// word end (`</w>`) a space. Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let Some(sym) = self.bpe.vocab.get(id as usize) else {
                continue;
            };
            // Every vocabulary character stands for one byte.
            bytes.extend(sym.chars().filter_map(|c| self.bpe.char_to_byte(c)));
        }
        String::from_utf8_lossy(&bytes).replace("</w>", " ")
    }

    /// `open_clip.tokenize` for one text: `<start_of_text>`, the ids, `<end_of_text>`,
    /// truncated to `context_length` with `<end_of_text>` kept last, padded with 0.
    /// A `context_length` of 0 means [`DEFAULT_CONTEXT_LENGTH`], as in OpenCLIP.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<u32> {
        let n = if context_length == 0 {
            DEFAULT_CONTEXT_LENGTH
        } else {
            context_length
        };
        let mut tokens = Vec::with_capacity(n.max(2));
        tokens.push(SOT);
        tokens.extend(self.encode(text));
        tokens.push(EOT);
        if tokens.len() > n {
            tokens.truncate(n);
            tokens[n - 1] = EOT;
        }
        tokens.resize(n, 0);
        tokens
    }

    /// [`Tokenizer::tokenize`] for each text.
    pub fn tokenize_batch(
        &self,
        texts: &[impl AsRef<str>],
        context_length: usize,
    ) -> Vec<Vec<u32>> {
        texts
            .iter()
            .map(|t| self.tokenize(t.as_ref(), context_length))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn byte_mapping() {
        let m = bpe::bytes_to_unicode();
        assert_eq!(m.len(), 256);
        assert_eq!(m[0], (b'!', '!'));
        assert_eq!(m[188], (0, '\u{100}'));
        assert!(m.iter().any(|&(b, c)| b == b' ' && c == '\u{120}'));
        let t = Tokenizer::shared();
        assert_eq!(t.bpe.vocab[0], "!");
        assert_eq!(t.bpe.vocab[256], "!</w>");
        assert_eq!(t.bpe.vocab[SOT as usize], "<start_of_text>");
        assert_eq!(t.bpe.vocab[EOT as usize], "<end_of_text>");
    }

    #[test]
    fn bpe_merges() {
        let t = Tokenizer::shared();
        // "hello</w>" is a single vocabulary entry.
        let ids = t.bpe.merge_uncached(b"hello");
        assert_eq!(ids.len(), 1);
        assert_eq!(t.bpe.vocab[ids[0] as usize], "hello</w>");
        assert_eq!(
            t.encode("a photo of a cat"),
            vec![320, 1125, 539, 320, 2368]
        );
        assert!(t.bpe.merge_uncached(b"").is_empty());
    }

    #[test]
    fn tokenize_shapes() {
        let t = Tokenizer::shared();
        let v = t.tokenize("a photo of a cat", 77);
        assert_eq!(&v[..7], &[SOT, 320, 1125, 539, 320, 2368, EOT]);
        assert!(v[7..].iter().all(|&x| x == 0));
        assert_eq!(t.tokenize("a photo of a cat", 4), vec![SOT, 320, 1125, EOT]);
        assert_eq!(t.tokenize("a photo", 1), vec![EOT]);
        assert_eq!(t.tokenize("", 3), vec![SOT, EOT, 0]);
        assert_eq!(t.tokenize("x", 0).len(), DEFAULT_CONTEXT_LENGTH);
        assert_eq!(t.tokenize("<start_of_text>", 4), vec![SOT, SOT, EOT, 0]);
    }

    #[test]
    fn round_trip() {
        let t = Tokenizer::shared();
        for s in [
            "a photo of a cat",
            "hello world",
            "the quick brown fox jumps over the lazy dog",
        ] {
            assert_eq!(t.decode(&t.encode(s)).trim_end(), s);
        }
    }
}
