//! Shards written by python webdataset 1.0.2 (`tools/data/make_wds_fixtures.py`) read correctly,
//! and as python webdataset itself reads them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use distclip_data::loader::{Loader, LoaderConfig, Order};
use distclip_data::samples::{ShardEvent, ShardReader};
use distclip_data::stats::{StatsOptions, data_stats};
use distclip_data::transform::{Augment, TransformConfig};
use distclip_data::{ShardList, ShardOpener};

fn dir() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../../tests/fixtures/wds/python-shards")
}

fn expected() -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap())
            .unwrap();
    v["samples"].as_array().unwrap().clone()
}

#[test]
fn python_written_members_group_and_decode_like_pil() {
    let want = expected();
    let mut seen = 0;
    for shard in 0..2 {
        let f = std::fs::File::open(dir().join(format!("{shard:05}.tar"))).unwrap();
        for ev in ShardReader::new(f, shard, 0) {
            let ShardEvent::Sample(s) = ev else {
                panic!("{ev:?}")
            };
            let e = want.iter().find(|e| e["key"] == s.key.as_str()).unwrap();
            assert_eq!(
                (e["shard"].as_u64().unwrap(), e["index"].as_u64().unwrap()),
                (shard as u64, s.pos.index)
            );
            let ext = e["ext"].as_str().unwrap();
            let img =
                distclip_image::decode(s.get(ext).unwrap(), distclip_image::DEFAULT_MAX_PIXELS)
                    .unwrap();
            assert_eq!(
                (img.width as u64, img.height as u64),
                (e["width"].as_u64().unwrap(), e["height"].as_u64().unwrap())
            );
            // PIL's convert("RGB") means: exact for JPEG (libjpeg-turbo both sides), PNG and lossless
            // WebP; lossy WebP decoders may round differently.
            let rgb = img.to_rgb();
            let n = (rgb.width * rgb.height) as f64;
            let tol = if s.key == "000000005" { 1.0 } else { 1e-9 };
            for c in 0..3 {
                let mean = rgb
                    .data
                    .iter()
                    .skip(c)
                    .step_by(3)
                    .map(|&v| f64::from(v))
                    .sum::<f64>()
                    / n;
                let py = e["rgb_mean"][c].as_f64().unwrap();
                assert!(
                    (mean - py).abs() <= tol,
                    "{} channel {c}: {mean} vs PIL {py}",
                    s.key
                );
            }
            let caption = e["caption"].as_str().unwrap();
            if e["caption_in_txt"].as_bool().unwrap() {
                assert_eq!(std::str::from_utf8(s.get("txt").unwrap()).unwrap(), caption);
            } else {
                assert!(s.get("txt").is_none());
            }
            let meta: serde_json::Value = serde_json::from_slice(s.get("json").unwrap()).unwrap();
            assert_eq!(meta["caption"], caption);
            seen += 1;
        }
    }
    assert_eq!(seen, 6);
}

#[test]
fn python_shards_through_the_loader_with_txt_or_json_captions() {
    let spec = format!("{}/{{00000..00001}}.tar", dir().display());
    let list = Arc::new(ShardList::parse(&spec).unwrap());
    let cfg = |caption_key: &str| LoaderConfig {
        threads: 2,
        batch_size: 8,
        order: Order::Epoch,
        shuffle: false,
        transform: TransformConfig {
            image_size: 16,
            augment: Augment::None,
            caption_key: caption_key.parse().unwrap(),
            ..Default::default()
        },
        ..Default::default()
    };
    let batches: Vec<_> = Loader::new(list.clone(), ShardOpener::default(), cfg("json:caption"))
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(b.len(), 6);
    let tok = distclip_tokenizer::Tokenizer::shared();
    for (i, key) in b.keys.iter().enumerate() {
        let e = expected()
            .into_iter()
            .find(|e| e["key"] == key.as_str())
            .unwrap();
        let want: Vec<i64> = tok
            .tokenize(e["caption"].as_str().unwrap(), 77)
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(&b.tokens[i * 77..(i + 1) * 77], &want[..], "{key}");
    }
    // Worker 0 reads shard 0, worker 1 shard 1; the interleave alternates until shard 1 runs out.
    let order: Vec<&str> = b.keys.iter().map(String::as_str).collect();
    assert_eq!(
        order,
        [
            "000000000",
            "000000004",
            "000000001",
            "000000005",
            "000000002",
            "000000003"
        ]
    );

    let opts = StatsOptions {
        threads: 1,
        transform: TransformConfig {
            image_size: 16,
            augment: Augment::None,
            ..Default::default()
        },
        ..Default::default()
    };
    let stats = data_stats(&spec, &opts).unwrap();
    assert_eq!((stats.samples, stats.shards), (4, 2));
    assert_eq!(stats.skipped, [("missing_caption".to_string(), 2)].into());
    assert!(stats.failed_shards.is_empty());
    let json = serde_json::to_value(&stats).unwrap();
    for k in [
        "samples",
        "shards",
        "skipped",
        "failed_shards",
        "samples_per_s",
    ] {
        assert!(json.get(k).is_some(), "{k} missing from {json}");
    }
}

