//! OpenCLIP checkpoints in and out: safetensors and PyTorch `.bin`/`.pt` state dicts, with
//! OpenCLIP's key names, so `model.load_state_dict(..., strict=True)` accepts what distclip
//! writes and distclip loads what OpenCLIP writes.
//!
//! The Burn module tree is named field for field after OpenCLIP, so a parameter's module path is
//! its state-dict key, with two exceptions handled by [`openclip_key`]: the fused attention
//! projection (`attn.in_proj.weight` -> `attn.in_proj_weight`) and the enum wrapper of
//! `text_projection`. `Linear` weights are transposed (Burn keeps `[in, out]`, PyTorch
//! `[out, in]`), and the 0-d `logit_scale`/`logit_bias` become shape `[1]` in Burn.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::ModelError;
use crate::clip::Clip;

/// One tensor of a state dict, converted to f32 on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// PyTorch shape (`[]` for a 0-d tensor).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// A state dict: OpenCLIP key -> tensor.
pub type StateDict = BTreeMap<String, HostTensor>;

/// Map a Burn module path (field names from the root [`Clip`]) to OpenCLIP's state-dict key.
pub fn openclip_key(path: &[String]) -> String {
    let joined = path.join(".");
    joined
        .replace("attn.in_proj.weight", "attn.in_proj_weight")
        .replace("attn.in_proj.bias", "attn.in_proj_bias")
        .replace("text_projection.Matrix", "text_projection")
        .replace("text_projection.Linear.", "text_projection.")
}

/// Tracks the module path during a Burn traversal. `enter_module` receives the field name and
/// the type of the struct that owns it, so the owner of a leaf tells whether it is a `Linear`.
#[derive(Default)]
struct PathStack {
    names: Vec<String>,
    owners: Vec<String>,
}

impl PathStack {
    fn enter(&mut self, name: &str, owner: &str) {
        self.names.push(name.to_string());
        self.owners.push(owner.to_string());
    }
    fn exit(&mut self) {
        self.names.pop();
        self.owners.pop();
    }
    fn key(&self) -> String {
        openclip_key(&self.names)
    }
    /// A `Linear`'s 2-d weight, stored transposed relative to PyTorch.
    fn is_linear_weight(&self) -> bool {
        self.names.last().is_some_and(|n| n == "weight")
            && self.owners.last().is_some_and(|o| o == "Struct:Linear")
    }
}

/// The shape PyTorch uses for a parameter of the given Burn shape at `key`.
fn torch_shape(key: &str, burn_shape: &[usize], transposed: bool) -> Vec<usize> {
    if key == "logit_scale" || key == "logit_bias" {
        return vec![];
    }
    let mut s = burn_shape.to_vec();
    if transposed {
        s.reverse();
    }
    s
}

fn transpose_2d(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

struct Collector {
    path: PathStack,
    out: StateDict,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let key = self.path.key();
        let tensor = param.val();
        let burn_shape = tensor.dims().to_vec();
        let values = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let transposed = self.path.is_linear_weight();
        let data = if transposed {
            transpose_2d(&values, burn_shape[0], burn_shape[1])
        } else {
            values
        };
        let shape = torch_shape(&key, &burn_shape, transposed);
        self.out.insert(key, HostTensor { shape, data });
    }
}

/// The model's parameters under OpenCLIP's names and shapes.
pub fn state_dict(model: &Clip) -> StateDict {
    let mut c = Collector {
        path: PathStack::default(),
        out: StateDict::new(),
    };
    model.visit(&mut c);
    c.out
}

struct Loader<'a> {
    path: PathStack,
    source: &'a StateDict,
    used: Vec<String>,
    errors: Vec<String>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.key();
        let burn_shape: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
        let transposed = self.path.is_linear_weight();
        let want = torch_shape(&key, &burn_shape, transposed);
        let Some(found) = self.source.get(&key) else {
            self.errors.push(format!("missing key {key} (expected shape {want:?})"));
            return param;
        };
        self.used.push(key.clone());
        // A 0-d scalar may also arrive as [1] (OpenCLIP's nonscalar_logit_scale).
        let scalar_ok = want.is_empty() && found.data.len() == 1;
        if found.shape != want && !scalar_ok {
            self.errors.push(format!(
                "{key}: checkpoint has shape {:?}, model expects {want:?}",
                found.shape
            ));
            return param;
        }
        let data = if transposed {
            transpose_2d(&found.data, want[0], want[1])
        } else {
            found.data.clone()
        };
        let device = param.lazy_device();
        let tensor = Tensor::<D>::from_data(TensorData::new(data, burn_shape), &device);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Overwrite every parameter of `model` from `state`, strictly: every model parameter must be
/// present with its exact shape and every key of `state` must be used, as PyTorch's
/// `load_state_dict(strict=True)`. The error lists what did not match.
pub fn load_state_dict(model: Clip, state: &StateDict) -> Result<Clip, ModelError> {
    let mut loader = Loader {
        path: PathStack::default(),
        source: state,
        used: Vec::new(),
        errors: Vec::new(),
    };
    let model = model.map(&mut loader);
    let mut errors = loader.errors;
    let used: std::collections::BTreeSet<&String> = loader.used.iter().collect();
    for key in state.keys() {
        if !used.contains(key) {
            errors.push(format!("unexpected key {key} (not a parameter of this model)"));
        }
    }
    if errors.is_empty() {
        return Ok(model);
    }
    let n = errors.len();
    let mut msg = errors.into_iter().take(8).collect::<Vec<_>>().join("; ");
    if n > 8 {
        msg.push_str(&format!("; and {} more", n - 8));
    }
    Err(ModelError::Checkpoint(format!(
        "checkpoint does not fit the model config ({n} problems): {msg}. \
         Check that --model names the config the checkpoint was trained with"
    )))
}

