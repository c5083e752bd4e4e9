//! distclip's model against values OpenCLIP 3.3.0 computed on the same weights and inputs
//! (`tools/parity/make_fixtures.py` wrote `tests/fixtures/parity/`). Tolerance: 1e-4 max
//! absolute error in fp32, on every backend compiled in.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use distclip_model::checkpoint::{load_state_dict, read_state_dict, state_dict};
use distclip_model::loss::{clip_loss, clip_loss_local, siglip_loss};
use distclip_model::{Clip, ClipConfig, l2_normalize};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../../tests/fixtures/parity")
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Backends under test: flex always, libtorch CPU when built with `tch`.
fn devices() -> Vec<(&'static str, Device)> {
    let mut d = vec![("flex", Device::flex())];
    if distclip_model::device::HAS_TCH {
        d.push(("libtorch-cpu", distclip_model::device::parse_device("cpu").unwrap()));
    }
    d
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number array: {other}"),
    }
}

fn dims2(v: &Value) -> [usize; 2] {
    let a = v.as_array().unwrap();
    [a.len(), a[0].as_array().unwrap().len()]
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0f32), |acc, (i, e)| if e > acc.1 { (i, e) } else { acc });
    assert!(
        err <= tol,
        "{what}: max abs error {err:e} at {i} (got {}, want {}) exceeds {tol:e}",
        got[i],
        want[i]
    );
}

fn load(name: &str, weights: &str, device: &Device) -> (Clip, Value) {
    let dir = fixtures().join(name);
    let cfg = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let state = read_state_dict(&dir.join(weights)).unwrap();
    let model = load_state_dict(cfg.init(device), &state).unwrap();
    (model, json(&dir.join("expected.json")))
}

fn pixels(expected: &Value, device: &Device) -> Tensor<4> {
    let p = &expected["pixels"];
    let n = p.as_array().unwrap().len();
    let s = p[0][0].as_array().unwrap().len();
    Tensor::from_data(TensorData::new(flat(p), [n, 3, s, s]), device)
}

fn tokens(expected: &Value, device: &Device) -> Tensor<2, Int> {
    let t = &expected["tokens"];
    let shape = dims2(t);
    let ids: Vec<i64> = flat(t).into_iter().map(|v| v as i64).collect();
    Tensor::from_data(TensorData::new(ids, shape), device)
}

fn check_forward(name: &str, weights: &str, section: Option<&str>) {
    for (backend, device) in devices() {
        let (model, all) = load(name, weights, &device);
        let expected = section.map_or(&all, |s| &all[s]);
        let what = |k: &str| format!("{name}/{weights} on {backend}: {k}");
        let img = model.encode_image(pixels(&all, &device));
        let txt = model.encode_text(tokens(&all, &device));
        assert_close(&what("image_features"), &to_vec(img.clone()), &flat(&expected["image_features"]), TOL);
        assert_close(&what("text_features"), &to_vec(txt.clone()), &flat(&expected["text_features"]), TOL);
        let (img, txt) = (l2_normalize(img), l2_normalize(txt));
        assert_close(&what("image_embeddings"), &to_vec(img.clone()), &flat(&expected["image_embeddings"]), TOL);
        assert_close(&what("text_embeddings"), &to_vec(txt.clone()), &flat(&expected["text_embeddings"]), TOL);
        let scale = model.logit_scale_exp();
        let raw = expected["logit_scale"].as_f64().unwrap() as f32;
        assert_close(&what("logit_scale"), &[scale.ln()], &[raw], 1e-6);
        let mut logits = img.matmul(txt.transpose()) * scale;
        if let Some(b) = &model.logit_bias {
            logits = logits + b.val().unsqueeze::<2>();
        }
        assert_close(&what("logits_per_image"), &to_vec(logits.clone()), &flat(&expected["logits_per_image"]), TOL * 10.0);
        let probs = burn::tensor::activation::softmax(logits, 1);
        assert_close(&what("probs"), &to_vec(probs), &flat(&expected["probs"]), TOL);
    }
}