fn gz_dir() -> PathBuf {
    dir().join("../python-gz")
}

/// Python webdataset 1.0.2 reads gzip-compressed shards, gzip-compressed members (`txt.gz`,
/// `json.gz`), keys under directory prefixes, and shards cut short: distclip reads the same
/// samples, the same members and the same captions from each (`python-gz/expected.json` holds
/// what `WebDataset(url).decode()` yielded, errors ignored).
#[test]
fn gzip_shards_gzip_members_prefixed_keys_and_cut_shards_read_as_python_reads_them() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gz_dir().join("expected.json")).unwrap()).unwrap();
    let txt = distclip_data::CaptionKey::default();
    let json: distclip_data::CaptionKey = "json:caption".parse().unwrap();
    let mut checked = 0;
    for (name, want) in expected["shards"].as_object().unwrap() {
        let f = std::fs::File::open(gz_dir().join(name)).unwrap();
        let samples: Vec<_> = ShardReader::new(f, 0, 0)
            .filter_map(|ev| match ev {
                ShardEvent::Sample(s) => Some(s),
                _ => None,
            })
            .collect();
        let want = want.as_array().unwrap();
        let got: Vec<(String, Vec<String>)> = samples
            .iter()
            .map(|s| {
                let mut exts: Vec<String> = s.members.iter().map(|(e, _)| e.clone()).collect();
                exts.sort();
                (s.key.clone(), exts)
            })
            .collect();
        let python: Vec<(String, Vec<String>)> = want
            .iter()
            .map(|e| {
                let exts = e["exts"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect();
                (e["key"].as_str().unwrap().to_owned(), exts)
            })
            .collect();
        assert_eq!(got, python, "{name}");
        for (s, e) in samples.iter().zip(want) {
            assert_eq!(txt.caption(s).ok().as_deref(), e["caption"].as_str(), "{name} {}", s.key);
            assert_eq!(json.caption(s).ok().as_deref(), e["json_caption"].as_str(), "{name} {}", s.key);
            checked += 1;
        }
    }
    assert_eq!(checked, 4 + 3 + 3);

    // Through `distclip data stats`: every complete sample is used; the last sample of each cut
    // shard (its jpg read whole, its txt cut off) is counted as cut short, and the cut as a
    // truncated tar that a resume would start after.
    let spec = ["00000.tar.gz", "truncated-data.tar", "truncated-header.tar"]
        .map(|n| gz_dir().join(n).display().to_string())
        .join("::");
    let opts = StatsOptions {
        threads: 1,
        transform: TransformConfig { image_size: 16, augment: Augment::None, ..Default::default() },
        ..Default::default()
    };
    let stats = data_stats(&spec, &opts).unwrap();
    assert_eq!((stats.samples, stats.shards), (4 + 2 + 2, 3));
    assert_eq!(stats.skipped, [("cut_short".to_string(), 2), ("truncated_tar".to_string(), 2)].into());
    let failed: Vec<(usize, &str, u64)> =
        stats.failed_shards.iter().map(|f| (f.shard, f.reason.name(), f.samples_read)).collect();
    assert_eq!(failed, [(1, "truncated_tar", 3), (2, "truncated_tar", 3)]);
    assert_eq!(stats.retries, 0);
}
