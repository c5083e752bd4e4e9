//! `train.precision = "bf16"`: mixed precision with fp32 master weights. One step of the
//! OpenCLIP step fixture in bf16 against the same step in fp32, on every backend this build
//! has (flex always; libtorch CPU in `tch` builds; CUDA is checked on a GPU, BENCHMARKS.md).

mod common;

use burn::tensor::Device;
use common::*;
use distclip_config::Precision;
use distclip_worker::{SingleProcess, Trainer};

fn devices() -> Vec<(&'static str, Device)> {
    let mut out = vec![("flex", Device::flex())];
    if distclip_model::device::HAS_TCH {
        out.push(("libtorch cpu", distclip_model::device::parse_device("cpu").unwrap()));
    }
    out
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// A value with no bits below bf16's 8-bit mantissa could be a bf16 value.
fn bf16_exact(x: f32) -> bool {
    x.to_bits() & 0xffff == 0
}

#[test]
fn a_bf16_step_is_close_to_fp32_and_keeps_fp32_master_weights() {
    let batch = &batches()[0];
    for (name, device) in devices() {
        let trainer = |p: Precision| Trainer::new(init_model(&device), optim_config(), &device).unwrap().with_precision(p);
        let (mut full, mut mixed) = (trainer(Precision::Fp32), trainer(Precision::Bf16));
        let a = full.forward_backward(batch.local(), &mut SingleProcess).unwrap();
        let b = mixed.forward_backward(batch.local(), &mut SingleProcess).unwrap();

        // The towers really ran in bf16: the loss and gradients differ from fp32 ...
        assert_ne!(a.loss(), b.loss(), "{name}: bf16 loss is bit-identical to fp32");
        assert_ne!(a.grads(), b.grads(), "{name}: bf16 gradients are bit-identical to fp32");
        // ... by bf16 rounding (8 mantissa bits, relative 4e-3 per operation), not more.
        let (full_loss, mixed_loss) = (a.loss(), b.loss());
        let rel = ((a.loss() - b.loss()) / a.loss()).abs();
        assert!(rel < 2e-2, "{name}: loss fp32 {} vs bf16 {} ({rel:e})", a.loss(), b.loss());
        let cos = cosine(a.grads(), b.grads());
        assert!(cos > 0.99, "{name}: gradient cosine similarity {cos}");
        let norm = (a.grad_norm() - b.grad_norm()).abs() / a.grad_norm();
        assert!(norm < 5e-2, "{name}: gradient norm fp32 {} vs bf16 {}", a.grad_norm(), b.grad_norm());

        // The update lands in fp32 master weights: after AdamW most values carry more
        // precision than bf16 has (all would be bf16 values if the weights were kept in bf16).
        full.apply(a).unwrap();
        mixed.apply(b).unwrap();
        let params = mixed.params();
        let finer = params.iter().filter(|x| !bf16_exact(**x)).count();
        assert!(finer > params.len() * 9 / 10, "{name}: only {finer} of {} parameters finer than bf16", params.len());
        // And the step moved them as the fp32 step did, to within bf16's rounding.
        let start = trainer(Precision::Fp32);
        let delta = |t: &Trainer| -> Vec<f32> { t.params().iter().zip(start.params()).map(|(p, s)| p - s).collect() };
        let update_cos = cosine(&delta(&full), &delta(&mixed));
        println!(
            "{name}: loss fp32 {} bf16 {} (rel {rel:.1e}); gradient cosine {cos:.6}, norm rel {norm:.1e}; \
             update cosine {update_cos:.4}; {finer} of {} parameters finer than bf16",
            full_loss, mixed_loss, params.len()
        );
        let cos = update_cos;
        assert!(cos > 0.95, "{name}: update cosine similarity {cos}");
    }
}
