//! Positional-embedding resizing against OpenCLIP 3.3.0's `resize_pos_embed` (bicubic,
//! antialias), from `tools/parity/make_features_fixture.py`: grid 2 -> 3 (upsampling the step
//! fixture's init) and grid 4 -> 3 (downsampling, where the antialiased filter widens).

use std::path::{Path, PathBuf};

use distclip_model::checkpoint::{HostTensor, StateDict, load_state_dict, read_state_dict};
use distclip_model::pos_embed::resize_pos_embed;
use distclip_model::ClipConfig;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn resized_grids_match_open_clip() {
    let want = read_state_dict(&dir().join("features/pos_embed.safetensors")).unwrap();
    let init = read_state_dict(&dir().join("step/init.safetensors")).unwrap();
    let key = "visual.positional_embedding";

    let mut state: StateDict = [(key.to_string(), init[key].clone())].into();
    assert_eq!(resize_pos_embed(&mut state, 3).unwrap(), Some((2, 3)));
    let up = &state[key];
    assert_eq!(up.shape, want["up"].shape);
    assert_eq!(up.data[..32], init[key].data[..32], "class token row kept");
    let e = max_abs_diff(&up.data, &want["up"].data);
    assert!(e < 1e-5, "upsampled grid differs by {e}");
    // The new rows are not a copy of the old ones, so the check above can fail.
    assert!(max_abs_diff(&up.data[32..64], &init[key].data[32..64]) > 1e-3);

    let src = &want["down_src"];
    let mut state: StateDict = [(key.to_string(), HostTensor { shape: src.shape.clone(), data: src.data.clone() })].into();
    assert_eq!(resize_pos_embed(&mut state, 3).unwrap(), Some((4, 3)));
    let e = max_abs_diff(&state[key].data, &want["down"].data);
    assert!(e < 1e-5, "downsampled grid differs by {e}");
}

#[test]
fn a_checkpoint_for_another_image_size_loads_after_resizing() {
    let mut init = read_state_dict(&dir().join("step/init.safetensors")).unwrap();
    let mut cfg = ClipConfig::from_file(&dir().join("step/config.json")).unwrap();
    cfg.vision_cfg.image_size = 24;
    let device = burn::tensor::Device::flex();
    let e = load_state_dict(cfg.init(&device), &init).unwrap_err().to_string();
    assert!(e.contains("visual.positional_embedding"), "{e}");
    resize_pos_embed(&mut init, cfg.grid_size()).unwrap();
    load_state_dict(cfg.init(&device), &init).unwrap();
}
