//! Python's `html.unescape` (HTML5 rules, including legacy entities without `;`), which
//! OpenCLIP applies twice after ftfy.

use crate::tables;
use std::borrow::Cow;

/// Look up an `html.entities.html5` name (including its `;` if any).
pub(crate) fn html5_entity(name: &str) -> Option<&'static str> {
    tables::HTML5
        .binary_search_by(|(k, _)| k.cmp(&name))
        .ok()
        .map(|i| tables::HTML5[i].1)
}

/// Python `int(digits, radix)` clamped: anything above U+10FFFF behaves the same.
fn parse_clamped(digits: &str, radix: u32) -> u32 {
    let mut n: u32 = 0;
    for d in digits.chars() {
        let v = d.to_digit(radix).unwrap_or(0);
        n = n.saturating_mul(radix).saturating_add(v).min(0x0011_0000);
    }
    n
}

/// Python's `html._replace_charref` for a numeric reference value.
fn numeric_charref(num: u32, out: &mut String) {
    if let Ok(i) = tables::HTML_INVALID_CHARREFS.binary_search_by_key(&num, |e| e.0) {
        out.push_str(tables::HTML_INVALID_CHARREFS[i].1);
    } else if (0xD800..=0xDFFF).contains(&num) || num > 0x10FFFF {
        out.push('\u{FFFD}');
    } else if tables::HTML_INVALID_CODEPOINTS.binary_search(&num).is_ok() {
        // Python drops these code points entirely.
    } else {
        out.extend(char::from_u32(num));
    }
}

/// Try to match Python's `_charref` regex right after a `&` at `rest`; returns the length
/// of the match (without the `&`) and appends the replacement.
fn charref(rest: &str, out: &mut String) -> Option<usize> {
    let b = rest.as_bytes();
    if b.first() == Some(&b'#') {
        // `#[0-9]+;?` first, then `#[xX][0-9a-fA-F]+;?` (regex alternation order).
        let dec = b[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        let (start, len, radix) = if dec > 0 {
            (1, dec, 10)
        } else if matches!(b.get(1), Some(b'x' | b'X')) {
            let hex = b[2..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
            if hex == 0 {
                return None;
            }
            (2, hex, 16)
        } else {
            return None;
        };
        let mut end = start + len;
        if b.get(end) == Some(&b';') {
            end += 1;
        }
        numeric_charref(parse_clamped(&rest[start..start + len], radix), out);
        return Some(end);
    }
    // `[^\t\n\f <&#;]{1,32};?`
    let mut name_end = 0;
    let mut n = 0;
    for (i, c) in rest.char_indices() {
        if n == 32 || matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        n += 1;
        name_end = i + c.len_utf8();
    }
    if n == 0 {
        return None;
    }
    let end = if rest[name_end..].starts_with(';') {
        name_end + 1
    } else {
        name_end
    };
    let s = &rest[..end];
    if let Some(v) = html5_entity(s) {
        out.push_str(v);
        return Some(end);
    }
    // Longest prefix of at least two characters that is an entity (HTML5 parsing rule).
    let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
    for x in (2..bounds.len()).rev() {
        if let Some(v) = html5_entity(&s[..bounds[x]]) {
            out.push_str(v);
            out.push_str(&s[bounds[x]..]);
            return Some(end);
        }
    }
    out.push('&');
    out.push_str(s);
    Some(end)
}

/// Python `html.unescape`.
pub(crate) fn unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    while let Some(off) = s[pos..].find('&') {
        let amp = pos + off;
        out.push_str(&s[pos..amp]);
        match charref(&s[amp + 1..], &mut out) {
            Some(len) => pos = amp + 1 + len,
            None => {
                out.push('&');
                pos = amp + 1;
            }
        }
    }
    out.push_str(&s[pos..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn python_html_unescape_cases() {
        assert_eq!(unescape("a &amp; b"), "a & b");
        assert_eq!(unescape("&lt;b&gt;"), "<b>");
        assert_eq!(unescape("&#39;&#x27;&#X27"), "'''");
        assert_eq!(unescape("&nbsp;"), "\u{a0}");
        assert_eq!(unescape("&amp;amp;"), "&amp;");
        assert_eq!(unescape("&ampfoo &notit; &notin;"), "&foo ¬it; ∉");
        assert_eq!(
            unescape("&#128;&#0;&#x110000;&#xd800;&#1;"),
            "€\u{fffd}\u{fffd}\u{fffd}"
        );
        assert_eq!(unescape("&#;&#x;& &;"), "&#;&#x;& &;");
        assert_eq!(unescape("&bogus;"), "&bogus;");
        assert_eq!(unescape("&#99999999999999999999;"), "\u{fffd}");
    }
}