#[test]
fn tiny_matches_openclip() {
    check_forward("tiny", "open_clip_model.safetensors", None);
}

#[test]
fn quickgelu_layerscale_logit_bias_variant_matches_openclip() {
    check_forward("tiny-variant", "open_clip_model.safetensors", None);
}

#[test]
fn fp16_safetensors_load_and_match_openclip() {
    check_forward("tiny", "open_clip_model_fp16.safetensors", Some("fp16_weights"));
}

#[test]
fn pytorch_bin_state_dict_loads_identically() {
    let dir = fixtures().join("tiny");
    let a = read_state_dict(&dir.join("open_clip_model.safetensors")).unwrap();
    let b = read_state_dict(&dir.join("open_clip_pytorch_model.bin")).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert_eq!(t, &b[k], "{k}");
    }
}

#[test]
fn export_reproduces_openclip_keys_shapes_and_values() {
    let dir = fixtures().join("tiny");
    let source = read_state_dict(&dir.join("open_clip_model.safetensors")).unwrap();
    let (model, _) = load("tiny", "open_clip_model.safetensors", &Device::flex());
    let exported = state_dict(&model);
    assert_eq!(exported.keys().collect::<Vec<_>>(), source.keys().collect::<Vec<_>>());
    for (k, t) in &source {
        assert_eq!(&exported[k], t, "{k} changed in the round trip");
    }
}

#[test]
fn checkpoint_of_another_config_is_refused_with_the_mismatches_named() {
    let dir = fixtures().join("tiny");
    let state = read_state_dict(&dir.join("open_clip_model.safetensors")).unwrap();
    let other = ClipConfig::from_file(&fixtures().join("tiny-variant/config.json")).unwrap();
    let err = load_state_dict(other.init(&Device::flex()), &state).unwrap_err().to_string();
    assert!(err.contains("visual.conv1.weight"), "{err}");
    assert!(err.contains("--model"), "{err}");
}

fn leaf(v: &Value, device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(flat(v), dims2(v)), device).require_grad()
}

fn scalar_leaf(x: f64, device: &Device) -> Tensor<1> {
    Tensor::<1>::from_data(TensorData::new(vec![x as f32], [1]), device).require_grad()
}

#[test]
fn clip_loss_value_and_gradients_match_openclip() {
    let l = json(&fixtures().join("losses.json"));
    for (backend, base) in devices() {
        let device = base.autodiff();
        let c = &l["clip_full"];
        let img = leaf(&l["image_features_all"], &device);
        let txt = leaf(&l["text_features_all"], &device);
        let raw = scalar_leaf(c["logit_scale_raw"].as_f64().unwrap(), &device);
        let loss = clip_loss(img.clone(), txt.clone(), raw.clone().exp());
        assert_close(&format!("{backend} loss"), &to_vec(loss.clone()), &flat(&c["loss"]), TOL);
        let g = loss.backward();
        assert_close(&format!("{backend} d/dimg"), &to_vec(img.grad(&g).unwrap()), &flat(&c["grad_image_features"]), TOL);
        assert_close(&format!("{backend} d/dtxt"), &to_vec(txt.grad(&g).unwrap()), &flat(&c["grad_text_features"]), TOL);
        assert_close(&format!("{backend} d/dscale"), &to_vec(raw.grad(&g).unwrap()), &flat(&c["grad_logit_scale"]), TOL);
    }
}

