//! The eval transform against OpenCLIP's own output (PIL bicubic resize, centre crop, RGB
//! conversion, ToTensor, Normalize) on the parity fixture images: PNG (RGB, RGBA, grey) and
//! JPEG, down- and up-sampling.

use std::path::Path;

use serde_json::Value;

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number array: {other}"),
    }
}

fn check(config: &str) {
    let root = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../../tests/fixtures/parity");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(config).join("expected.json")).unwrap()).unwrap();
    let size = expected["config"]["vision_cfg"]["image_size"].as_u64().unwrap() as usize;
    for (i, file) in expected["image_files"].as_array().unwrap().iter().enumerate() {
        let file = file.as_str().unwrap();
        let bytes = std::fs::read(root.join(file)).unwrap();
        let img = distclip_image::decode(&bytes, distclip_image::DEFAULT_MAX_PIXELS).unwrap();
        let got = distclip_image::eval_transform(&img, size).unwrap();
        let want = flat(&expected["pixels"][i]);
        assert_eq!(got.len(), want.len(), "{file}");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        // One 8-bit level is ~0.015 after normalisation; 1e-5 means every pixel is identical.
        assert!(worst < 1e-5, "{config}/{file}: max abs error {worst} (size {size})");
    }
}

#[test]
fn eval_transform_matches_openclip_at_32px() {
    check("tiny");
}

#[test]
fn eval_transform_matches_openclip_at_48px() {
    check("tiny-variant");
}
