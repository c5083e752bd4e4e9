#!/usr/bin/env python3
"""Generate crates/distclip-tokenizer/src/tables.rs from the Python reference stack.

OpenCLIP's tokenizer cleans text with ftfy, Python's `html`, `str.split`, `str.lower`
and splits it with the third-party `regex` module. To give exactly its ids, the Rust
crate uses tables dumped from those very libraries instead of Rust's own Unicode data
(which is a newer Unicode version than Python 3.11's 14.0). Run this with the same
Python environment that makes the fixtures:

    python tools/parity/tokenizer/gen_tables.py

It overwrites crates/distclip-tokenizer/src/tables.rs (checked in; do not edit by hand).
"""

from __future__ import annotations

import html
import html.entities
import os
import re
import sys
import unicodedata

import ftfy
import ftfy.badness
import ftfy.chardata
import ftfy.fixes
import regex

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
OUT = os.path.join(ROOT, "crates", "distclip-tokenizer", "src", "tables.rs")

ALL = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


def ranges(cps):
    """Collapse sorted code points into inclusive ranges."""
    out = []
    for c in sorted(cps):
        if out and out[-1][1] + 1 == c:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def rust_ranges(name, cps, doc):
    rs = ranges(cps)
    body = ",".join(f"(0x{a:X},0x{b:X})" for a, b in rs)
    return f"/// {doc}\npub(crate) static {name}: &[(u32, u32)] = &[{body}];\n"


def rust_str(s):
    out = []
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\u{{{o:X}}}")
    return '"' + "".join(out) + '"'


# ---------------------------------------------------------------- sre -> Rust regex

def class_item(op, av, negate_ok=True):
    from re._constants import CATEGORY_DIGIT, CATEGORY_SPACE, CATEGORY_WORD, LITERAL, RANGE, CATEGORY

    if op is LITERAL:
        return f"\\x{{{av:X}}}"
    if op is RANGE:
        return f"\\x{{{av[0]:X}}}-\\x{{{av[1]:X}}}"
    raise ValueError(f"unsupported class item {op} {av}")


def py_class(pred):
    """A Rust class body listing exactly the code points where Python's predicate holds."""
    return "".join(
        f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}"
        for a, b in ranges(c for c in ALL if pred(chr(c)))
    )


PY_RE_SPACE = None
PY_RE_WORD = None


def to_rust(sub) -> str:
    """Serialise a parsed Python `re` pattern into Rust `regex` syntax.

    Everything is written as explicit code points so Rust's verbose-mode and
    escaping rules can't change the meaning, and Python's `\\s`/`\\w` are replaced
    by the exact sets Python's `re` uses.
    """
    from re import _constants as C

    global PY_RE_SPACE, PY_RE_WORD
    out = []
    for op, av in sub:
        if op is C.LITERAL:
            out.append(f"\\x{{{av:X}}}")
        elif op is C.ANY:
            out.append("[^\\n]")
        elif op is C.IN:
            items = []
            neg = False
            for iop, iav in av:
                if iop is C.NEGATE:
                    neg = True
                elif iop is C.CATEGORY:
                    if iav in (C.CATEGORY_SPACE, C.CATEGORY_UNI_SPACE):
                        if PY_RE_SPACE is None:
                            PY_RE_SPACE = py_class(lambda ch: re.match(r"\s", ch) is not None)
                        items.append(PY_RE_SPACE)
                    elif iav in (C.CATEGORY_WORD, C.CATEGORY_UNI_WORD):
                        if PY_RE_WORD is None:
                            PY_RE_WORD = py_class(lambda ch: re.match(r"\w", ch) is not None)
                        items.append(PY_RE_WORD)
                    else:
                        raise ValueError(iav)
                else:
                    items.append(class_item(iop, iav))
            out.append("[" + ("^" if neg else "") + "".join(items) + "]")
        elif op is C.BRANCH:
            out.append("(?:" + "|".join(to_rust(s) for s in av[1]) + ")")
        elif op is C.SUBPATTERN:
            out.append("(?:" + to_rust(av[3]) + ")")
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, s = av
            hi_s = "" if hi is C.MAXREPEAT else str(hi)
            q = f"{{{lo},{hi_s}}}"
            if op is C.MIN_REPEAT:
                q += "?"
            out.append("(?:" + to_rust(s) + ")" + q)
        elif op is C.AT:
            if av is C.AT_BEGINNING:
                out.append("^")
            elif av is C.AT_END:
                out.append("(?:\\n?$)")
            else:
                raise ValueError(av)
        else:
            raise ValueError(f"unsupported op {op}")
    return "".join(out)