#[test]
fn per_rank_local_loss_matches_openclip_and_sums_to_the_global_gradient() {
    let l = json(&fixtures().join("losses.json"));
    let c = &l["clip_local"];
    let world = l["world_size"].as_u64().unwrap() as usize;
    let b = l["batch_per_rank"].as_u64().unwrap() as usize;
    for (backend, base) in devices() {
        let device = base.autodiff();
        let mut sum_img = vec![0f32; world * b * 8];
        let mut sum_txt = vec![0f32; world * b * 8];
        let mut sum_scale = 0f32;
        let mut losses = Vec::new();
        for r in 0..world {
            let expected = &c["per_rank"][r];
            let img = leaf(&l["image_features_all"], &device);
            let txt = leaf(&l["text_features_all"], &device);
            let raw = scalar_leaf(c["logit_scale_raw"].as_f64().unwrap(), &device);
            let loss = clip_loss_local(
                img.clone().narrow(0, r * b, b),
                txt.clone().narrow(0, r * b, b),
                img.clone(),
                txt.clone(),
                raw.clone().exp(),
                r * b,
            );
            let v = to_vec(loss.clone())[0];
            assert_close(&format!("{backend} rank {r} loss"), &[v], &flat(&expected["loss"]), TOL);
            losses.push(v);
            let g = loss.backward();
            for (s, x) in sum_img.iter_mut().zip(to_vec(img.grad(&g).unwrap())) {
                *s += x;
            }
            for (s, x) in sum_txt.iter_mut().zip(to_vec(txt.grad(&g).unwrap())) {
                *s += x;
            }
            sum_scale += to_vec(raw.grad(&g).unwrap())[0];
        }
        let mean = losses.iter().sum::<f32>() / world as f32;
        assert_close(&format!("{backend} mean loss"), &[mean], &flat(&c["mean_loss"]), TOL);
        assert_close(&format!("{backend} summed d/dimg"), &sum_img, &flat(&c["sum_grad_image_features"]), TOL);
        assert_close(&format!("{backend} summed d/dtxt"), &sum_txt, &flat(&c["sum_grad_text_features"]), TOL);
        assert_close(&format!("{backend} summed d/dscale"), &[sum_scale], &flat(&c["sum_grad_logit_scale"]), TOL);
    }
}

#[test]
fn siglip_loss_value_and_gradients_match_openclip() {
    let l = json(&fixtures().join("losses.json"));
    for (backend, base) in devices() {
        let device = base.autodiff();
        for (i, c) in l["siglip"].as_array().unwrap().iter().enumerate() {
            let img = leaf(&l["image_features_all"], &device);
            let txt = leaf(&l["text_features_all"], &device);
            let raw = scalar_leaf(c["logit_scale_raw"].as_f64().unwrap(), &device);
            let bias = scalar_leaf(c["logit_bias"].as_f64().unwrap(), &device);
            let loss = siglip_loss(img.clone(), txt.clone(), raw.clone().exp(), bias.clone());
            let what = |k: &str| format!("{backend} siglip case {i}: {k}");
            assert_close(&what("loss"), &to_vec(loss.clone()), &flat(&c["loss"]), TOL);
            let g = loss.backward();
            assert_close(&what("d/dimg"), &to_vec(img.grad(&g).unwrap()), &flat(&c["grad_image_features"]), TOL);
            assert_close(&what("d/dtxt"), &to_vec(txt.grad(&g).unwrap()), &flat(&c["grad_text_features"]), TOL);
            assert_close(&what("d/dscale"), &to_vec(raw.grad(&g).unwrap()), &flat(&c["grad_logit_scale"]), TOL);
            assert_close(&what("d/dbias"), &to_vec(bias.grad(&g).unwrap()), &flat(&c["grad_logit_bias"]), TOL);
        }
    }
}

/// `epoch_N.pt` as `open_clip_train/main.py` saves it (`epoch`, `name`, `state_dict`,
/// `optimizer` with its moments), from `tools/parity/make_features_fixture.py`: its
/// `state_dict` is read, the optimizer's tensors are not mistaken for weights, and it loads
/// into the model the weights were trained as.
#[test]
fn open_clip_training_checkpoint_epoch_n_pt_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity");
    let from_pt = read_state_dict(&root.join("features/epoch_1.pt")).unwrap();
    let want = read_state_dict(&root.join("features/patch_dropout.safetensors")).unwrap();
    assert_eq!(from_pt, want);
    let cfg = distclip_model::ClipConfig::from_file(&root.join("step/config.json")).unwrap();
    let model = load_state_dict(cfg.init(&burn::tensor::Device::flex()), &from_pt).unwrap();
    assert_eq!(state_dict(&model), want);
}
