//! The ViT image tower, OpenCLIP's `VisionTransformer` (`transformer.py`).

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Int, Tensor};

use crate::config::{ClipConfig, mlp_width};
use crate::patch_dropout::drop_patches;
use crate::nn::{Activation, BlockInit, LayerNorm, Transformer, TransformerShape, torch_default_init};

/// The convolutional patch stem (`conv1`, no bias). Stride equals kernel, so it is computed as
/// a reshape into patches and one matmul, which is both exact and faster than a generic conv.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// `[width, 3, patch, patch]`, PyTorch's conv weight layout.
    pub weight: Param<Tensor<4>>,
}

impl PatchEmbed {
    /// `[B, 3, H, W]` -> `[B, grid*grid, width]`, patches in row-major order like `conv1` then
    /// `reshape(B, width, -1).permute(0, 2, 1)`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<3> {
        let [width, c, p, _] = self.weight.dims();
        let [b, _, h, w] = images.dims();
        let (gh, gw) = (h / p, w / p);
        let patches = images
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let weight = self.weight.val().reshape([width, c * p * p]).transpose();
        patches.matmul(weight.unsqueeze::<3>())
    }
}

/// The image tower.
#[derive(Module, Debug)]
pub struct VisionTransformer {
    /// Patch embedding.
    pub conv1: PatchEmbed,
    /// Learned class token, `[width]`.
    pub class_embedding: Param<Tensor<1>>,
    /// `[grid*grid + 1, width]`.
    pub positional_embedding: Param<Tensor<2>>,
    /// Norm before the blocks (absent with `no_ln_pre`).
    pub ln_pre: Option<LayerNorm>,
    /// The blocks.
    pub transformer: Transformer,
    /// Final norm.
    pub ln_post: LayerNorm,
    /// Projection to the joint space, `[width, embed_dim]` (used as `x @ proj`).
    pub proj: Param<Tensor<2>>,
    image_size: usize,
    patch_dropout: f64,
    avg_pool: bool,
    final_ln_after_pool: bool,
}

impl VisionTransformer {
    /// Build with OpenCLIP's initialisation (its `VisionTransformer` keeps PyTorch defaults for
    /// the blocks; embeddings and `proj` are `width^-0.5 * randn`).
    pub fn new(cfg: &ClipConfig, device: &Device) -> Self {
        let v = &cfg.vision_cfg;
        let scale = (v.width as f64).powf(-0.5);
        let normal = Initializer::Normal {
            mean: 0.0,
            std: scale,
        };
        let g = cfg.grid_size();
        let fan_in = 3 * v.patch_size * v.patch_size;
        let shape = TransformerShape {
            width: v.width,
            layers: v.layers,
            heads: cfg.vision_heads(),
            mlp_width: mlp_width(v.width, v.mlp_ratio),
            ls_init_value: v.ls_init_value,
            act: if cfg.quick_gelu {
                Activation::QuickGelu
            } else {
                Activation::Gelu
            },
        };
        Self {
            conv1: PatchEmbed {
                weight: torch_default_init().init_with(
                    [v.width, 3, v.patch_size, v.patch_size],
                    Some(fan_in),
                    Some(v.width * v.patch_size * v.patch_size),
                    device,
                ),
            },
            class_embedding: normal.init([v.width], device),
            positional_embedding: normal.init([g * g + 1, v.width], device),
            ln_pre: (!v.no_ln_pre).then(|| LayerNorm::new(v.width, device)),
            transformer: Transformer::new(shape, BlockInit::TorchDefault, device),
            ln_post: LayerNorm::new(v.width, device),
            proj: normal.init([v.width, cfg.embed_dim], device),
            image_size: v.image_size,
            patch_dropout: v.patch_dropout,
            avg_pool: v.pool_type == "avg",
            final_ln_after_pool: v.final_ln_after_pool,
        }
    }

    /// Square input size the tower expects.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Patch tokens per image (`grid * grid`).
    pub fn num_patches(&self) -> usize {
        self.positional_embedding.lazy_shape().dims::<2>()[0] - 1
    }

    /// Fraction of patches dropped in training (0: none).
    pub fn patch_dropout(&self) -> f64 {
        self.patch_dropout
    }

    /// Unnormalised image features `[B, embed_dim]` from preprocessed images `[B, 3, S, S]`,
    /// every patch kept (evaluation, or training without patch dropout).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward_kept(images, None)
    }

    /// As [`VisionTransformer::forward`], keeping only the patches `keep` `[B, K]` names
    /// (see [`crate::patch_dropout`]); `None` keeps all.
    pub fn forward_kept(&self, images: Tensor<4>, keep: Option<Tensor<2, Int>>) -> Tensor<2> {
        let x = self.conv1.forward(images);
        let [b, _, width] = x.dims();
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, width])
            .expand([b, 1, width]);
        let mut x = Tensor::cat(vec![cls, x], 1) + self.positional_embedding.val().unsqueeze::<3>();
        if let Some(keep) = keep {
            x = drop_patches(x, keep);
        }
        if let Some(ln) = &self.ln_pre {
            x = ln.forward(x);
        }
        let x = self.transformer.forward(x, false);
        let pooled = if self.final_ln_after_pool {
            self.ln_post.forward(self.pool(x))
        } else {
            self.pool(self.ln_post.forward(x))
        };
        pooled.matmul(self.proj.val())
    }

    fn pool(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, l, w] = x.dims();
        if self.avg_pool {
            x.narrow(1, 1, l - 1).mean_dim(1).reshape([b, w])
        } else {
            x.narrow(1, 0, 1).reshape([b, w])
        }
    }
}
