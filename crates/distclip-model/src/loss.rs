//! Contrastive losses: OpenCLIP's `ClipLoss` (symmetric InfoNCE) and `SigLipLoss` (`loss.py`).
//!
//! Both come in the per-rank *row* form of DESIGN.md: a rank holds `b` local rows and the
//! features of the whole global batch (`N = W·b` rows, its own at `offset..offset+b`), and
//! computes the loss of its own rows against every column. With `offset = 0` and local = all,
//! this is the single-process loss. Inputs are expected L2-normalised; `scale` is the already
//! exponentiated `logit_scale` (shape `[1]`), as OpenCLIP's model returns it.

use burn::tensor::activation::{log_sigmoid, log_softmax};
use burn::tensor::{Int, Tensor};

/// Mean cross-entropy of `logits` `[b, n]` against class `labels` `[b]`.
fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let b = logits.dims()[0];
    let picked = log_softmax(logits, 1).gather(1, labels.reshape([b, 1]));
    picked.mean().neg()
}

/// OpenCLIP `ClipLoss` with `local_loss=True`: logits of the local rows against all columns,
/// labels `offset + i`, the mean of the image->text and text->image cross-entropies.
///
/// Summed over ranks and divided by the world size, its gradient is the gradient of the
/// full-batch loss (the setting OpenCLIP uses for all released models).
pub fn clip_loss_local(
    image_local: Tensor<2>,
    text_local: Tensor<2>,
    image_all: Tensor<2>,
    text_all: Tensor<2>,
    scale: Tensor<1>,
    offset: usize,
) -> Tensor<1> {
    let b = image_local.dims()[0];
    let device = image_local.device();
    let s = scale.unsqueeze::<2>();
    let logits_per_image = image_local.matmul(text_all.transpose()) * s.clone();
    let logits_per_text = text_local.matmul(image_all.transpose()) * s;
    let labels = Tensor::<1, Int>::arange(offset as i64..(offset + b) as i64, &device);
    (cross_entropy(logits_per_image, labels.clone()) + cross_entropy(logits_per_text, labels)) / 2.0
}

/// OpenCLIP `ClipLoss` on one process: the full `N x N` symmetric InfoNCE.
pub fn clip_loss(image: Tensor<2>, text: Tensor<2>, scale: Tensor<1>) -> Tensor<1> {
    clip_loss_local(image.clone(), text.clone(), image, text, scale, 0)
}

/// OpenCLIP `SigLipLoss` for the local rows: `-sum(log_sigmoid(y * (s * x·tᵀ + bias))) / b`
/// with `y = +1` on the matching pair (column `offset + i`) and `-1` elsewhere.
pub fn siglip_loss_local(
    image_local: Tensor<2>,
    text_all: Tensor<2>,
    scale: Tensor<1>,
    bias: Tensor<1>,
    offset: usize,
) -> Tensor<1> {
    let [b, _] = image_local.dims();
    let n = text_all.dims()[0];
    let device = image_local.device();
    let logits = image_local.matmul(text_all.transpose()) * scale.unsqueeze::<2>() + bias.unsqueeze::<2>();
    // labels = 2·[col == offset + row] - 1
    let cols = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]).expand([b, n]);
    let rows = Tensor::<1, Int>::arange(offset as i64..(offset + b) as i64, &device)
        .reshape([b, 1])
        .expand([b, n]);
    let labels = cols.equal(rows).float() * 2.0 - 1.0;
    log_sigmoid(labels * logits).sum().neg() / b as f64
}

/// OpenCLIP `SigLipLoss` on one process (`world_size = 1`).
pub fn siglip_loss(image: Tensor<2>, text: Tensor<2>, scale: Tensor<1>, bias: Tensor<1>) -> Tensor<1> {
    siglip_loss_local(image, text, scale, bias, 0)
}
