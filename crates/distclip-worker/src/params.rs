//! The model's parameters as one flat f32 buffer: a fixed layout (OpenCLIP name, Burn shape,
//! offset) in module-visit order, gathering parameter values and gradients into it, writing
//! values back into the module, and a checksum that proves ranks hold identical parameters.
//!
//! Values inside a tensor keep Burn's layout (a `Linear` weight is `[in, out]`, the transpose of
//! PyTorch's): AdamW, norms and sums are element-wise, so the order inside a tensor does not
//! matter, and the OpenCLIP-named export goes through `distclip_model::checkpoint`.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use distclip_model::Clip;
use distclip_model::checkpoint::openclip_key;
use distclip_model::lock::Locking;

/// One parameter's place in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// OpenCLIP state-dict name (e.g. `visual.transformer.resblocks.0.attn.in_proj_weight`).
    pub name: String,
    /// Burn shape (`logit_scale` is `[1]`; `Linear` weights are `[in, out]`).
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Whether AdamW applies weight decay to it (see [`decays`]).
    pub decay: bool,
    /// Whether it is trained; a locked parameter (see [`ParamLayout::lock`]) gets no gradient,
    /// no all-reduce and no update, as a `requires_grad=False` parameter in OpenCLIP.
    pub trainable: bool,
}

/// OpenCLIP 3.3.0's decay rule (`open_clip_train/main.py` line 335): no decay where
/// `p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n`. `ndim` is
/// PyTorch's, which equals Burn's for every parameter except the scalars `logit_scale` and
/// `logit_bias` (0-d there, `[1]` here); both are below 2 either way.
pub fn decays(name: &str, ndim: usize) -> bool {
    !(ndim < 2 || name.contains("bn") || name.contains("ln") || name.contains("bias") || name.contains("logit_scale"))
}

/// The flat layout of every float parameter of a [`Clip`], in module-visit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    specs: Vec<ParamSpec>,
    total: usize,
}

/// Module path tracking shared by the visitor and the mapper.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn key(&self) -> String {
        openclip_key(&self.0)
    }
}

struct LayoutVisitor {
    path: Path,
    specs: Vec<ParamSpec>,
    total: usize,
}

impl ModuleVisitor for LayoutVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.lazy_shape().dims::<D>().to_vec();
        let len = shape.iter().product();
        let name = self.path.key();
        let decay = decays(&name, D);
        self.specs.push(ParamSpec {
            name,
            shape,
            offset: self.total,
            len,
            decay,
            trainable: true,
        });
        self.total += len;
    }
}

impl ParamLayout {
    /// The layout of `model`'s parameters.
    pub fn of(model: &Clip) -> ParamLayout {
        let mut v = LayoutVisitor {
            path: Path::default(),
            specs: Vec::new(),
            total: 0,
        };
        model.visit(&mut v);
        ParamLayout {
            specs: v.specs,
            total: v.total,
        }
    }

    /// Every parameter, in buffer order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Mark the parameters `locking` freezes as not trainable (towers of as many blocks as the
    /// layout's names show).
    pub fn lock(&mut self, locking: &Locking) {
        let blocks = |prefix: &str| {
            self.specs
                .iter()
                .filter_map(|s| s.name.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
                .max()
                .map_or(0, |i| i + 1)
        };
        let (vision, text) = (blocks("visual.transformer.resblocks."), blocks("transformer.resblocks."));
        for s in &mut self.specs {
            s.trainable = locking.trainable(&s.name, vision, text);
        }
    }

    /// The element ranges of trainable parameters, adjacent ones merged, in buffer order.
    pub fn trainable_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        for s in self.specs.iter().filter(|s| s.trainable) {
            match out.last_mut() {
                Some(r) if r.end == s.offset => r.end = s.offset + s.len,
                _ => out.push(s.offset..s.offset + s.len),
            }
        }
        out
    }

    /// The parameter called `name` (OpenCLIP spelling).
    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// A hash of names and shapes: two workers with the same fingerprint can exchange flat
    /// buffers and optimizer state.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv::new();
        for s in &self.specs {
            h.bytes(s.name.as_bytes());
            h.word(s.shape.len() as u64);
            for &d in &s.shape {
                h.word(d as u64);
            }
        }
        h.finish()
    }
}

/// FNV-1a, 64 bit: stable across processes, builds and platforms (unlike `DefaultHasher`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Fnv {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ x as u64).wrapping_mul(Self::PRIME);
        }
    }
    pub(crate) fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(Self::PRIME);
    }
    pub(crate) fn finish(self) -> u64 {
        self.0
    }
}

/// Checksum of a flat parameter buffer: FNV-1a over the f32 bit patterns (one 32-bit word per
/// step), so equal checksums mean bit-identical parameters, and `-0.0`/`0.0` or two NaNs with
/// different payloads differ, as they would in the next step.
pub fn checksum(values: &[f32]) -> u64 {
    let mut h = Fnv::new();
    for v in values {
        h.word(v.to_bits() as u64);
    }
    h.word(values.len() as u64);
    h.finish()
}

fn host_values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    t.try_into_vec_as::<f32>().map_err(|e| format!("reading a tensor back: {e:?}"))
}

struct ValueReader<'a> {
    layout: &'a ParamLayout,
    index: usize,
    out: Vec<f32>,
    error: Option<String>,
}

