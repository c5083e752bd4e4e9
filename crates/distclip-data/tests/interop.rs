//! Shards written by python webdataset 1.0.2 (`tools/data/make_wds_fixtures.py`) read correctly.

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
