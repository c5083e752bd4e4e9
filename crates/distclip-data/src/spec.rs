//! Dataset specs: the text a user writes (`/data/{00000..41455}.tar::s3://b/laion/{000..999}.tar@2`)
//! expanded into a flat list of shards with per-shard sampling weights.
//!
//! Grammar (documented in the crate docs and `distclip data --help`):
//!
//! ```text
//! spec    = source ("::" source)*
//! source  = pattern ["@" weight]
//! pattern = a URL or path with bash-style braces: {a,b}, {0..9}, {00000..41455} (zero padded)
//!         | a local text file ending in ".txt": one pattern per line, '#' comments, blank lines
//!           ignored, relative paths resolved against the file's folder
//! weight  = a positive number; every shard of the source gets it (OpenCLIP's
//!           --train-data-upsampling-factors semantics: weights are per shard)
//! ```
//!
//! URLs: plain paths and `file://` (local), `s3://bucket/key`, `gs://bucket/key`,
//! `az://container/key` (also `azure://`, `abfs://`), `http://` and `https://`, and `memory:///key`
//! for stores injected in tests. Brace expansion uses the `webdataset` crate's port of Python's
//! `braceexpand`, so patterns expand exactly as OpenCLIP's do.

use std::path::{Path, PathBuf};

/// A malformed dataset spec. Every variant names the offending part.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// The spec (or one `::`-separated source) is empty.
    #[error("empty source in dataset spec {spec:?}: remove the stray '::' or give a path")]
    EmptySource {
        /// The whole spec.
        spec: String,
    },
    /// Braces that do not balance or a range that does not parse.
    #[error("bad brace pattern {pattern:?}: {message}")]
    Braces {
        /// The source pattern.
        pattern: String,
        /// What the expander said.
        message: String,
    },
    /// An `@weight` suffix that is not a positive finite number.
    #[error(
        "bad weight {weight:?} in source {source_text:?}: expected a positive number, as in 'path/{{0..9}}.tar@2.0'"
    )]
    Weight {
        /// The source text.
        source_text: String,
        /// The weight text.
        weight: String,
    },
    /// A URL scheme distclip cannot read.
    #[error(
        "unsupported URL scheme {scheme:?} in {url:?}: use a local path, file://, s3://, gs://, az://, http(s):// or memory://"
    )]
    Scheme {
        /// The scheme before `://`.
        scheme: String,
        /// The whole URL.
        url: String,
    },
    /// An object-store URL without a bucket or key.
    #[error("URL {url:?} has no {missing}: expected SCHEME://BUCKET/KEY")]
    Incomplete {
        /// The URL.
        url: String,
        /// "bucket" or "key".
        missing: &'static str,
    },
    /// A shard-list file that cannot be read.
    #[error("cannot read shard list {path:?}: {message}")]
    ListFile {
        /// The list file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// The number of `--upsampling-factors` does not match the number of sources.
    #[error(
        "{weights} upsampling factors for {sources} sources in {spec:?}: give one per '::'-separated source"
    )]
    WeightCount {
        /// The spec.
        spec: String,
        /// Number of sources.
        sources: usize,
        /// Number of factors.
        weights: usize,
    },
    /// The spec expands to no shards.
    #[error("dataset spec {spec:?} names no shards")]
    NoShards {
        /// The spec.
        spec: String,
    },
}

/// Where a shard lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A local file.
    Local(PathBuf),
    /// An object in a store: `scheme` is `s3`, `gs`, `az`, `http`, `https` or `memory`; `bucket` is
    /// the bucket/container (or `host[:port]` for HTTP, empty for memory); `key` the object path.
    Object {
        /// URL scheme, normalised (`azure`/`abfs` become `az`).
        scheme: String,
        /// Bucket, container, or HTTP authority.
        bucket: String,
        /// Object key, without a leading slash.
        key: String,
    },
}

