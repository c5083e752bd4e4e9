//! Model configuration in OpenCLIP's model-config JSON format, and the built-in presets.
//!
//! Mirrors `CLIPVisionCfg` / `CLIPTextCfg` in OpenCLIP's `model.py`; the presets are OpenCLIP's own
//! `model_configs/*.json` files, embedded unchanged (see `configs/README.md`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ModelError;

/// A CLIP model: both towers and the shared embedding width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    /// Width of the joint image-text embedding space.
    pub embed_dim: usize,
    /// Use QuickGELU (`x * sigmoid(1.702 x)`) instead of exact GELU, as OpenAI's original weights.
    #[serde(default)]
    pub quick_gelu: bool,
    /// Initial value of `logit_bias` (SigLIP); `None` means the model has no bias parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_logit_bias: Option<f64>,
    /// Initial value of `logit_scale` (a log temperature); OpenCLIP's default is ln(1/0.07).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_logit_scale: Option<f64>,
    /// Image tower.
    pub vision_cfg: VisionConfig,
    /// Text tower.
    pub text_cfg: TextConfig,
    /// Keys OpenCLIP knows that do not change the architecture distclip builds (kept so a
    /// config round-trips).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The ViT image tower (OpenCLIP `CLIPVisionCfg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Square input resolution in pixels.
    pub image_size: usize,
    /// Number of residual attention blocks.
    pub layers: usize,
    /// Transformer width.
    pub width: usize,
    /// Width of one attention head; heads = width / head_width.
    #[serde(default = "default_head_width")]
    pub head_width: usize,
    /// MLP hidden width as a multiple of `width` (hidden = int(width * mlp_ratio)).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Side of the square patches of the convolutional stem.
    pub patch_size: usize,
    /// LayerScale initial value; `None` disables LayerScale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ls_init_value: Option<f64>,
    /// Skip `ln_pre`.
    #[serde(default)]
    pub no_ln_pre: bool,
    /// `tok` (class token) or `avg` (mean of patch tokens).
    #[serde(default = "default_vision_pool")]
    pub pool_type: String,
    /// Apply `ln_post` after pooling instead of before.
    #[serde(default)]
    pub final_ln_after_pool: bool,
    /// Fraction of patch tokens dropped in training (FLIP; 0 disables), see
    /// [`crate::patch_dropout`]. A run's `model.patch_dropout` overrides it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patch_dropout: f64,
    /// OpenCLIP keys that distclip does not implement are collected here and refused.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The text transformer (OpenCLIP `CLIPTextCfg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Token positions (77 for every released CLIP).
    #[serde(default = "default_context_length")]
    pub context_length: usize,
    /// Vocabulary size (49,408 for the CLIP BPE).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Transformer width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Number of residual attention blocks.
    pub layers: usize,
    /// MLP hidden width as a multiple of `width`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// LayerScale initial value; `None` disables LayerScale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ls_init_value: Option<f64>,
    /// Attend bidirectionally instead of causally.
    #[serde(default)]
    pub no_causal_mask: bool,
    /// Pooling: `argmax` (the EOT token, highest id), `first`, `last` or `eos`.
    #[serde(default = "default_text_pool")]
    pub pool_type: String,
    /// Token id pooled by `pool_type = "eos"`.
    #[serde(default = "default_eos_id")]
    pub eos_id: i64,
    /// `text_projection` is an `nn.Linear` with bias instead of a raw matrix.
    #[serde(default)]
    pub proj_bias: bool,
    /// Apply `ln_final` after pooling instead of before.
    #[serde(default)]
    pub final_ln_after_pool: bool,
    /// OpenCLIP keys that distclip does not implement are collected here and refused.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn default_head_width() -> usize {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_vision_pool() -> String {
    "tok".into()
}
fn default_text_pool() -> String {
    "argmax".into()
}
fn default_context_length() -> usize {
    77
}
fn default_vocab_size() -> usize {
    49408
}
fn default_eos_id() -> i64 {
    2
}

/// OpenCLIP's `int(d_model * mlp_ratio)`: truncation, as Python's `int()` on a float.
pub fn mlp_width(width: usize, mlp_ratio: f64) -> usize {
    (width as f64 * mlp_ratio) as usize
}

