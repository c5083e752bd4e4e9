//! Where a sample's caption is (`data.caption_key`), read the same way by training, `distclip
//! data` and evaluation: a member of the sample (`txt`, as OpenCLIP's `text="txt"`, or any
//! other extension such as `caption`), or a string field of its `json` member (`json:FIELD`).
//! A gzip-compressed member is read decompressed, as python webdataset's decoder reads any
//! `.gz` member: `txt.gz` when the key names it, and also when the key names `txt` (or
//! `json`) and the sample holds only the compressed form.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::str::FromStr;

use crate::samples::{RawSample, Skip, SkipReason, skip};

/// A caption's place in a sample, parsed from `data.caption_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionKey {
    /// The whole member with this extension, as UTF-8 text (`txt`).
    Member(String),
    /// This string field of the `json` member (`json:FIELD`).
    JsonField(String),
}

impl Default for CaptionKey {
    fn default() -> Self {
        CaptionKey::Member("txt".into())
    }
}

impl FromStr for CaptionKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(field) = s.strip_prefix("json:") {
            if field.is_empty() {
                return Err("`json:` needs a field name, e.g. `json:caption`".into());
            }
            return Ok(CaptionKey::JsonField(field.to_owned()));
        }
        if s.is_empty() || s.contains(['/', '\\']) || s.starts_with('.') {
            return Err(format!(
                "{s:?} is not a member extension: give `txt`, another extension such as `caption`, or `json:FIELD`"
            ));
        }
        Ok(CaptionKey::Member(s.to_owned()))
    }
}

impl fmt::Display for CaptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptionKey::Member(m) => f.write_str(m),
            CaptionKey::JsonField(field) => write!(f, "json:{field}"),
        }
    }
}

impl CaptionKey {
    /// The member the caption is read from.
    pub fn member(&self) -> &str {
        match self {
            CaptionKey::Member(m) => m,
            CaptionKey::JsonField(_) => "json",
        }
    }

    /// The caption in `raw`, or why it has none usable: missing member or field, not UTF-8,
    /// malformed JSON or gzip, a field that is not a string. The text is kept as stored (the
    /// tokenizer cleans whitespace, as OpenCLIP's does).
    pub fn caption(&self, raw: &RawSample) -> Result<String, Skip> {
        let (ext, bytes) = self
            .find(raw)
            .ok_or_else(|| skip(SkipReason::MissingCaption, format!("no `{}` member", self.member())))?;
        self.text_of(ext, bytes)
    }

    /// The member holding the caption, as `(extension, bytes)`: [`CaptionKey::member`], or its
    /// gzip-compressed form (`txt.gz`) when only that is present.
    pub fn find<'a>(&self, raw: &'a RawSample) -> Option<(&'a str, &'a [u8])> {
        let named = self.member();
        let gz = format!("{named}.gz");
        raw.members
            .iter()
            .find(|(e, _)| e == named)
            .or_else(|| raw.members.iter().find(|(e, _)| *e == gz))
            .map(|(e, d)| (e.as_str(), d.as_slice()))
    }

    /// The caption held in the bytes of the member with extension `ext`, decompressed first
    /// when `ext` ends in `.gz`.
    pub fn text_of(&self, ext: &str, bytes: &[u8]) -> Result<String, Skip> {
        let bytes: Cow<[u8]> = if ext.ends_with(".gz") {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(bytes)
                .read_to_end(&mut out)
                .map_err(|e| skip(SkipReason::BadCaptionGzip, format!("{ext}: {e}")))?;
            Cow::Owned(out)
        } else {
            Cow::Borrowed(bytes)
        };
        self.text(&bytes)
    }

    /// The caption held in the (uncompressed) bytes of [`CaptionKey::member`].
    pub fn text(&self, bytes: &[u8]) -> Result<String, Skip> {
        let text = std::str::from_utf8(bytes).map_err(|e| skip(SkipReason::CaptionNotUtf8, e.to_string()))?;
        let CaptionKey::JsonField(key) = self else { return Ok(text.to_owned()) };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| skip(SkipReason::BadCaptionJson, e.to_string()))?;
        match value.get(key) {
            None | Some(serde_json::Value::Null) => {
                Err(skip(SkipReason::MissingCaption, format!("json has no field {key:?}")))
            }
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(skip(SkipReason::BadCaptionJson, format!("json field {key:?} is not a string: {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_print_as_written() {
        for s in ["txt", "caption", "json:caption"] {
            assert_eq!(s.parse::<CaptionKey>().unwrap().to_string(), s);
        }
        assert_eq!("json:alt".parse::<CaptionKey>().unwrap(), CaptionKey::JsonField("alt".into()));
        assert_eq!("caption".parse::<CaptionKey>().unwrap().member(), "caption");
        for bad in ["", "json:", "a/b", ".txt"] {
            assert!(bad.parse::<CaptionKey>().is_err(), "{bad:?}");
        }
    }

    fn sample(members: &[(&str, Vec<u8>)]) -> RawSample {
        RawSample {
            key: "k".into(),
            members: members.iter().map(|(e, d)| ((*e).to_owned(), d.clone())).collect(),
            pos: crate::samples::SamplePos { shard: 0, index: 0 },
            cut: None,
            draw: 0,
        }
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_members_are_read_decompressed() {
        let txt = CaptionKey::default();
        let json: CaptionKey = "json:caption".parse().unwrap();
        let s = sample(&[("txt.gz", gz(b"a cat")), ("json.gz", gz(br#"{"caption": "a dog"}"#))]);
        assert_eq!(txt.caption(&s).unwrap(), "a cat");
        assert_eq!(json.caption(&s).unwrap(), "a dog");
        // The plain member wins when both are there; a key may name the compressed one.
        let both = sample(&[("txt", b"plain".to_vec()), ("txt.gz", gz(b"packed"))]);
        assert_eq!(txt.caption(&both).unwrap(), "plain");
        assert_eq!("txt.gz".parse::<CaptionKey>().unwrap().caption(&both).unwrap(), "packed");
        // Bytes that are not gzip are a counted skip, not an error of the loader.
        let bad = sample(&[("txt.gz", b"not gzip".to_vec())]);
        assert_eq!(txt.caption(&bad).unwrap_err().reason, SkipReason::BadCaptionGzip);
        assert_eq!(txt.caption(&sample(&[])).unwrap_err().reason, SkipReason::MissingCaption);
    }
}