def main():
    parts = []
    ver = (
        f"Python {sys.version.split()[0]} (Unicode {unicodedata.unidata_version}), "
        f"regex {regex.__version__}, ftfy {ftfy.__version__}"
    )
    parts.append(
        "// @generated by tools/parity/tokenizer/gen_tables.py -- do not edit by hand.\n"
        f"// Source: {ver}.\n"
        "#![allow(clippy::unreadable_literal)]\n\n"
        f"/// The reference stack these tables were dumped from.\npub(crate) const SOURCE: &str = {rust_str(ver)};\n\n"
    )

    # ---- OpenCLIP pre-tokenizer classes, as the `regex` module sees them under IGNORECASE.
    flags = regex.IGNORECASE
    cl = regex.compile(r"[\p{L}]", flags)
    cn = regex.compile(r"[\p{N}]", flags)
    co = regex.compile(r"[^\s\p{L}\p{N}]", flags)
    l_set, n_set, o_set = [], [], []
    for c in ALL:
        ch = chr(c)
        if cl.fullmatch(ch):
            l_set.append(c)
        if cn.fullmatch(ch):
            n_set.append(c)
        if co.fullmatch(ch):
            o_set.append(c)
    parts.append(rust_ranges("PRE_LETTER", l_set, "Code points matching `[\\p{L}]` (regex module, IGNORECASE)."))
    parts.append(rust_ranges("PRE_NUMBER", n_set, "Code points matching `[\\p{N}]` (regex module, IGNORECASE)."))
    parts.append(rust_ranges("PRE_OTHER", o_set, "Code points matching `[^\\s\\p{L}\\p{N}]` (regex module, IGNORECASE)."))

    # Characters that match each literal character of the special tokens and contractions.
    lits = sorted(set("<start_of_text><end_of_text>'strevmld"))
    folds = []
    for x in lits:
        p = regex.compile(regex.escape(x), flags)
        for c in ALL:
            if c != ord(x) and p.fullmatch(chr(c)):
                folds.append((ord(x), c))
    body = ",".join(f"(0x{a:X},0x{b:X})" for a, b in folds)
    parts.append(
        "/// (literal, other) pairs: `other` matches `literal` in the pre-tokenizer under IGNORECASE.\n"
        f"pub(crate) static LITERAL_FOLDS: &[(u32, u32)] = &[{body}];\n"
    )

    # ---- Python str methods.
    parts.append(rust_ranges("PY_SPACE", [c for c in ALL if chr(c).isspace()], "Python `str.isspace()` (used by split/strip)."))
    low = []
    for c in ALL:
        ch = chr(c)
        if c == 0x3A3:
            continue  # Sigma is context dependent, handled in code.
        lo = ch.lower()
        if lo != ch:
            assert len(lo) <= 2, (hex(c), lo)
            low.append((c, ord(lo[0]), ord(lo[1]) if len(lo) > 1 else 0))
    body = ",".join(f"(0x{a:X},0x{b:X},0x{d:X})" for a, b, d in low)
    parts.append(
        "/// Python `str.lower()` per code point, where it changes: (cp, first, second or 0).\n"
        f"pub(crate) static PY_LOWER: &[(u32, u32, u32)] = &[{body}];\n"
    )
    # Final-sigma context classes, recovered from lower()'s behaviour (see gen docs).
    ign, cased = [], []
    for c in ALL:
        ch = chr(c)
        p1 = (ch + "\u03a3").lower()[-1] == "\u03c2"
        p2 = ("A" + ch + "\u03a3").lower()[-1] == "\u03c2"
        p3 = ("A\u03a3" + ch).lower()[1] == "\u03c2"
        if (not p1) and p2 and p3:
            ign.append(c)
        elif p1:
            cased.append(c)
    parts.append(rust_ranges("SIGMA_IGNORABLE", ign, "Case-ignorable code points (Python's final-sigma rule)."))
    parts.append(rust_ranges("SIGMA_CASED", cased, "Cased, not case-ignorable code points (Python's final-sigma rule)."))

    # Characters Python's unicodedata knows; NFC treats every other one as an inert starter.
    parts.append(rust_ranges("PY_ASSIGNED", [c for c in ALL if unicodedata.category(chr(c)) != "Cn"], "Code points assigned in Python's Unicode version (category other than Cn)."))

    # ---- html.unescape.
    h5 = sorted(html.entities.html5.items())
    body = ",".join(f"({rust_str(k)},{rust_str(v)})" for k, v in h5)
    parts.append(
        "/// `html.entities.html5`, sorted by name (names include the `;` where present).\n"
        f"pub(crate) static HTML5: &[(&str, &str)] = &[{body}];\n"
    )
    from html import _invalid_charrefs, _invalid_codepoints  # type: ignore[attr-defined]

    body = ",".join(f"(0x{k:X},{rust_str(v)})" for k, v in sorted(_invalid_charrefs.items()))
    parts.append(
        "/// `html._invalid_charrefs`: numeric references replaced by a fixed string.\n"
        f"pub(crate) static HTML_INVALID_CHARREFS: &[(u32, &str)] = &[{body}];\n"
    )
    body = ",".join(f"0x{k:X}" for k in sorted(_invalid_codepoints))
    parts.append(
        "/// `html._invalid_codepoints`: numeric references that decode to nothing.\n"
        f"pub(crate) static HTML_INVALID_CODEPOINTS: &[u32] = &[{body}];\n"
    )

    # ---- ftfy.
    ents = ftfy.chardata.HTML_ENTITIES
    extra = sorted((k, v) for k, v in ents.items() if not (k[1:] in html.entities.html5 and html.entities.html5[k[1:]] == v))
    # Every other entry is exactly "&" + an html5 name ending in ";".
    assert all(("&" + n) in ents for n in html.entities.html5 if n.endswith(";"))
    assert len(ents) == len(extra) + sum(1 for n in html.entities.html5 if n.endswith(";"))
    body = ",".join(f"({rust_str(k)},{rust_str(v)})" for k, v in extra)
    parts.append(
        "/// ftfy's all-caps entities (e.g. `&EACUTE;`), sorted; the rest of its table is html5's `;` names.\n"
        f"pub(crate) static FTFY_UPPER_ENTITIES: &[(&str, &str)] = &[{body}];\n"
    )

    encs = ftfy.chardata.CHARMAP_ENCODINGS
    tabs = []
    for enc in encs:
        dec = bytes(range(256)).decode(enc)
        assert len(dec) == 256
        # possible_encoding() allows \x00-\x19\x1b-\x7f everywhere: check they are identity.
        for b in list(range(0x1A)) + list(range(0x1B, 0x80)):
            assert ord(dec[b]) == b, (enc, b)
        # and that the encoder is the exact inverse of the decoder.
        for b in range(256):
            assert dec[b].encode(enc) == bytes([b]), (enc, b)
        tabs.append("[" + ",".join(f"0x{ord(ch):X}" for ch in dec) + "]")
    parts.append(
        "/// Names of ftfy's CHARMAP_ENCODINGS, in the order it tries them.\n"
        "pub(crate) static CHARMAP_NAMES: &[&str] = &[" + ",".join(rust_str(e) for e in encs) + "];\n"
    )
    parts.append(
        "/// Byte -> code point for each of CHARMAP_NAMES (sloppy codecs map 0x1A to U+FFFD).\n"
        f"pub(crate) static CHARMAPS: [[u32; 256]; {len(encs)}] = [" + ",".join(tabs) + "];\n"
    )
    cp1252 = []
    for b in range(256):
        try:
            cp1252.append(ord(bytes([b]).decode("windows-1252")))
        except UnicodeDecodeError:
            cp1252.append(0xFFFFFFFF)
    parts.append(
        "/// Strict Python `windows-1252` decoding (u32::MAX = undefined byte).\n"
        "pub(crate) static WINDOWS_1252: [u32; 256] = [" + ",".join(f"0x{x:X}" for x in cp1252) + "];\n"
    )

    for key in ["utf8_first_of_2", "utf8_first_of_3", "utf8_first_of_4", "utf8_continuation", "utf8_continuation_strict"]:
        p = re.compile("[" + ftfy.chardata.UTF8_CLUES[key] + "]")
        cps = [c for c in ALL if p.fullmatch(chr(c))]
        parts.append(rust_ranges(key.upper(), cps, f"ftfy UTF8_CLUES['{key}']."))

    bad = re._parser.parse(ftfy.badness.BADNESS_RE.pattern, re.VERBOSE)
    parts.append(
        "/// ftfy's BADNESS_RE translated to Rust regex syntax (Python's \\s and \\w spelled out).\n"
        f"pub(crate) const BADNESS_RE: &str = {rust_str(to_rust(bad))};\n"
    )
    # Keep the other regexes simple enough to port by hand, but verify their text.
    assert ftfy.chardata.ALTERED_UTF8_RE.pattern == (
        b"[\xc2\xc3\xc5\xce\xd0\xd9][ ]"
        b"|[\xe2\xe3][ ][\x80-\x84\x86-\x9f\xa1-\xbf]"
        b"|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf][ ]"
        b"|[\xf0][ ][\x80-\xbf][\x80-\xbf]"
        b"|[\xf0][\x80-\xbf][ ][\x80-\xbf]"
        b"|[\xf0][\x80-\xbf][\x80-\xbf][ ]"
    )
    assert ftfy.chardata.LOSSY_UTF8_RE.pattern == (
        b"[\xc2-\xdf][\x1a]"
        b"|[\xc2-\xc3][?]"
        b"|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]"
        b"|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]"
        b"|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]"
        b"|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]"
        b"|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]"
        b"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]"
        b"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]"
        b"|\x1a"
    )
    assert ftfy.fixes.A_GRAVE_WORD_RE.pattern == b"\xc3 (?! |quele|quela|quilo|s )"
    assert ftfy.chardata.SINGLE_QUOTE_RE.pattern == "[\u02bc\u2018-\u201b]"
    assert ftfy.chardata.DOUBLE_QUOTE_RE.pattern == "[\u201c-\u201f]"
    assert ftfy.chardata.C1_CONTROL_RE.pattern == r"[\x80-\x9f]"
    assert ftfy.chardata.HTML_ENTITY_RE.pattern == r"&#?[0-9A-Za-z]{1,24};"

    wm = sorted(ftfy.chardata.WIDTH_MAP.items())
    body = ",".join(f"(0x{k:X},{rust_str(v)})" for k, v in wm)
    parts.append(
        "/// ftfy WIDTH_MAP: fullwidth/halfwidth forms -> NFKC, plus U+3000 -> space.\n"
        f"pub(crate) static WIDTH_MAP: &[(u32, &str)] = &[{body}];\n"
    )
    lig = sorted(ftfy.chardata.LIGATURES.items())
    body = ",".join(f"(0x{k:X},{rust_str(v)})" for k, v in lig)
    parts.append(f"/// ftfy LIGATURES.\npub(crate) static LIGATURES: &[(u32, &str)] = &[{body}];\n")
    cc = sorted(ftfy.chardata.CONTROL_CHARS)
    parts.append(rust_ranges("PY_DIGIT", [c for c in ALL if re.match(r"\d", chr(c))], "Python `re` `\\d` (Unicode decimal digits), for ftfy's ANSI_RE."))
    assert ftfy.fixes.ANSI_RE.pattern == "\033\\[((?:\\d|;)*)([a-zA-Z])"
    parts.append(rust_ranges("CONTROL_CHARS", cc, "ftfy CONTROL_CHARS (removed by remove_control_chars)."))

    with open(OUT, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes) from {ver}")


if __name__ == "__main__":
    main()