/// Keys that, when present with a non-default value, select an architecture distclip does not
/// build. Refusing them beats silently building a different model.
const UNSUPPORTED_VISION: &[&str] = &[
    "timm_model_name",
    "attentional_pool",
    "pos_embed_type",
    "block_type",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
    "act_kwargs",
    "norm_kwargs",
];
const UNSUPPORTED_TEXT: &[&str] = &[
    "hf_model_name",
    "embed_cls",
    "proj_type",
    "block_type",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
    "act_kwargs",
    "norm_kwargs",
];
const UNSUPPORTED_TOP: &[&str] = &["multimodal_cfg", "nonscalar_logit_scale"];

fn is_default_value(key: &str, v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => matches!(
            (key, s.as_str()),
            ("pos_embed_type", "learnable") | ("block_type", "default") | ("proj_type", "linear")
        ),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) | Value::Array(_) => false,
    }
}

fn check_extra(
    section: &str,
    extra: &BTreeMap<String, Value>,
    unsupported: &[&str],
) -> Result<(), ModelError> {
    for (k, v) in extra {
        if unsupported.contains(&k.as_str()) && !is_default_value(k, v) {
            return Err(ModelError::Config(format!(
                "{section}.{k} = {v} selects an architecture distclip does not implement \
                 (supported: plain ViT image tower and CLIP text transformer); remove the key \
                 or use a plain OpenCLIP ViT config"
            )));
        }
    }
    Ok(())
}

