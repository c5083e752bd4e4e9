//! Python `str` behaviour that OpenCLIP's cleaning relies on: `split()`/`strip()` whitespace
//! and `lower()`, from tables dumped out of the reference Python (Unicode 14.0) rather than
//! Rust's std, whose newer Unicode data would disagree on recently added characters.

use crate::tables;
use std::cmp::Ordering;

/// Whether `c` lies in one of the sorted, disjoint inclusive `ranges`.
pub(crate) fn in_ranges(ranges: &[(u32, u32)], c: u32) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                Ordering::Less
            } else if lo > c {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        })
        .is_ok()
}

/// Python `str.isspace()` for one character.
pub(crate) fn is_py_space(c: char) -> bool {
    if c.is_ascii() {
        // ASCII whitespace for Python includes \x1c-\x1f (unlike Rust's).
        matches!(
            c,
            '\t' | '\n' | '\x0b' | '\x0c' | '\r' | '\x1c'..='\x1f' | ' '
        )
    } else {
        in_ranges(tables::PY_SPACE, c as u32)
    }
}

/// Python `" ".join(text.split())`: collapse runs of whitespace and trim both ends.
pub(crate) fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Python `str.strip()` (no arguments).
pub(crate) fn py_strip(text: &str) -> &str {
    text.trim_matches(is_py_space)
}

fn sigma_ignorable(c: char) -> bool {
    in_ranges(tables::SIGMA_IGNORABLE, c as u32)
}

fn sigma_cased(c: char) -> bool {
    in_ranges(tables::SIGMA_CASED, c as u32)
}

/// Python's Final_Sigma test for the capital sigma at `chars[i]`.
fn final_sigma(chars: &[char], i: usize) -> bool {
    // Cased letter before (skipping case-ignorables) ...
    let before = chars[..i].iter().rev().find(|&&c| !sigma_ignorable(c));
    if !before.is_some_and(|&c| sigma_cased(c)) {
        return false;
    }
    // ... and no cased letter after (skipping case-ignorables).
    match chars[i + 1..].iter().find(|&&c| !sigma_ignorable(c)) {
        None => true,
        Some(&c) => !sigma_cased(c),
    }
}

/// Python `str.lower()`: full lowercase mapping with the final-sigma rule.
pub(crate) fn py_lower(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else if c == '\u{3A3}' {
            out.push(if final_sigma(&chars, i) {
                '\u{3C2}'
            } else {
                '\u{3C3}'
            });
        } else {
            match tables::PY_LOWER.binary_search_by_key(&(c as u32), |e| e.0) {
                Ok(k) => {
                    let (_, a, b) = tables::PY_LOWER[k];
                    out.extend(char::from_u32(a));
                    if b != 0 {
                        out.extend(char::from_u32(b));
                    }
                }
                Err(_) => out.push(c),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_matches_python_split() {
        assert_eq!(
            collapse_whitespace("  a\t\tb\u{1c}c\u{a0}d\u{3000}e\u{200b}f  "),
            "a b c d e\u{200b}f"
        );
        assert_eq!(collapse_whitespace(" \n\r\u{2028} "), "");
        assert_eq!(py_strip("\u{85} x \u{205f}"), "x");
    }

    #[test]
    fn lower_matches_python() {
        assert_eq!(py_lower("HeLLo"), "hello");
        assert_eq!(py_lower("\u{130}"), "i\u{307}");
        assert_eq!(py_lower("ΟΔΟΣ ΣΑ Σ"), "οδος σα σ");
        assert_eq!(py_lower("ΑΣ'"), "ας'");
        assert_eq!(py_lower("ÀÉÎ"), "àéî");
        assert_eq!(py_lower("\u{212a}"), "k");
    }
}
