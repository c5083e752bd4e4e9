//! The pre-tokenizer: OpenCLIP's
//! `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//! with IGNORECASE, as Python's `regex` module runs it. Written as a scanner over class tables
//! dumped from that module, because its case-insensitive class membership (e.g. U+0345
//! matching none of the classes) and Unicode version differ from Rust's `regex`.

use crate::bpe::SPECIAL_TOKENS;
use crate::pystr::in_ranges;
use crate::tables;

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const OTHER: u8 = 4;

/// Class bits of a character (several can be set, none for whitespace-like characters).
fn class_of(c: char) -> u8 {
    let cp = c as u32;
    let mut bits = 0;
    if in_ranges(tables::PRE_LETTER, cp) {
        bits |= LETTER;
    }
    if in_ranges(tables::PRE_NUMBER, cp) {
        bits |= NUMBER;
    }
    if in_ranges(tables::PRE_OTHER, cp) {
        bits |= OTHER;
    }
    bits
}

/// Class bits with an ASCII fast path.
struct Classes {
    ascii: [u8; 128],
}

impl Classes {
    fn new() -> Self {
        let mut ascii = [0u8; 128];
        for (b, slot) in ascii.iter_mut().enumerate() {
            *slot = class_of(b as u8 as char);
        }
        Classes { ascii }
    }

    fn get(&self, c: char) -> u8 {
        if c.is_ascii() {
            self.ascii[c as usize]
        } else {
            class_of(c)
        }
    }
}

fn lit_eq(lit: char, c: char) -> bool {
    c == lit
        || tables::LITERAL_FOLDS
            .iter()
            .any(|&(l, o)| l == lit as u32 && o == c as u32)
}

/// Length in bytes of `lit` matched case-insensitively at the start of `s`.
fn match_literal(s: &str, lit: &str) -> Option<usize> {
    let mut it = s.char_indices();
    for l in lit.chars() {
        let (_, c) = it.next()?;
        if !lit_eq(l, c) {
            return None;
        }
    }
    Some(it.next().map_or(s.len(), |(i, _)| i))
}

/// Splits cleaned text into pre-tokens, in order.
pub(crate) struct PreTokenizer {
    classes: Classes,
}

impl PreTokenizer {
    pub(crate) fn new() -> Self {
        PreTokenizer {
            classes: Classes::new(),
        }
    }

    /// Call `f` with each match of the pattern, as `re.findall` would list them.
    pub(crate) fn for_each<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) {
        let mut pos = 0;
        while let Some(c) = text[pos..].chars().next() {
            let rest = &text[pos..];
            let mut len = None;
            if c == '<' || c == '\'' {
                let lits: &[&str] = if c == '<' {
                    &SPECIAL_TOKENS
                } else {
                    &["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
                };
                len = lits.iter().find_map(|lit| match_literal(rest, lit));
            }
            if len.is_none() {
                let cls = self.classes.get(c);
                // Alternation order: letters+, one number, others+.
                let run = |bit: u8| -> usize {
                    rest.char_indices()
                        .find(|&(_, ch)| self.classes.get(ch) & bit == 0)
                        .map_or(rest.len(), |(i, _)| i)
                };
                len = if cls & LETTER != 0 {
                    Some(run(LETTER))
                } else if cls & NUMBER != 0 {
                    Some(c.len_utf8())
                } else if cls & OTHER != 0 {
                    Some(run(OTHER))
                } else {
                    None
                };
            }
            match len {
                Some(n) => {
                    f(&rest[..n]);
                    pos += n;
                }
                None => pos += c.len_utf8(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PreTokenizer;

    fn split(s: &str) -> Vec<&str> {
        let p = PreTokenizer::new();
        let mut v = Vec::new();
        p.for_each(s, |t| v.push(t));
        v
    }

    #[test]
    fn matches_python_findall() {
        assert_eq!(split("don't stop"), ["don", "'t", "stop"]);
        assert_eq!(
            split("a photo of 2024 cats!!"),
            ["a", "photo", "of", "2", "0", "2", "4", "cats", "!!"]
        );
        assert_eq!(
            split("<start_of_text>hi<end_of_text>"),
            ["<start_of_text>", "hi", "<end_of_text>"]
        );
        assert_eq!(split("'ſ <ſtart_of_text>"), ["'ſ", "<ſtart_of_text>"]);
        assert_eq!(split("!\u{345}!"), ["!", "!"]);
        assert_eq!(split("x\u{200b}y"), ["x", "\u{200b}", "y"]);
        assert_eq!(split("'' 'rex"), ["''", "'re", "x"]);
    }
}