impl Location {
    /// Classify one expanded URL or path.
    pub fn parse(url: &str) -> Result<Location, SpecError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(url)));
        };
        let scheme_lc = scheme.to_ascii_lowercase();
        let scheme_norm = match scheme_lc.as_str() {
            "file" => return Ok(Location::Local(PathBuf::from(rest))),
            "s3" | "s3a" => "s3",
            "gs" | "gcs" => "gs",
            "az" | "azure" | "abfs" | "abfss" => "az",
            "http" | "https" | "memory" => scheme_lc.as_str(),
            _ => {
                return Err(SpecError::Scheme {
                    scheme: scheme.to_string(),
                    url: url.to_string(),
                });
            }
        }
        .to_string();
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let key = key.trim_start_matches('/');
        if bucket.is_empty() && scheme_norm != "memory" {
            return Err(SpecError::Incomplete {
                url: url.to_string(),
                missing: "bucket",
            });
        }
        if key.is_empty() {
            return Err(SpecError::Incomplete {
                url: url.to_string(),
                missing: "key",
            });
        }
        Ok(Location::Object {
            scheme: scheme_norm,
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

/// One shard of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    /// The URL or path as expanded from the spec.
    pub url: String,
    /// Which `::`-separated source it came from (0-based).
    pub source: usize,
    /// Sampling weight (1.0 unless the source has `@weight`).
    pub weight: f64,
}

/// The expanded list of shards. A shard's index in [`ShardList::shards`] is its identity in
/// sample positions.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardList {
    /// All shards in spec order.
    pub shards: Vec<Shard>,
    /// The source patterns, in order (without weights).
    pub sources: Vec<String>,
}

impl ShardList {
    /// Parse and expand a spec, reading shard-list files from the local disk.
    pub fn parse(spec: &str) -> Result<ShardList, SpecError> {
        Self::parse_with(spec, |p| std::fs::read_to_string(p))
    }

    /// Parse with OpenCLIP-style upsampling factors given separately (`"1::2.5"`, one per
    /// source), as `--train-data-upsampling-factors` does. Factors override `@weight` suffixes.
    pub fn parse_with_factors(spec: &str, factors: &str) -> Result<ShardList, SpecError> {
        let mut list = Self::parse(spec)?;
        let weights: Vec<&str> = factors.split("::").collect();
        if weights.len() != list.sources.len() {
            return Err(SpecError::WeightCount {
                spec: spec.to_string(),
                sources: list.sources.len(),
                weights: weights.len(),
            });
        }
        let parsed = weights
            .iter()
            .zip(&list.sources)
            .map(|(w, s)| parse_weight(w, s))
            .collect::<Result<Vec<_>, _>>()?;
        for shard in &mut list.shards {
            shard.weight = parsed[shard.source];
        }
        Ok(list)
    }

