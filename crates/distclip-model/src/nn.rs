//! The building blocks both towers share, named field for field after OpenCLIP's
//! `transformer.py` so that a Burn module path maps one-to-one onto an OpenCLIP state-dict key
//! (see [`crate::checkpoint`]).

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::module::{attention, layer_norm, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};

/// `nn.Linear`. The weight is stored `[d_in, d_out]` (Burn's layout, no transpose per
/// forward); checkpoint I/O transposes to and from PyTorch's `[d_out, d_in]`.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<2>>,
    /// `[d_out]`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// A linear layer with the given initialisers (`bias: None` builds no bias).
    pub fn new(
        d_in: usize,
        d_out: usize,
        weight: Initializer,
        bias: Option<Initializer>,
        device: &Device,
    ) -> Self {
        Self {
            weight: weight.init_with([d_in, d_out], Some(d_in), Some(d_out), device),
            bias: bias.map(|b| b.init_with([d_out], Some(d_in), Some(d_out), device)),
        }
    }

    /// `x @ W + b` over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// PyTorch's default `nn.Linear` / `nn.Conv2d` initialisation, `U(±1/sqrt(fan_in))`.
pub(crate) fn torch_default_init() -> Initializer {
    Initializer::KaimingUniform {
        gain: 1.0 / 3f64.sqrt(),
        fan_out_only: false,
    }
}

/// `nn.LayerNorm` with PyTorch's parameter names and epsilon (1e-5).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale, `[d]`.
    pub weight: Param<Tensor<1>>,
    /// Shift, `[d]`.
    pub bias: Param<Tensor<1>>,
}

impl LayerNorm {
    /// Ones and zeros, as PyTorch initialises it.
    pub fn new(d: usize, device: &Device) -> Self {
        Self {
            weight: Initializer::Ones.init([d], device),
            bias: Initializer::Zeros.init([d], device),
        }
    }

    /// Normalise over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.weight.val(), Some(self.bias.val()), 1e-5)
    }
}

/// OpenCLIP's `LayerScale`: a learned per-channel gain on a residual branch.
#[derive(Module, Debug)]
pub struct LayerScale {
    /// `[d]`, initialised to `ls_init_value`.
    pub gamma: Param<Tensor<1>>,
}

impl LayerScale {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        x * self.gamma.val().unsqueeze::<3>()
    }
}

/// GELU flavour of a tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU, `nn.GELU()`.
    Gelu,
    /// OpenAI's `x * sigmoid(1.702 x)`.
    QuickGelu,
}

impl Activation {
    fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Gelu => gelu(x),
            Activation::QuickGelu => x.clone() * sigmoid(x * 1.702),
        }
    }
}

/// `nn.MultiheadAttention` with the fused `in_proj` (q, k, v stacked along the output).
#[derive(Module, Debug)]
pub struct Attention {
    /// `[d, 3d]`: q, k, v projections side by side, as `in_proj_weight` stacks them.
    pub in_proj: Linear,
    /// Output projection `[d, d]`.
    pub out_proj: Linear,
    heads: usize,
}

impl Attention {
    /// Self-attention over `x` of shape `[batch, seq, d]`.
    pub fn forward(&self, x: Tensor<3>, causal: bool) -> Tensor<3> {
        let [b, l, d] = x.dims();
        let hd = d / self.heads;
        let qkv = self.in_proj.forward(x);
        let split = |i: usize| {
            qkv.clone()
                .narrow(2, i * d, d)
                .reshape([b, l, self.heads, hd])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        };
        let out = attention(q, k, v, None, None, options);
        self.out_proj.forward(out.swap_dims(1, 2).reshape([b, l, d]))
    }
}

/// The MLP of a block: `c_fc` -> activation -> `c_proj`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `[d, hidden]`.
    pub c_fc: Linear,
    /// `[hidden, d]`.
    pub c_proj: Linear,
}

/// OpenCLIP's pre-norm `ResidualAttentionBlock`.
#[derive(Module, Debug)]
pub struct ResidualAttentionBlock {
    /// Norm before attention.
    pub ln_1: LayerNorm,
    /// Self-attention.
    pub attn: Attention,
    /// Optional LayerScale on the attention branch.
    pub ls_1: Option<LayerScale>,
    /// Norm before the MLP.
    pub ln_2: LayerNorm,
    /// Feed-forward branch.
    pub mlp: Mlp,
    /// Optional LayerScale on the MLP branch.
    pub ls_2: Option<LayerScale>,
    #[module(skip)]
    act: ActivationKind,
}