impl ModuleVisitor for ValueReader<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let i = self.index;
        self.index += 1;
        let Some(spec) = self.layout.specs.get(i) else {
            self.error.get_or_insert_with(|| "model has more parameters than its layout".into());
            return;
        };
        match host_values(param.val()) {
            Ok(v) if v.len() == spec.len => self.out[spec.offset..spec.offset + spec.len].copy_from_slice(&v),
            Ok(v) => {
                self.error
                    .get_or_insert_with(|| format!("{}: {} values, layout says {}", spec.name, v.len(), spec.len));
            }
            Err(e) => {
                self.error.get_or_insert_with(|| format!("{}: {e}", spec.name));
            }
        }
    }
}

/// Copy every parameter of `model` into one buffer laid out as `layout`.
pub fn read_values(model: &Clip, layout: &ParamLayout) -> Result<Vec<f32>, String> {
    let mut r = ValueReader {
        layout,
        index: 0,
        out: vec![0.0; layout.total],
        error: None,
    };
    model.visit(&mut r);
    match r.error {
        Some(e) => Err(e),
        None => Ok(r.out),
    }
}

struct GradReader<'a> {
    layout: &'a ParamLayout,
    grads: &'a Gradients,
    index: usize,
    out: &'a mut [f32],
    error: Option<String>,
}

impl ModuleVisitor for GradReader<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let i = self.index;
        self.index += 1;
        let Some(spec) = self.layout.specs.get(i) else {
            self.error.get_or_insert_with(|| "model has more parameters than its layout".into());
            return;
        };
        let dst = &mut self.out[spec.offset..spec.offset + spec.len];
        // A parameter the loss does not reach (e.g. `logit_bias` under ClipLoss) has no
        // gradient: it counts as zero, which leaves AdamW's update of it at zero too.
        let Some(g) = param.val().grad(self.grads) else {
            dst.fill(0.0);
            return;
        };
        match host_values(g) {
            Ok(v) if v.len() == spec.len => dst.copy_from_slice(&v),
            Ok(v) => {
                self.error
                    .get_or_insert_with(|| format!("{}: gradient of {} values, expected {}", spec.name, v.len(), spec.len));
            }
            Err(e) => {
                self.error.get_or_insert_with(|| format!("{}: {e}", spec.name));
            }
        }
    }
}

/// Add nothing, overwrite: write the gradient of every parameter of `model` from `grads` into
/// `out` (zeros where a parameter has none).
pub fn read_grads(model: &Clip, layout: &ParamLayout, grads: &Gradients, out: &mut [f32]) -> Result<(), String> {
    if out.len() != layout.total {
        return Err(format!("gradient buffer has {} values, layout {}", out.len(), layout.total));
    }
    let mut r = GradReader {
        layout,
        grads,
        index: 0,
        out,
        error: None,
    };
    model.visit(&mut r);
    match r.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct Writer<'a> {
    layout: &'a ParamLayout,
    values: &'a [f32],
    device: &'a Device,
    path: Path,
    index: usize,
    error: Option<String>,
}

impl ModuleMapper for Writer<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let i = self.index;
        self.index += 1;
        let spec = match self.layout.specs.get(i) {
            Some(s) if s.name == self.path.key() && s.shape.len() == D => s,
            _ => {
                self.error
                    .get_or_insert_with(|| format!("parameter {} does not match the layout", self.path.key()));
                return param;
            }
        };
        let data = TensorData::new(self.values[spec.offset..spec.offset + spec.len].to_vec(), spec.shape.clone());
        // A fresh leaf that requires grad on the autodiff device: the next forward records
        // a new graph from it. A locked parameter is a constant, so no backward reaches it.
        let tensor = Tensor::<D>::from_data(data, self.device);
        let tensor = if spec.trainable { tensor.require_grad() } else { tensor };
        Param::initialized(param.id, tensor)
    }
}

/// Replace every parameter of `model` by its slice of `values`, as a leaf requiring grad on
/// `device` (an autodiff device). Parameter ids are kept.
pub fn write_values(model: Clip, layout: &ParamLayout, values: &[f32], device: &Device) -> Result<Clip, String> {
    if values.len() != layout.total {
        return Err(format!("parameter buffer has {} values, layout {}", values.len(), layout.total));
    }
    let mut w = Writer {
        layout,
        values,
        device,
        path: Path::default(),
        index: 0,
        error: None,
    };
    let model = model.map(&mut w);
    match w.error {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_follows_open_clip_main_py() {
        assert!(decays("visual.conv1.weight", 4));
        assert!(decays("visual.transformer.resblocks.0.attn.in_proj_weight", 2));
        assert!(decays("positional_embedding", 2));
        assert!(decays("token_embedding.weight", 2));
        assert!(decays("text_projection", 2));
        assert!(decays("visual.proj", 2));
        assert!(!decays("visual.class_embedding", 1));
        assert!(!decays("visual.transformer.resblocks.0.attn.in_proj_bias", 1));
        assert!(!decays("visual.ln_pre.weight", 1));
        assert!(!decays("ln_final.weight", 1));
        assert!(!decays("logit_scale", 1));
        // A matrix whose name contains "ln" or "bias" is exempt too: the rule is by name.
        assert!(!decays("some.ln_proj.weight", 2));
    }

    #[test]
    fn checksum_sees_every_bit() {
        let a = [1.0f32, 2.0, 3.0];
        assert_eq!(checksum(&a), checksum(&[1.0, 2.0, 3.0]));
        assert_ne!(checksum(&a), checksum(&[1.0, 2.0, f32::from_bits(3.0f32.to_bits() + 1)]));
        assert_ne!(checksum(&[0.0]), checksum(&[-0.0]));
        assert_ne!(checksum(&[]), checksum(&[0.0]));
    }
}