    /// Parse with a custom reader for shard-list files (for tests).
    pub fn parse_with(
        spec: &str,
        read_list: impl Fn(&Path) -> std::io::Result<String>,
    ) -> Result<ShardList, SpecError> {
        let mut shards = Vec::new();
        let mut sources = Vec::new();
        for (source_index, source) in spec.split("::").enumerate() {
            let source = source.trim();
            if source.is_empty() {
                return Err(SpecError::EmptySource {
                    spec: spec.to_string(),
                });
            }
            let (pattern, weight) = split_weight(source)?;
            sources.push(pattern.to_string());
            for url in expand_source(pattern, &read_list)? {
                Location::parse(&url)?;
                shards.push(Shard {
                    url,
                    source: source_index,
                    weight,
                });
            }
        }
        if shards.is_empty() {
            return Err(SpecError::NoShards {
                spec: spec.to_string(),
            });
        }
        Ok(ShardList { shards, sources })
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there are no shards (never true for a parsed spec).
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Whether every weight is 1 (weights matter only for resampled loading).
    pub fn is_unweighted(&self) -> bool {
        self.shards.iter().all(|s| s.weight == 1.0)
    }
}

/// Split a trailing `@weight`. A last `@` followed by text without a `/` is a weight and must
/// parse; an `@` inside a URL (`http://user@host/...`) is left alone.
fn split_weight(source: &str) -> Result<(&str, f64), SpecError> {
    match source.rsplit_once('@') {
        Some((pattern, weight)) if !weight.contains('/') && !weight.contains('}') => {
            Ok((pattern.trim(), parse_weight(weight, source)?))
        }
        _ => Ok((source, 1.0)),
    }
}

fn parse_weight(weight: &str, source: &str) -> Result<f64, SpecError> {
    match weight.trim().parse::<f64>() {
        Ok(w) if w.is_finite() && w > 0.0 => Ok(w),
        _ => Err(SpecError::Weight {
            source_text: source.to_string(),
            weight: weight.to_string(),
        }),
    }
}

fn braces(pattern: &str) -> Result<Vec<String>, SpecError> {
    webdataset::core::braceexpand(pattern).map_err(|e| SpecError::Braces {
        pattern: pattern.to_string(),
        message: e.to_string(),
    })
}

/// Expand one source: a shard-list file, or a brace pattern.
fn expand_source(
    pattern: &str,
    read_list: &impl Fn(&Path) -> std::io::Result<String>,
) -> Result<Vec<String>, SpecError> {
    let is_list = pattern.ends_with(".txt") && !pattern.contains('{');
    if !is_list {
        return braces(pattern);
    }
    let path = match Location::parse(pattern)? {
        Location::Local(p) => p,
        Location::Object { .. } => {
            return Err(SpecError::ListFile {
                path: pattern.to_string(),
                message: "shard-list files must be local; copy it next to the job".into(),
            });
        }
    };
    let text = read_list(&path).map_err(|e| SpecError::ListFile {
        path: pattern.to_string(),
        message: e.to_string(),
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        for url in braces(line)? {
            // Relative local entries are relative to the list, so a dataset folder can carry
            // its own list and be moved.
            let relative_local = !url.contains("://") && Path::new(&url).is_relative();
            out.push(if relative_local {
                base.join(&url).to_string_lossy().into_owned()
            } else {
                url
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &ShardList) -> Vec<&str> {
        list.shards.iter().map(|s| s.url.as_str()).collect()
    }

    #[test]
    fn zero_padded_ranges_expand_in_order() {
        let list = ShardList::parse("/data/{00000..41455}.tar").unwrap();
        assert_eq!(list.len(), 41456);
        assert_eq!(list.shards[0].url, "/data/00000.tar");
        assert_eq!(list.shards[41455].url, "/data/41455.tar");
        assert_eq!(list.shards[123].url, "/data/00123.tar");
        let list = ShardList::parse("s/{8..11}.tar").unwrap();
        assert_eq!(urls(&list), ["s/8.tar", "s/9.tar", "s/10.tar", "s/11.tar"]);
    }

    #[test]
    fn sources_joined_by_double_colon_with_weights() {
        let list = ShardList::parse("s3://b/laion/{000..001}.tar::gs://c/x/{a,b}.tar@2.5").unwrap();
        assert_eq!(
            urls(&list),
            [
                "s3://b/laion/000.tar",
                "s3://b/laion/001.tar",
                "gs://c/x/a.tar",
                "gs://c/x/b.tar"
            ]
        );
        assert_eq!(
            list.shards
                .iter()
                .map(|s| (s.source, s.weight))
                .collect::<Vec<_>>(),
            [(0, 1.0), (0, 1.0), (1, 2.5), (1, 2.5)]
        );
        assert_eq!(
            list.sources,
            ["s3://b/laion/{000..001}.tar", "gs://c/x/{a,b}.tar"]
        );
        assert!(!list.is_unweighted());
        let list = ShardList::parse_with_factors("a{0..1}.tar::b.tar", "1::3").unwrap();
        assert_eq!(
            list.shards.iter().map(|s| s.weight).collect::<Vec<_>>(),
            [1.0, 1.0, 3.0]
        );
    }

    #[test]
    fn at_sign_inside_a_url_is_not_a_weight() {
        let list = ShardList::parse("https://user@host:9000/d/{0..1}.tar").unwrap();
        assert_eq!(list.shards[1].url, "https://user@host:9000/d/1.tar");
        assert_eq!(list.shards[1].weight, 1.0);
    }

    #[test]
    fn locations_of_every_scheme() {
        assert_eq!(
            Location::parse("/d/0.tar").unwrap(),
            Location::Local("/d/0.tar".into())
        );
        assert_eq!(
            Location::parse("rel/0.tar").unwrap(),
            Location::Local("rel/0.tar".into())
        );
        assert_eq!(
            Location::parse("file:///d/0.tar").unwrap(),
            Location::Local("/d/0.tar".into())
        );
        let obj = |s: &str, b: &str, k: &str| Location::Object {
            scheme: s.into(),
            bucket: b.into(),
            key: k.into(),
        };
        assert_eq!(
            Location::parse("s3://bkt/a/b.tar").unwrap(),
            obj("s3", "bkt", "a/b.tar")
        );
        assert_eq!(
            Location::parse("gs://bkt/b.tar").unwrap(),
            obj("gs", "bkt", "b.tar")
        );
        assert_eq!(
            Location::parse("az://cont/b.tar").unwrap(),
            obj("az", "cont", "b.tar")
        );
        assert_eq!(
            Location::parse("azure://cont/b.tar").unwrap(),
            obj("az", "cont", "b.tar")
        );
        assert_eq!(
            Location::parse("https://h:8080/x/b.tar").unwrap(),
            obj("https", "h:8080", "x/b.tar")
        );
        assert_eq!(
            Location::parse("memory:///x/b.tar").unwrap(),
            obj("memory", "", "x/b.tar")
        );
    }

    #[test]
    fn malformed_specs_name_the_bad_part() {
        let err = ShardList::parse("a/{0..3.tar").unwrap_err();
        assert!(
            matches!(&err, SpecError::Braces { pattern, .. } if pattern == "a/{0..3.tar"),
            "{err}"
        );
        let err = ShardList::parse("a/{0..3}.tar@x2").unwrap_err();
        assert!(err.to_string().contains("\"x2\""), "{err}");
        let err = ShardList::parse("a/{0..3}.tar@-1").unwrap_err();
        assert!(matches!(err, SpecError::Weight { .. }));
        let err = ShardList::parse("a.tar::").unwrap_err();
        assert!(matches!(err, SpecError::EmptySource { .. }), "{err}");
        let err = ShardList::parse("ftp://h/a.tar").unwrap_err();
        assert!(err.to_string().contains("\"ftp\""), "{err}");
        let err = ShardList::parse("s3://bucket").unwrap_err();
        assert!(
            matches!(err, SpecError::Incomplete { missing: "key", .. }),
            "{err}"
        );
        let err = ShardList::parse("s3:///key.tar").unwrap_err();
        assert!(
            matches!(
                err,
                SpecError::Incomplete {
                    missing: "bucket",
                    ..
                }
            ),
            "{err}"
        );
        let err = ShardList::parse_with_factors("a.tar::b.tar", "1").unwrap_err();
        assert!(
            matches!(
                err,
                SpecError::WeightCount {
                    sources: 2,
                    weights: 1,
                    ..
                }
            ),
            "{err}"
        );
        let err = ShardList::parse("").unwrap_err();
        assert!(matches!(err, SpecError::EmptySource { .. }), "{err}");
    }

    #[test]
    fn shard_list_files_one_url_per_line() {
        let read = |p: &Path| -> std::io::Result<String> {
            assert_eq!(p, Path::new("/lists/shards.txt"));
            Ok("# laion part\nrel/{0..1}.tar\n\n/abs/x.tar\ns3://b/y.tar\n".into())
        };
        let list = ShardList::parse_with("/lists/shards.txt@3::z.tar", read).unwrap();
        assert_eq!(
            urls(&list),
            [
                "/lists/rel/0.tar",
                "/lists/rel/1.tar",
                "/abs/x.tar",
                "s3://b/y.tar",
                "z.tar"
            ]
        );
        assert_eq!(list.shards[3].weight, 3.0);
        let err = ShardList::parse("/nonexistent/list.txt").unwrap_err();
        assert!(
            matches!(&err, SpecError::ListFile { path, .. } if path == "/nonexistent/list.txt"),
            "{err}"
        );
    }
}