impl ClipConfig {
    /// Parse an OpenCLIP model-config JSON document and check that distclip can build it.
    pub fn from_json_str(json: &str) -> Result<Self, ModelError> {
        let cfg: ClipConfig = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("not an OpenCLIP model config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read an OpenCLIP model-config JSON file.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ModelError::Config(format!("cannot read model config {}: {e}", path.display()))
        })?;
        Self::from_json_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))
    }

    /// A built-in preset by name (`ViT-B-32`, `tiny`, ...) or, failing that, a JSON file path.
    pub fn from_name_or_path(name: &str) -> Result<Self, ModelError> {
        if let Some(cfg) = preset(name) {
            return cfg;
        }
        let path = Path::new(name);
        if path.exists() {
            return Self::from_file(path);
        }
        Err(ModelError::Config(format!(
            "unknown model {name:?}: not a built-in preset and no such file; \
             run `distclip models` for the presets or pass an OpenCLIP config JSON"
        )))
    }

    /// Serialise in OpenCLIP's format.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }

    /// Check every dimension and refuse architectures distclip does not build.
    pub fn validate(&self) -> Result<(), ModelError> {
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        check_extra("vision_cfg", &v.extra, UNSUPPORTED_VISION)?;
        check_extra("text_cfg", &t.extra, UNSUPPORTED_TEXT)?;
        for k in UNSUPPORTED_TOP {
            if let Some(val) = self.extra.get(*k)
                && !is_default_value(k, val)
            {
                return Err(ModelError::Config(format!(
                    "{k} selects an architecture distclip does not implement"
                )));
            }
        }
        let bad = |msg: String| Err(ModelError::Config(msg));
        if self.embed_dim == 0 {
            return bad("embed_dim must be positive".into());
        }
        if v.width == 0 || v.layers == 0 || v.patch_size == 0 || v.head_width == 0 {
            return bad("vision_cfg: width, layers, patch_size and head_width must be positive".into());
        }
        if !v.width.is_multiple_of(v.head_width) {
            return bad(format!(
                "vision_cfg.width {} is not a multiple of head_width {}",
                v.width, v.head_width
            ));
        }
        if v.image_size < v.patch_size {
            return bad(format!(
                "vision_cfg.image_size {} is smaller than patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if !matches!(v.pool_type.as_str(), "tok" | "avg") {
            return bad(format!(
                "vision_cfg.pool_type {:?} is not supported (use \"tok\" or \"avg\")",
                v.pool_type
            ));
        }
        if t.width == 0 || t.heads == 0 || t.layers == 0 || t.context_length == 0 || t.vocab_size == 0 {
            return bad("text_cfg: width, heads, layers, context_length and vocab_size must be positive".into());
        }
        if !t.width.is_multiple_of(t.heads) {
            return bad(format!("text_cfg.width {} is not a multiple of heads {}", t.width, t.heads));
        }
        if !matches!(t.pool_type.as_str(), "argmax" | "first" | "last" | "eos") {
            return bad(format!(
                "text_cfg.pool_type {:?} is not supported (use argmax, first, last or eos)",
                t.pool_type
            ));
        }
        if !(0.0..1.0).contains(&v.patch_dropout) {
            return bad(format!(
                "vision_cfg.patch_dropout {} is outside [0, 1) (it is the fraction of patches dropped)",
                v.patch_dropout
            ));
        }
        if !(v.mlp_ratio > 0.0 && t.mlp_ratio > 0.0) {
            return bad("mlp_ratio must be positive".into());
        }
        Ok(())
    }

    /// Attention heads of the image tower.
    pub fn vision_heads(&self) -> usize {
        self.vision_cfg.width / self.vision_cfg.head_width
    }

    /// Patches along one side of the image.
    pub fn grid_size(&self) -> usize {
        self.vision_cfg.image_size / self.vision_cfg.patch_size
    }

    /// Number of parameters of the model this config builds (same count as OpenCLIP's
    /// `sum(p.numel() for p in model.parameters())`).
    pub fn num_params(&self) -> usize {
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        let block = |d: usize, ratio: f64, ls: bool| {
            let h = mlp_width(d, ratio);
            2 * 2 * d                 // ln_1, ln_2
                + 3 * d * d + 3 * d   // in_proj
                + d * d + d           // out_proj
                + d * h + h + h * d + d // c_fc, c_proj
                + if ls { 2 * d } else { 0 }
        };
        let g = self.grid_size();
        let vision = 3 * v.width * v.patch_size * v.patch_size
            + v.width
            + (g * g + 1) * v.width
            + if v.no_ln_pre { 0 } else { 2 * v.width }
            + v.layers * block(v.width, v.mlp_ratio, v.ls_init_value.is_some())
            + 2 * v.width
            + v.width * self.embed_dim;
        let text = t.vocab_size * t.width
            + t.context_length * t.width
            + t.layers * block(t.width, t.mlp_ratio, t.ls_init_value.is_some())
            + 2 * t.width
            + t.width * self.embed_dim
            + if t.proj_bias { self.embed_dim } else { 0 };
        vision + text + 1 + usize::from(self.init_logit_bias.is_some())
    }
}

/// Built-in configs: OpenCLIP's plain-ViT presets (file name = model name), the benchmark
/// config and distclip's tiny test configs.
const PRESETS: &[(&str, &str)] = &[
    ("ViT-S-32", include_str!("../configs/ViT-S-32.json")),
    ("ViT-S-32-alt", include_str!("../configs/ViT-S-32-alt.json")),
    ("ViT-S-16", include_str!("../configs/ViT-S-16.json")),
    ("ViT-S-16-alt", include_str!("../configs/ViT-S-16-alt.json")),
    ("ViT-M-32", include_str!("../configs/ViT-M-32.json")),
    ("ViT-M-32-alt", include_str!("../configs/ViT-M-32-alt.json")),
    ("ViT-M-16", include_str!("../configs/ViT-M-16.json")),
    ("ViT-M-16-alt", include_str!("../configs/ViT-M-16-alt.json")),
    ("ViT-B-32", include_str!("../configs/ViT-B-32.json")),
    ("ViT-B-32-quickgelu", include_str!("../configs/ViT-B-32-quickgelu.json")),
    ("ViT-B-32-256", include_str!("../configs/ViT-B-32-256.json")),
    ("ViT-B-32-plus-256", include_str!("../configs/ViT-B-32-plus-256.json")),
    ("ViT-B-16", include_str!("../configs/ViT-B-16.json")),
    ("ViT-B-16-quickgelu", include_str!("../configs/ViT-B-16-quickgelu.json")),
    ("ViT-B-16-plus", include_str!("../configs/ViT-B-16-plus.json")),
    ("ViT-B-16-plus-240", include_str!("../configs/ViT-B-16-plus-240.json")),
    ("ViT-L-14", include_str!("../configs/ViT-L-14.json")),
    ("ViT-L-14-quickgelu", include_str!("../configs/ViT-L-14-quickgelu.json")),
    ("ViT-L-14-280", include_str!("../configs/ViT-L-14-280.json")),
    ("ViT-L-14-336", include_str!("../configs/ViT-L-14-336.json")),
    ("ViT-L-14-336-quickgelu", include_str!("../configs/ViT-L-14-336-quickgelu.json")),
    ("ViT-L-16", include_str!("../configs/ViT-L-16.json")),
    ("ViT-L-16-320", include_str!("../configs/ViT-L-16-320.json")),
    ("ViT-H-14", include_str!("../configs/ViT-H-14.json")),
    ("ViT-H-14-quickgelu", include_str!("../configs/ViT-H-14-quickgelu.json")),
    ("ViT-H-14-378", include_str!("../configs/ViT-H-14-378.json")),
    ("ViT-H-14-378-quickgelu", include_str!("../configs/ViT-H-14-378-quickgelu.json")),
    ("ViT-H-16", include_str!("../configs/ViT-H-16.json")),
    ("ViT-g-14", include_str!("../configs/ViT-g-14.json")),
    ("ViT-bigG-14", include_str!("../configs/ViT-bigG-14.json")),
    ("ViT-bigG-14-quickgelu", include_str!("../configs/ViT-bigG-14-quickgelu.json")),
    ("ViT-e-14", include_str!("../configs/ViT-e-14.json")),
    ("bench-s", include_str!("../configs/bench-s.json")),
    ("tiny", include_str!("../configs/tiny.json")),
];

/// Names of the built-in configs, in display order.
pub fn preset_names() -> impl Iterator<Item = &'static str> {
    PRESETS.iter().map(|(n, _)| *n)
}

