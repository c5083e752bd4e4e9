//! A port of `ftfy.fix_text` (ftfy 6.3.1) with its default configuration, which OpenCLIP
//! runs on every caption. Each function names the ftfy function it mirrors; the character
//! tables come from ftfy itself via `tables.rs`.

use crate::pystr::in_ranges;
use crate::{html, tables};
use regex::Regex;
use regex::bytes::Regex as BytesRegex;
use std::sync::OnceLock;
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

/// ftfy's `max_decode_length`: segments are at most this many code points.
const MAX_DECODE_LENGTH: usize = 1_000_000;
/// Python loops `while text changes`; a cap keeps pathological inputs from spinning forever.
const MAX_PASSES: usize = 64;

struct Regexes {
    badness: Regex,
    altered_utf8: BytesRegex,
    lossy_utf8: BytesRegex,
}

fn regexes() -> &'static Regexes {
    static R: OnceLock<Regexes> = OnceLock::new();
    R.get_or_init(|| Regexes {
        badness: Regex::new(tables::BADNESS_RE).expect("generated BADNESS_RE compiles"),
        altered_utf8: BytesRegex::new(
            r"(?-u)[\xc2\xc3\xc5\xce\xd0\xd9][ ]|[\xe2\xe3][ ][\x80-\x84\x86-\x9f\xa1-\xbf]|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf][ ]|[\xf0][ ][\x80-\xbf][\x80-\xbf]|[\xf0][\x80-\xbf][ ][\x80-\xbf]|[\xf0][\x80-\xbf][\x80-\xbf][ ]",
        )
        .expect("ALTERED_UTF8_RE compiles"),
        lossy_utf8: BytesRegex::new(
            r"(?-u)[\xc2-\xdf][\x1a]|[\xc2-\xc3][?]|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]|\x1a",
        )
        .expect("LOSSY_UTF8_RE compiles"),
    })
}

/// Reverse maps (code point -> byte) of ftfy's single-byte encodings, sorted by code point.
fn encoders() -> &'static Vec<Vec<(u32, u8)>> {
    static E: OnceLock<Vec<Vec<(u32, u8)>>> = OnceLock::new();
    E.get_or_init(|| {
        tables::CHARMAPS
            .iter()
            .map(|table| {
                let mut v: Vec<(u32, u8)> = table
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| (c, b as u8))
                    .collect();
                v.sort_unstable();
                v
            })
            .collect()
    })
}

/// `text.encode(encoding)`, or None where a character isn't in that encoding
/// (this is also ftfy's `possible_encoding`).
fn encode_charmap(text: &str, enc: usize) -> Option<Vec<u8>> {
    let table = &encoders()[enc];
    text.chars()
        .map(|c| {
            table
                .binary_search_by_key(&(c as u32), |e| e.0)
                .ok()
                .map(|i| table[i].1)
        })
        .collect()
}

/// ftfy's `is_bad`: does the text contain a likely mojibake sequence?
pub(crate) fn is_bad(text: &str) -> bool {
    regexes().badness.is_match(text)
}

/// ftfy's `unescape_html`: only `;`-terminated entities, plus some all-caps names.
pub(crate) fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut pos = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'&' {
            i += 1;
            continue;
        }
        // HTML_ENTITY_RE = &#?[0-9A-Za-z]{1,24};
        let start = if b.get(i + 1) == Some(&b'#') {
            i + 2
        } else {
            i + 1
        };
        let run = b[start..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric())
            .count();
        if !(1..=24).contains(&run) || b.get(start + run) != Some(&b';') {
            i += 1;
            continue;
        }
        let end = start + run + 1;
        let ent = &text[i..end];
        out.push_str(&text[pos..i]);
        if let Some(v) = html::html5_entity(&ent[1..]) {
            out.push_str(v);
        } else if let Ok(k) = tables::FTFY_UPPER_ENTITIES.binary_search_by(|(n, _)| n.cmp(&ent)) {
            out.push_str(tables::FTFY_UPPER_ENTITIES[k].1);
        } else if ent.starts_with("&#") {
            let un = html::unescape(ent);
            // Only accept a decoding that consumed the whole reference, `;` included.
            out.push_str(if un.contains(';') { ent } else { &un });
        } else {
            out.push_str(ent);
        }
        pos = end;
        i = end;
    }
    out.push_str(&text[pos..]);
    out
}