/// Read a state dict from `.safetensors`, or a PyTorch `.bin`/`.pt`/`.pth` file (a plain
/// state dict or a training checkpoint holding one under `state_dict`). f16, bf16 and f64 are
/// converted to f32; DataParallel's `module.` prefix is stripped.
pub fn read_state_dict(path: &Path) -> Result<StateDict, ModelError> {
    let bytes_err = |e: String| ModelError::Checkpoint(format!("{}: {e}", path.display()));
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let mut state = if is_safetensors {
        let bytes = std::fs::read(path).map_err(|e| bytes_err(e.to_string()))?;
        read_safetensors_bytes(&bytes).map_err(bytes_err)?
    } else {
        read_pytorch(path).map_err(bytes_err)?
    };
    if state.keys().all(|k| k.starts_with("module.")) && !state.is_empty() {
        state = state
            .into_iter()
            .map(|(k, v)| (k["module.".len()..].to_string(), v))
            .collect();
    }
    Ok(state)
}

/// Floating-point storage types a checkpoint may hold.
#[derive(Debug, Clone, Copy)]
enum FloatDtype {
    F32,
    F16,
    BF16,
    F64,
}

/// Little-endian raw values of `dtype` widened or narrowed to f32.
fn floats_from_le(dtype: FloatDtype, raw: &[u8]) -> Vec<f32> {
    match dtype {
        FloatDtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        FloatDtype::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        FloatDtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        FloatDtype::F64 => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    }
}

fn read_safetensors_bytes(bytes: &[u8]) -> Result<StateDict, String> {
    use safetensors::{Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file ({e}); is it truncated?"))?;
    let mut out = StateDict::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => FloatDtype::F32,
            Dtype::F16 => FloatDtype::F16,
            Dtype::BF16 => FloatDtype::BF16,
            Dtype::F64 => FloatDtype::F64,
            other => return Err(format!("tensor {name} has dtype {other:?}; only floating point weights are supported")),
        };
        let data = floats_from_le(dtype, view.data());
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

fn read_pytorch(path: &Path) -> Result<StateDict, String> {
    use pytorch_reader::{DType, PytorchReader};
    let reader = match PytorchReader::with_top_level_key(path, "state_dict") {
        Ok(r) => r,
        Err(_) => PytorchReader::new(path)
            .map_err(|e| format!("not a readable PyTorch checkpoint ({e})"))?,
    };
    let mut out = StateDict::new();
    for (name, t) in reader.tensors() {
        let raw = t.read().map_err(|e| format!("reading tensor {name}: {e}"))?;
        let dtype = match t.dtype() {
            DType::F32 => FloatDtype::F32,
            DType::F16 => FloatDtype::F16,
            DType::BF16 => FloatDtype::BF16,
            DType::F64 => FloatDtype::F64,
            // Integer buffers (e.g. a persisted step counter) are not model weights.
            _ => continue,
        };
        let data = floats_from_le(dtype, &raw);
        if data.len() != t.num_elements() {
            return Err(format!("tensor {name}: {} values for shape {:?}", data.len(), t.shape()));
        }
        out.insert(
            name.clone(),
            HostTensor {
                shape: t.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Write `model` as safetensors with OpenCLIP's key names and shapes (f32), atomically and
/// durably, so a crash never leaves a truncated checkpoint under the final name.
pub fn save_safetensors(model: &Clip, path: &Path) -> Result<(), ModelError> {
    let state = state_dict(model);
    let bytes = safetensors_bytes(&state)?;
    distclip_checkpoint::durable::write_atomic(path, &bytes)
        .map_err(|e| ModelError::Checkpoint(format!("writing {}: {e}", path.display())))
}

/// Serialise a state dict as safetensors bytes (f32, little-endian).
pub fn safetensors_bytes(state: &StateDict) -> Result<Vec<u8>, ModelError> {
    use safetensors::tensor::{Dtype, TensorView};
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> = state
        .iter()
        .map(|(k, t)| {
            let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), bytes, t.shape.clone())
        })
        .collect();
    let views = raw
        .iter()
        .map(|(k, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| ModelError::Checkpoint(format!("tensor {k}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(views, Some(meta))
        .map_err(|e| ModelError::Checkpoint(format!("serialising safetensors: {e}")))
}

/// Parse safetensors bytes into a state dict (used by tests and by loaders of in-memory data).
pub fn state_dict_from_safetensors(bytes: &[u8]) -> Result<StateDict, ModelError> {
    read_safetensors_bytes(bytes).map_err(ModelError::Checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_onto_openclip_names() {
        let p = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            openclip_key(&p("visual.transformer.resblocks.0.attn.in_proj.weight")),
            "visual.transformer.resblocks.0.attn.in_proj_weight"
        );
        assert_eq!(
            openclip_key(&p("transformer.resblocks.11.attn.in_proj.bias")),
            "transformer.resblocks.11.attn.in_proj_bias"
        );
        assert_eq!(openclip_key(&p("text_projection.Matrix")), "text_projection");
        assert_eq!(openclip_key(&p("text_projection.Linear.bias")), "text_projection.bias");
        assert_eq!(openclip_key(&p("visual.conv1.weight")), "visual.conv1.weight");
    }

    #[test]
    fn transpose_is_its_own_inverse() {
        let m: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let t = transpose_2d(&m, 2, 3);
        assert_eq!(t, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(transpose_2d(&t, 3, 2), m);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = state_dict_from_safetensors(b"not a checkpoint").unwrap_err().to_string();
        assert!(err.contains("safetensors"), "{err}");
    }
}
