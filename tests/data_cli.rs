//! End-to-end tests of the data commands of the `distclip` binary: `synth`, `shards write`,
//! `data stats` and `bench data`, on tiny datasets made in a temporary folder.

mod common;
use common::{err_text, ok_json};

use std::path::{Path, PathBuf};

use distclip_data::samples::{ShardEvent, ShardReader};
use distclip_data::writer::{TarWriter, encode_jpeg};
use serde_json::{Value, json};




/// A fresh temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("distclip-data-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self, rel: &str) -> String {
        self.0.join(rel).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A JPEG of `w x h` pixels.
fn jpeg(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let px: Vec<u8> = (0..w * h * 3).map(|i| (i as u8).wrapping_mul(seed)).collect();
    encode_jpeg(&px, w, h, 90).unwrap()
}

/// `(key, members)` of every sample of a shard file, members as extensions in order.
fn read_shard(path: &Path) -> Vec<(String, Vec<String>)> {
    let f = std::fs::File::open(path).unwrap();
    ShardReader::new(f, 0, 0)
        .map(|e| match e {
            ShardEvent::Sample(s) => (s.key, s.members.into_iter().map(|(e, _)| e).collect()),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn synth_then_data_stats_counts_every_sample() {
    let dir = TempDir::new("synth");
    let out = dir.path("ds");
    let summary = ok_json(&[
        "synth", "--out", &out, "--samples", "12", "--samples-per-shard", "5", "--image-size", "32",
        "--seed", "3", "--quiet",
    ]);
    assert_eq!((summary["samples"].as_u64(), summary["shards"].as_u64()), (Some(12), Some(3)));
    assert_eq!((summary["val_samples"].as_u64(), summary["val_shards"].as_u64()), (Some(1), Some(1)));
    let spec = summary["train_spec"].as_str().unwrap().to_string();
    assert_eq!(spec, format!("{out}/train/{{00000..00002}}.tar"));
    for f in ["train/00000.tar", "train/00002.tar", "train/sizes.json", "val/00000.tar", "classes.json", "zeroshot.json"] {
        assert!(dir.0.join("ds").join(f).is_file(), "{f} missing");
    }
    let sizes: Value = serde_json::from_str(&std::fs::read_to_string(dir.0.join("ds/train/sizes.json")).unwrap()).unwrap();
    assert_eq!(sizes, json!({"00000.tar": 5, "00001.tar": 5, "00002.tar": 2}));
    let stats = ok_json(&["data", "stats", &spec, "--image-size", "16", "--threads", "2"]);
    assert_eq!(stats["samples"], 12);
    assert_eq!(stats["shards"], 3);
    assert_eq!(stats["skipped"], json!({}));
    assert_eq!(stats["failed_shards"], json!([]));
    assert!(stats["samples_per_s"].as_f64().unwrap() > 0.0);
    // The same seed gives the same bytes.
    let again = dir.path("again");
    ok_json(&["synth", "--out", &again, "--samples", "12", "--samples-per-shard", "5", "--image-size", "32", "--seed", "3", "--quiet"]);
    assert_eq!(
        std::fs::read(dir.0.join("ds/train/00001.tar")).unwrap(),
        std::fs::read(dir.0.join("again/train/00001.tar")).unwrap()
    );

    // bench data: the train path and decoding alone over the same shards.
    let bench = ok_json(&["bench", "data", &spec, "--threads", "1", "--image-size", "32"]);
    assert_eq!((bench["bench"].as_str(), bench["samples"].as_u64()), (Some("data"), Some(12)));
    assert!(bench["samples_per_s"].as_f64().unwrap() > 0.0);
    let decode = ok_json(&["bench", "data", &spec, "--threads", "2", "--image-size", "32", "--decode-only"]);
    assert_eq!((decode["bench"].as_str(), decode["samples"].as_u64()), (Some("data-decode-only"), Some(12)));
    let capped = ok_json(&["bench", "data", &spec, "--threads", "1", "--max-samples", "4"]);
    assert_eq!(capped["samples"], 4, "{capped}");
}

#[test]
fn shards_write_from_an_image_folder_and_from_jsonl() {
    let dir = TempDir::new("write");
    let images = dir.0.join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    std::fs::write(images.join("a.jpg"), jpeg(40, 30, 3)).unwrap();
    std::fs::write(images.join("a.txt"), "a photo of a").unwrap();
    std::fs::write(images.join("sub/b.jpg"), jpeg(20, 20, 5)).unwrap();
    std::fs::write(images.join("sub/b.txt"), "a photo of b").unwrap();
    std::fs::write(images.join("c.jpg"), jpeg(20, 20, 7)).unwrap(); // no caption
    let out = dir.path("from-images");
    let summary = ok_json(&[
        "shards", "write", "--images", &images.display().to_string(), "--out", &out, "--samples-per-shard", "1",
        "--quiet",
    ]);
    assert_eq!(summary["samples"], 2);
    assert_eq!(summary["shards"], 2);
    assert_eq!(summary["skipped"], json!({"missing_caption": 1}));
    let members = read_shard(&dir.0.join("from-images/00000.tar"));
    assert_eq!(members.len(), 1);
    // Members in sorted order within a sample, as python webdataset's writer puts them.
    assert_eq!(members[0].1, ["jpg", "json", "txt"]);
    let stats = ok_json(&["data", "stats", summary["spec"].as_str().unwrap(), "--image-size", "16", "--threads", "1"]);
    assert_eq!((stats["samples"].as_u64(), stats["shards"].as_u64()), (Some(2), Some(2)));

    // JSON lines, image paths relative to the file, downscaled to 16 px on the long side.
    let jsonl = dir.0.join("images/list.jsonl");
    std::fs::write(
        &jsonl,
        "{\"image\": \"a.jpg\", \"caption\": \"first\"}\n{\"image\": \"sub/b.jpg\", \"caption\": \"second\"}\n",
    )
    .unwrap();
    let out = dir.path("from-jsonl");
    let summary = ok_json(&[
        "shards", "write", "--jsonl", &jsonl.display().to_string(), "--out", &out, "--resize-max", "16", "--quiet",
    ]);
    assert_eq!((summary["samples"].as_u64(), summary["shards"].as_u64()), (Some(2), Some(1)));
    let f = std::fs::File::open(dir.0.join("from-jsonl/00000.tar")).unwrap();
    let samples: Vec<_> = ShardReader::new(f, 0, 0)
        .filter_map(|e| match e {
            ShardEvent::Sample(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(samples.len(), 2);
    let meta: Value = serde_json::from_slice(samples[0].get("json").unwrap()).unwrap();
    assert_eq!((meta["width"].as_u64(), meta["height"].as_u64()), (Some(16), Some(12)));
    assert_eq!((meta["original_width"].as_u64(), meta["caption"].as_str()), (Some(40), Some("first")));
    assert_eq!(samples[1].get("txt"), Some(&b"second"[..]));
}

#[test]
fn a_malformed_spec_gives_exact_counts_by_reason_and_exit_0() {
    let dir = TempDir::new("bad");
    let good = jpeg(12, 10, 1);
    let mut corrupt = good.clone();
    for b in corrupt.iter_mut().skip(2).take(200) {
        *b = 0x11;
    }
    let mut w = TarWriter::new(Vec::new()).with_mtime(Some(0));
    w.write_sample("ok0", &[("jpg", &good), ("txt", b"fine")]).unwrap();
    w.write_sample("zero", &[("jpg", b""), ("txt", b"empty image")]).unwrap();
    w.write_sample("corrupt", &[("jpg", &corrupt), ("txt", b"x")]).unwrap();
    w.write_sample("nocap", &[("jpg", &good)]).unwrap();
    w.write_sample("utf", &[("jpg", &good), ("txt", b"caf\xe9")]).unwrap();
    w.write_sample("ok1", &[("png", &good), ("txt", b"fine")]).unwrap();
    std::fs::write(dir.0.join("0.tar"), w.finish().unwrap()).unwrap();
    std::fs::write(dir.0.join("1.tar"), b"definitely not a tar archive".repeat(30)).unwrap();
    // 2.tar does not exist.
    let spec = format!("{}/{{0..2}}.tar", dir.0.display());
    let stats = ok_json(&["data", "stats", &spec, "--image-size", "16", "--threads", "2", "--retries", "1"]);
    assert_eq!(stats["samples"], 2);
    assert_eq!(stats["shards"], 3);
    assert_eq!(
        stats["skipped"],
        json!({
            "zero_byte_member": 1,
            "image_decode_error": 1,
            "missing_caption": 1,
            "caption_not_utf8": 1,
            "not_a_tar": 1,
            "shard_open_failed": 1,
        })
    );
    let mut failed: Vec<(u64, String)> = stats["failed_shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["shard"].as_u64().unwrap(), f["reason"].as_str().unwrap().to_string()))
        .collect();
    failed.sort();
    assert_eq!(failed, [(1, "not_a_tar".to_string()), (2, "shard_open_failed".to_string())]);
}

#[test]
fn bad_flags_and_inputs_give_clear_errors() {
    let dir = TempDir::new("flags");
    let out = dir.path("o");
    let e = err_text(&["shards", "write", "--out", &out]);
    assert!(e.contains("--images") && e.contains("--jsonl"), "{e}");
    let e = err_text(&["shards", "write", "--images", "a", "--csv", "b", "--out", &out]);
    assert!(e.contains("cannot be used with"), "{e}");
    let missing = dir.path("no-such-folder");
    let e = err_text(&["shards", "write", "--images", &missing, "--out", &out]);
    assert!(e.contains("no-such-folder"), "{e}");
    let e = err_text(&["shards", "write", "--images", &dir.path(""), "--out", &out, "--samples-per-shard", "0"]);
    assert!(e.contains("--samples-per-shard must be at least 1"), "{e}");
    let e = err_text(&["synth", "--out", &out]);
    assert!(e.contains("--samples"), "{e}");
    let e = err_text(&["synth", "--out", &out, "--samples", "10", "--image-size", "4"]);
    assert!(e.contains("--image-size must be at least 8"), "{e}");
    let e = err_text(&["data", "stats", "ftp://host/{0..3}.tar"]);
    assert!(e.contains("unsupported URL scheme \"ftp\""), "{e}");
    let e = err_text(&["data", "stats", "/data/{0..3}.tar@-1"]);
    assert!(e.contains("bad weight \"-1\""), "{e}");
    let e = err_text(&["data", "stats", "/data/0.tar", "--store-option", "aws_endpoint"]);
    assert!(e.contains("KEY=VALUE"), "{e}");
    let e = err_text(&["data", "stats", "/data/0.tar", "--threads", "0"]);
    assert!(e.contains("--threads must be at least 1"), "{e}");
    let e = err_text(&["bench", "data", "/data/0.tar", "--threads", "0"]);
    assert!(e.contains("--threads must be at least 1"), "{e}");
    // Nothing readable at all is an error for a benchmark (a figure of 0 would mislead).
    let e = err_text(&["bench", "data", &dir.path("none.tar"), "--threads", "1", "--retries", "1"]);
    assert!(e.contains("none.tar") && e.contains("shard_open_failed"), "{e}");
}