/// ftfy's `remove_terminal_escapes`: drop `ESC [ (\d|;)* [a-zA-Z]`.
fn remove_terminal_escapes(text: &str) -> String {
    if !text.contains('\x1b') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(p) = rest.find('\x1b') {
        out.push_str(&rest[..p]);
        let after = &rest[p + 1..];
        let mut matched = None;
        if let Some(params) = after.strip_prefix('[') {
            // Python's `\d` is any Unicode decimal digit.
            let body_len: usize = params
                .chars()
                .take_while(|&c| c == ';' || in_ranges(tables::PY_DIGIT, c as u32))
                .map(char::len_utf8)
                .sum();
            if params[body_len..].starts_with(|c: char| c.is_ascii_alphabetic()) {
                matched = Some(1 + 1 + body_len + 1);
            }
        }
        match matched {
            Some(len) => rest = &rest[p + len..],
            None => {
                out.push('\x1b');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn map_chars(text: &str, f: impl Fn(char, &mut String) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !f(c, &mut out) {
            out.push(c);
        }
    }
    out
}

fn lookup_str(table: &'static [(u32, &'static str)], c: char) -> Option<&'static str> {
    table
        .binary_search_by_key(&(c as u32), |e| e.0)
        .ok()
        .map(|i| table[i].1)
}

/// ftfy's `fix_c1_controls`: C1 controls read as sloppy Windows-1252.
fn fix_c1_controls(text: &str) -> String {
    map_chars(text, |c, out| {
        if ('\u{80}'..='\u{9f}').contains(&c) {
            out.extend(char::from_u32(tables::CHARMAPS[SLOPPY_1252][c as usize]));
            true
        } else {
            false
        }
    })
}

fn has_c1(text: &str) -> bool {
    text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c))
}

const LATIN_1: usize = 0;
const SLOPPY_1252: usize = 1;
const MACROMAN: usize = 8;

/// ftfy's per-character fixers (ligatures, width, quotes, line breaks, control
/// characters) in the order fix_and_explain applies them; terminal escapes sit between
/// line breaks and control characters, and only the escape removal looks at context.
fn char_fixers(text: &str) -> String {
    let s = map_chars(text, |c, out| {
        if let Some(r) = lookup_str(tables::LIGATURES, c) {
            out.push_str(r);
            true
        } else {
            false
        }
    });
    let s = map_chars(&s, |c, out| {
        if let Some(r) = lookup_str(tables::WIDTH_MAP, c) {
            out.push_str(r);
            true
        } else {
            false
        }
    });
    // uncurl_quotes
    let s = map_chars(&s, |c, out| match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => {
            out.push('\'');
            true
        }
        '\u{201c}'..='\u{201f}' => {
            out.push('"');
            true
        }
        _ => false,
    });
    // fix_line_breaks
    let s = s.replace("\r\n", "\n");
    let s = map_chars(&s, |c, out| {
        if matches!(c, '\r' | '\u{2028}' | '\u{2029}' | '\u{85}') {
            out.push('\n');
            true
        } else {
            false
        }
    });
    // fix_surrogates: a Rust string never holds surrogates, so there is nothing to do.
    let s = remove_terminal_escapes(&s);
    // remove_control_chars
    s.chars()
        .filter(|&c| !in_ranges(tables::CONTROL_CHARS, c as u32))
        .collect()
}

/// Python's `utf-8` decoder, or ftfy's `utf-8-variants` (CESU-8 pairs, `C0 80` as NUL).
fn decode_utf8(bytes: &[u8], variants: bool) -> Option<String> {
    if !variants {
        return std::str::from_utf8(bytes).ok().map(str::to_owned);
    }
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0xC0 && bytes.get(i + 1) == Some(&0x80) {
            out.push('\0');
            i += 2;
            continue;
        }
        if b == 0xED
            && i + 6 <= bytes.len()
            && (0xA0..=0xAF).contains(&bytes[i + 1])
            && (0x80..=0xBF).contains(&bytes[i + 2])
            && bytes[i + 3] == 0xED
            && (0xB0..=0xBF).contains(&bytes[i + 4])
            && (0x80..=0xBF).contains(&bytes[i + 5])
        {
            let cp = (((bytes[i + 1] & 0x0F) as u32) << 16)
                + (((bytes[i + 2] & 0x3F) as u32) << 10)
                + (((bytes[i + 4] & 0x0F) as u32) << 6)
                + ((bytes[i + 5] & 0x3F) as u32)
                + 0x10000;
            out.push(char::from_u32(cp)?);
            i += 6;
            continue;
        }
        let len = match b {
            0x00..=0x7F => 1,
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return None,
        };
        let chunk = bytes.get(i..i + len)?;
        out.push_str(std::str::from_utf8(chunk).ok()?);
        i += len;
    }
    Some(out)
}