/// Serialisable stand-in for [`Activation`] inside a module (Burn modules need `Clone + Debug`
/// fields; a plain bool keeps it trivially so).
#[derive(Debug, Clone, Copy, Default)]
struct ActivationKind(bool);

/// How to initialise a stack of blocks: OpenCLIP's text tower re-initialises its blocks with
/// normal distributions, its vision tower keeps PyTorch's defaults.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BlockInit {
    /// `nn.MultiheadAttention` / `nn.Linear` defaults (xavier in_proj, kaiming elsewhere).
    TorchDefault,
    /// `TextTransformer.init_parameters`: normal with attn/proj/fc stds.
    Text,
}

impl ResidualAttentionBlock {
    fn forward(&self, x: Tensor<3>, causal: bool) -> Tensor<3> {
        let act = if self.act.0 {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        };
        let mut a = self.attn.forward(self.ln_1.forward(x.clone()), causal);
        if let Some(ls) = &self.ls_1 {
            a = ls.forward(a);
        }
        let x = x + a;
        let h = self.ln_2.forward(x.clone());
        let mut m = self.mlp.c_proj.forward(act.forward(self.mlp.c_fc.forward(h)));
        if let Some(ls) = &self.ls_2 {
            m = ls.forward(m);
        }
        x + m
    }
}

/// A stack of residual attention blocks (OpenCLIP `Transformer`).
#[derive(Module, Debug)]
pub struct Transformer {
    /// The blocks, in order.
    pub resblocks: Vec<ResidualAttentionBlock>,
}

/// Shape of a [`Transformer`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransformerShape {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_width: usize,
    pub ls_init_value: Option<f64>,
    pub act: Activation,
}

impl Transformer {
    pub(crate) fn new(shape: TransformerShape, init: BlockInit, device: &Device) -> Self {
        let d = shape.width;
        let h = shape.mlp_width;
        let default = torch_default_init;
        let normal = |std: f64| Initializer::Normal { mean: 0.0, std };
        let (in_w, out_w, fc_w, proj_w) = match init {
            BlockInit::TorchDefault => (
                Initializer::XavierUniform { gain: 1.0 },
                default(),
                default(),
                default(),
            ),
            BlockInit::Text => {
                let attn_std = (d as f64).powf(-0.5);
                let proj_std = attn_std * ((2 * shape.layers) as f64).powf(-0.5);
                let fc_std = ((2 * d) as f64).powf(-0.5);
                (normal(attn_std), normal(proj_std), normal(fc_std), normal(proj_std))
            }
        };
        let ls = |v: Option<f64>| {
            v.map(|value| LayerScale {
                gamma: Initializer::Constant { value }.init([d], device),
            })
        };
        let resblocks = (0..shape.layers)
            .map(|_| {
                // Xavier on in_proj uses fan_in = d, fan_out = 3d, as PyTorch computes it on the
                // [3d, d] matrix; Linear::new passes exactly those fans.
                ResidualAttentionBlock {
                    ln_1: LayerNorm::new(d, device),
                    attn: Attention {
                        in_proj: Linear::new(d, 3 * d, in_w.clone(), Some(Initializer::Zeros), device),
                        out_proj: Linear::new(d, d, out_w.clone(), Some(Initializer::Zeros), device),
                        heads: shape.heads,
                    },
                    ls_1: ls(shape.ls_init_value),
                    ln_2: LayerNorm::new(d, device),
                    mlp: Mlp {
                        c_fc: Linear::new(d, h, fc_w.clone(), Some(default()), device),
                        c_proj: Linear::new(h, d, proj_w.clone(), Some(default()), device),
                    },
                    ls_2: ls(shape.ls_init_value),
                    act: ActivationKind(shape.act == Activation::QuickGelu),
                }
            })
            .collect();
        Self { resblocks }
    }

    /// Run every block over `x` of shape `[batch, seq, width]`.
    pub fn forward(&self, mut x: Tensor<3>, causal: bool) -> Tensor<3> {
        for block in &self.resblocks {
            x = block.forward(x, causal);
        }
        x
    }
}