/// A built-in config by exact name, or `None` if there is no such preset.
pub fn preset(name: &str) -> Option<Result<ClipConfig, ModelError>> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, json)| ClipConfig::from_json_str(json).map_err(|e| ModelError::Config(format!("preset {n}: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_validates() {
        for name in preset_names() {
            let cfg = preset(name).unwrap().unwrap();
            assert!(cfg.num_params() > 0, "{name}");
        }
    }

    #[test]
    fn vit_b_32_matches_openclip_parameter_count() {
        // OpenCLIP 3.3.0: sum(p.numel()) of create_model('ViT-B-32') = 151,277,313.
        let cfg = preset("ViT-B-32").unwrap().unwrap();
        assert_eq!(cfg.num_params(), 151_277_313);
        assert_eq!(cfg.vision_heads(), 12);
        assert_eq!(cfg.grid_size(), 7);
    }

    #[test]
    fn bench_s_matches_its_documented_size() {
        // shared/bench/README.md: bench-s.json has 28.3M parameters.
        let n = preset("bench-s").unwrap().unwrap().num_params();
        assert!((28_200_000..28_400_000).contains(&n), "{n}");
    }

    #[test]
    fn mlp_width_truncates_like_python_int() {
        assert_eq!(mlp_width(1408, 4.3637), 6144);
        assert_eq!(mlp_width(1664, 4.9231), 8192);
        assert_eq!(mlp_width(40, 2.6), 104);
    }

    #[test]
    fn unsupported_architectures_are_refused_with_the_key_named() {
        let json = r#"{"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 8,
            "patch_size": 8, "head_width": 8, "timm_model_name": "vit_base"},
            "text_cfg": {"width": 8, "heads": 1, "layers": 1}}"#;
        let err = ClipConfig::from_json_str(json).unwrap_err().to_string();
        assert!(err.contains("vision_cfg.timm_model_name"), "{err}");
    }

    #[test]
    fn malformed_json_and_bad_dimensions_are_errors() {
        assert!(ClipConfig::from_json_str("{").is_err());
        let json = r#"{"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 10,
            "patch_size": 8, "head_width": 4}, "text_cfg": {"width": 8, "heads": 1, "layers": 1}}"#;
        let err = ClipConfig::from_json_str(json).unwrap_err().to_string();
        assert!(err.contains("head_width"), "{err}");
    }

    #[test]
    fn unknown_name_error_says_what_to_do() {
        let err = ClipConfig::from_name_or_path("ViT-Q-99").unwrap_err().to_string();
        assert!(err.contains("distclip models"), "{err}");
    }
}
