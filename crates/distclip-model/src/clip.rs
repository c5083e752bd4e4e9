//! OpenCLIP's `CLIP` class (`model.py`): the image tower, the text tower flattened into the
//! top level exactly as OpenCLIP lays it out (`transformer`, `token_embedding`, ...), and the
//! learned temperature.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::Initializer;
use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor};

use crate::config::{ClipConfig, mlp_width};
use crate::nn::{Activation, BlockInit, LayerNorm, Linear, Transformer, TransformerShape};
use crate::vision::VisionTransformer;

/// `text_projection`: a raw `[width, embed_dim]` matrix, or an `nn.Linear` with bias when
/// `text_cfg.proj_bias` is set.
#[derive(Module, Debug)]
pub enum TextProjection {
    /// `x @ text_projection`.
    Matrix(Param<Tensor<2>>),
    /// `nn.Linear(width, embed_dim)`.
    Linear(Linear),
}

/// A CLIP model. Field names are OpenCLIP's state-dict names.
#[derive(Module, Debug)]
pub struct Clip {
    /// Image tower.
    pub visual: VisionTransformer,
    /// Text transformer blocks.
    pub transformer: Transformer,
    /// `[vocab_size, width]`.
    pub token_embedding: TokenEmbedding,
    /// `[context_length, width]`.
    pub positional_embedding: Param<Tensor<2>>,
    /// Final text norm.
    pub ln_final: LayerNorm,
    /// Text projection to the joint space.
    pub text_projection: TextProjection,
    /// Log temperature, shape `[1]` (OpenCLIP stores it 0-d; checkpoint I/O converts).
    pub logit_scale: Param<Tensor<1>>,
    /// SigLIP bias, shape `[1]`, when the config asks for one.
    pub logit_bias: Option<Param<Tensor<1>>>,
    text_causal: bool,
    #[module(skip)]
    text_pool: TextPool,
    text_eos_id: i64,
    text_final_ln_after_pool: bool,
}

/// `nn.Embedding` (field `weight`, as OpenCLIP's `token_embedding.weight`).
#[derive(Module, Debug)]
pub struct TokenEmbedding {
    /// `[vocab_size, width]`.
    pub weight: Param<Tensor<2>>,
}

/// How the text tower picks one position per sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TextPool {
    /// The position of the highest token id (EOT, 49407, in the CLIP vocabulary).
    #[default]
    Argmax,
    /// Position 0.
    First,
    /// The last position.
    Last,
    /// The first position holding `eos_id`.
    Eos,
}

impl ClipConfig {
    /// Build a freshly initialised model with OpenCLIP's initialisation scheme. Seed the
    /// device (`device.seed(s)`) first for a reproducible init: the same seed gives the same
    /// weights whichever code path builds the model.
    pub fn init(&self, device: &Device) -> Clip {
        let clip = self.init_lazy(device);
        // Burn draws a parameter's values when it is first read, from one global RNG, so the
        // draw would depend on the order in which the caller happens to touch parameters
        // (`distclip init` saving them, a worker moving them to autodiff). Draw them all now,
        // in declaration order.
        clip.visit(&mut Materialise);
        clip
    }

    fn init_lazy(&self, device: &Device) -> Clip {
        let t = &self.text_cfg;
        let act = if self.quick_gelu {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        };
        let shape = TransformerShape {
            width: t.width,
            layers: t.layers,
            heads: t.heads,
            mlp_width: mlp_width(t.width, t.mlp_ratio),
            ls_init_value: t.ls_init_value,
            act,
        };
        let proj_std = (t.width as f64).powf(-0.5);
        let normal = |std: f64| Initializer::Normal { mean: 0.0, std };
        let text_projection = if t.proj_bias {
            TextProjection::Linear(Linear::new(
                t.width,
                self.embed_dim,
                normal(proj_std),
                Some(Initializer::Zeros),
                device,
            ))
        } else {
            TextProjection::Matrix(normal(proj_std).init([t.width, self.embed_dim], device))
        };
        let init_scale = self.init_logit_scale.unwrap_or((1.0f64 / 0.07).ln());
        Clip {
            visual: VisionTransformer::new(self, device),
            transformer: Transformer::new(shape, BlockInit::Text, device),
            token_embedding: TokenEmbedding {
                weight: normal(0.02).init([t.vocab_size, t.width], device),
            },
            positional_embedding: normal(0.01).init([t.context_length, t.width], device),
            ln_final: LayerNorm::new(t.width, device),
            text_projection,
            logit_scale: Initializer::Constant { value: init_scale }.init([1], device),
            logit_bias: self
                .init_logit_bias
                .map(|value| Initializer::Constant { value }.init([1], device)),
            text_causal: !t.no_causal_mask,
            text_pool: match t.pool_type.as_str() {
                "first" => TextPool::First,
                "last" => TextPool::Last,
                "eos" => TextPool::Eos,
                _ => TextPool::Argmax,
            },
            text_eos_id: t.eos_id,
            text_final_ln_after_pool: t.final_ln_after_pool,
        }
    }
}