/// ftfy's `restore_byte_a0`: put back 0xA0 bytes that became spaces inside UTF-8 mojibake.
fn restore_byte_a0(bytes: &[u8]) -> Vec<u8> {
    // A_GRAVE_WORD_RE = b"\xc3 (?! |quele|quela|quilo|s )" -> b"\xc3\xa0 "
    let mut step = Vec::with_capacity(bytes.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0xC3 && bytes.get(i + 1) == Some(&b' ') {
            let rest = &bytes[i + 2..];
            let excluded = [&b" "[..], b"quele", b"quela", b"quilo", b"s "]
                .iter()
                .any(|p| rest.starts_with(p));
            if !excluded {
                step.extend_from_slice(b"\xc3\xa0 ");
                i += 2;
                continue;
            }
        }
        step.push(bytes[i]);
        i += 1;
    }
    regexes()
        .altered_utf8
        .replace_all(&step, |caps: &regex::bytes::Captures<'_>| {
            caps[0]
                .iter()
                .map(|&b| if b == b' ' { 0xA0 } else { b })
                .collect::<Vec<u8>>()
        })
        .into_owned()
}

/// ftfy's `_fix_encoding_one_step_and_explain` (default configuration).
fn fix_encoding_one_step(text: &str) -> String {
    if text.is_empty() || text.is_ascii() || !is_bad(text) {
        return text.to_owned();
    }
    let mut possible = [false; 16];
    for (enc, name) in tables::CHARMAP_NAMES.iter().enumerate() {
        let Some(mut bytes) = encode_charmap(text, enc) else {
            continue;
        };
        possible[enc] = true;
        if enc != MACROMAN && regexes().altered_utf8.is_match(&bytes) {
            bytes = restore_byte_a0(&bytes);
        }
        if name.starts_with("sloppy") {
            bytes = regexes()
                .lossy_utf8
                .replace_all(&bytes, &b"\xef\xbf\xbd"[..])
                .into_owned();
        }
        let variants = bytes.iter().any(|&b| b == 0xED || b == 0xC0);
        if let Some(fixed) = decode_utf8(&bytes, variants) {
            return fixed;
        }
    }
    if let Some(fixed) = decode_inconsistent_utf8(text) {
        return fixed;
    }
    // ftfy checks `"windows-1252" in possible_1byte_encodings`, which holds only the
    // name "sloppy-windows-1252", so that test is never true: Latin-1 text is re-read
    // as strict Windows-1252 whenever that succeeds.
    if possible[LATIN_1] {
        let bytes = encode_charmap(text, LATIN_1).unwrap_or_default();
        let decoded: Option<String> = bytes
            .iter()
            .map(|&b| char::from_u32(tables::WINDOWS_1252[b as usize]))
            .collect();
        if let Some(fixed) = decoded
            && fixed != text
        {
            return fixed;
        }
    }
    if has_c1(text) {
        return fix_c1_controls(text);
    }
    text.to_owned()
}

/// ftfy's `fix_encoding`.
pub(crate) fn fix_encoding(text: &str) -> String {
    let mut text = text.to_owned();
    for _ in 0..MAX_PASSES {
        let next = fix_encoding_one_step(&text);
        if next == text {
            break;
        }
        text = next;
    }
    text
}

