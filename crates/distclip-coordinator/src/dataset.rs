//! The epoch's sample count from the shards' folders, when they carry a `sizes.json` (shard
//! file name → samples, as OpenCLIP's and img2dataset's layout has it).
//!
//! The shard list itself comes from the caller (the CLI expands the spec with
//! `distclip_data::ShardList`), so the coordinator does not link the input pipeline and its
//! object-store clients.

use crate::ledger::ShardInfo;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn local_path(url: &str) -> Option<PathBuf> {
    match url.split_once("://") {
        None => Some(PathBuf::from(url)),
        Some(("file", rest)) => Some(PathBuf::from(rest)),
        Some(_) => None,
    }
}

/// Samples in one pass over `shards`, summed from the `sizes.json` of each local shard's
/// folder. None if any shard is remote or missing from its folder's `sizes.json`.
pub fn samples_from_sizes(shards: &[ShardInfo]) -> Option<u64> {
    let mut folders: BTreeMap<PathBuf, Option<BTreeMap<String, u64>>> = BTreeMap::new();
    let mut total = 0u64;
    for s in shards {
        let path = local_path(&s.url)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let name = path.file_name()?.to_string_lossy().into_owned();
        let sizes = folders.entry(dir.clone()).or_insert_with(|| {
            let text = std::fs::read_to_string(dir.join("sizes.json")).ok()?;
            serde_json::from_str(&text).ok()
        });
        total += *sizes.as_ref()?.get(&name)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(urls: &[String]) -> Vec<ShardInfo> {
        urls.iter()
            .map(|u| ShardInfo {
                url: u.clone(),
                weight: 1.0,
            })
            .collect()
    }

    #[test]
    fn sizes_json_sums_local_shards() {
        let dir = std::env::temp_dir().join(format!("distclip-coord-sizes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("sizes.json"),
            r#"{"0.tar": 5, "1.tar": 7, "2.tar": 1}"#,
        )
        .unwrap();
        let url = |i: u32| format!("{}/{i}.tar", dir.display());
        assert_eq!(samples_from_sizes(&shards(&[url(0), url(1)])), Some(12));
        assert_eq!(
            samples_from_sizes(&shards(&[format!("file://{}", url(2))])),
            Some(1)
        );
        assert_eq!(
            samples_from_sizes(&shards(&[url(0), url(3)])),
            None,
            "3.tar is not listed"
        );
        assert_eq!(
            samples_from_sizes(&shards(&["s3://b/0.tar".to_string()])),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