/// Reads every float parameter once, which makes Burn run its pending initialiser.
struct Materialise;

impl ModuleVisitor for Materialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// L2-normalise rows (`F.normalize(x, dim=-1)`, eps 1e-12).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

impl Clip {
    /// Unnormalised image features `[B, embed_dim]` from preprocessed images `[B, 3, S, S]`.
    pub fn encode_image(&self, images: Tensor<4>) -> Tensor<2> {
        self.visual.forward(images)
    }

    /// Image features with only the patches `keep` `[B, K]` names (patch dropout in training;
    /// `None` keeps all), see [`crate::patch_dropout`].
    pub fn encode_image_kept(&self, images: Tensor<4>, keep: Option<Tensor<2, Int>>) -> Tensor<2> {
        self.visual.forward_kept(images, keep)
    }

    /// Unnormalised text features `[B, embed_dim]` from token ids `[B, context_length]`.
    pub fn encode_text(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [b, l] = tokens.dims();
        let x = embedding(self.token_embedding.weight.val(), tokens.clone());
        let pos = self.positional_embedding.val().narrow(0, 0, l);
        let x = self.transformer.forward(x + pos.unsqueeze::<3>(), self.text_causal);
        let width = x.dims()[2];
        let pooled = if self.text_final_ln_after_pool {
            self.ln_final.forward(self.pool_text(x, tokens, b, l, width))
        } else {
            self.pool_text(self.ln_final.forward(x), tokens, b, l, width)
        };
        match &self.text_projection {
            TextProjection::Matrix(p) => pooled.matmul(p.val()),
            TextProjection::Linear(lin) => lin.forward(pooled),
        }
    }

    fn pool_text(&self, x: Tensor<3>, tokens: Tensor<2, Int>, b: usize, l: usize, w: usize) -> Tensor<2> {
        let index: Tensor<2, Int> = match self.text_pool {
            TextPool::Argmax => tokens.argmax(1),
            TextPool::First => Tensor::zeros([b, 1], &x.device()),
            TextPool::Last => Tensor::full([b, 1], (l - 1) as i64, &x.device()),
            TextPool::Eos => tokens.equal_elem(self.text_eos_id).int().argmax(1),
        };
        let index = index.reshape([b, 1, 1]).expand([b, 1, w]);
        x.gather(1, index).reshape([b, w])
    }

    /// `exp(logit_scale)` as a scalar on the host.
    pub fn logit_scale_exp(&self) -> f32 {
        self.logit_scale.val().exp().into_scalar::<f32>()
    }

    /// Context length the text tower was built for.
    pub fn context_length(&self) -> usize {
        self.positional_embedding.dims()[0]
    }

    /// Input resolution of the image tower.
    pub fn image_size(&self) -> usize {
        self.visual.image_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{StateDict, state_dict};

    fn values(s: &StateDict) -> Vec<(String, Vec<f32>)> {
        s.iter().map(|(k, t)| (k.clone(), t.data.clone())).collect()
    }

    /// The weights of a seed do not depend on which parameter the caller reads first.
    #[test]
    fn a_seed_gives_the_same_weights_whatever_is_read_first() {
        let cfg = ClipConfig::from_name_or_path("tiny").unwrap();
        let device = crate::device::parse_device("flex").unwrap();
        device.seed(7);
        let in_order = values(&state_dict(&cfg.init(&device)));
        device.seed(7);
        let model = cfg.init(&device);
        // Touch late parameters first, as a caller with another visiting order would.
        let _ = model.logit_scale.val();
        let _ = model.positional_embedding.val();
        let out_of_order = values(&state_dict(&model));
        assert_eq!(in_order, out_of_order);
        device.seed(8);
        let other_seed = values(&state_dict(&cfg.init(&device)));
        assert_ne!(in_order, other_seed);
    }
}