/// ftfy's `decode_inconsistent_utf8`, run only where UTF8_DETECTOR_RE matches; None when
/// nothing changed.
fn decode_inconsistent_utf8(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let cls = |t: &[(u32, u32)], i: usize| chars.get(i).is_some_and(|&c| in_ranges(t, c as u32));
    // One repetition of the detector group at i: the first alternative that fits wins,
    // as in Python's backtracking (nothing follows the group, so it never backtracks).
    let unit = |i: usize| -> Option<usize> {
        let cont = |k: usize| (1..=k).all(|d| cls(tables::UTF8_CONTINUATION, i + d));
        if cls(tables::UTF8_FIRST_OF_2, i) && cont(1) {
            Some(2)
        } else if cls(tables::UTF8_FIRST_OF_3, i) && cont(2) {
            Some(3)
        } else if cls(tables::UTF8_FIRST_OF_4, i) && cont(3) {
            Some(4)
        } else {
            None
        }
    };
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut found = false;
    let mut i = 0;
    while i < chars.len() {
        // (?<! [utf8_continuation_strict])
        let lookbehind_ok = i == 0 || !cls(tables::UTF8_CONTINUATION_STRICT, i - 1);
        let mut end = i;
        if lookbehind_ok {
            while let Some(n) = unit(end) {
                end += n;
            }
        }
        if end == i {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        found = true;
        let sub: String = chars[i..end].iter().collect();
        if end - i < chars.len() && is_bad(&sub) {
            let fixed = fix_encoding(&sub);
            changed |= fixed != sub;
            out.push_str(&fixed);
        } else {
            out.push_str(&sub);
        }
        i = end;
    }
    (found && changed).then_some(out)
}

/// Python 3.11's `unicodedata.normalize("NFC")`. The normalization crate knows a newer
/// Unicode; to Python a code point it has no data for is an inert starter (combining class
/// 0, no decomposition, composes with nothing), so the text is normalized in pieces between
/// such code points, which pass through untouched. By Unicode's stability policy the pieces,
/// made only of characters Python knows, normalize identically under both versions.
pub(crate) fn nfc(text: &str) -> String {
    // Already NFC under the newer tables implies already NFC under Python's.
    if is_nfc_quick(text.chars()) == IsNormalized::Yes {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let cut = rest
            .char_indices()
            .find(|&(_, c)| !c.is_ascii() && !in_ranges(tables::PY_ASSIGNED, c as u32));
        let (piece, unknown) = match cut {
            Some((i, c)) => (&rest[..i], Some(c)),
            None => (rest, None),
        };
        out.extend(piece.nfc());
        match unknown {
            Some(c) => {
                out.push(c);
                rest = &rest[piece.len() + c.len_utf8()..];
            }
            None => rest = "",
        }
    }
    out
}

/// ftfy's `fix_and_explain` loop for one segment.
fn fix_segment(text: &str, unescape: bool) -> String {
    let mut text = text.to_owned();
    for _ in 0..MAX_PASSES {
        let orig = text.clone();
        if unescape && text.contains('&') {
            text = unescape_html(&text);
        }
        text = fix_encoding(&text);
        if has_c1(&text) {
            text = fix_c1_controls(&text);
        }
        text = char_fixers(&text);
        text = nfc(&text);
        if text == orig {
            break;
        }
    }
    text
}

/// Text that every ftfy fixer leaves unchanged: printable ASCII plus tab, LF and FF,
/// without `&` (entities).
fn trivially_clean(text: &str) -> bool {
    text.bytes()
        .all(|b| (0x20..0x7F).contains(&b) && b != b'&' || matches!(b, b'\t' | b'\n' | 0x0C))
}

/// `ftfy.fix_text(text)` with the default configuration.
pub(crate) fn fix_text(text: &str) -> String {
    if trivially_clean(text) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    // unescape_html="auto" turns off for good once a segment contains '<'.
    let mut unescape = true;
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.find('\n').map_or(rest.len(), |p| p + 1);
        if let Some((byte_pos, _)) = rest[..end].char_indices().nth(MAX_DECODE_LENGTH) {
            end = byte_pos;
        }
        let segment = &rest[..end];
        if unescape && segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mojibake() {
        assert_eq!(fix_text("sÃ³"), "só");
        assert_eq!(fix_text("voilÃ le travail"), "voilà le travail");
        assert_eq!(fix_text("âœ” No problems"), "✔ No problems");
        assert_eq!(fix_text("schÃ¶n"), "schön");
        assert_eq!(fix_text("&macr;\\_(ã\u{83}\u{84})_/&macr;"), "¯\\_(ツ)_/¯");
    }

    #[test]
    fn other_fixers() {
        assert_eq!(
            fix_text("Broken text&hellip; it&#x2019;s ﬂubberiﬁc!"),
            "Broken text… it's flubberific!"
        );
        assert_eq!(fix_text("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(fix_text("\u{1b}[36;44mblue\u{1b}[0m"), "blue");
        assert_eq!(fix_text("a\r\nb\rc\u{2028}"), "a\nb\nc\n");
        assert_eq!(fix_text("\u{201c}q\u{2019}s\u{201d}"), "\"q's\"");
        assert_eq!(fix_text("e\u{301}"), "é");
        assert_eq!(
            fix_text("P&EACUTE;REZ &lt;b&gt; &nTILDE;"),
            "PÉREZ <b> &nTILDE;"
        );
        // A '<' turns entity decoding off for this and all later segments.
        assert_eq!(fix_text("&amp;\n<b> &amp;\n&amp;"), "&\n<b> &amp;\n&amp;");
    }

    #[test]
    fn utf8_variants() {
        assert_eq!(decode_utf8(b"\xc0\x80x", true).as_deref(), Some("\0x"));
        assert_eq!(
            decode_utf8(b"\xed\xa0\xbd\xed\xb2\xa9", true).as_deref(),
            Some("💩")
        );
        assert_eq!(decode_utf8(b"\xed\xa0\xbd", true), None);
        assert_eq!(decode_utf8(b"\xed\x95\x9c", true).as_deref(), Some("한"));
    }
}
