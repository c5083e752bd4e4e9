//! The optimizer side of OpenCLIP 3.3.0's trainer on flat host buffers: the LR schedules of
//! `open_clip_train/scheduler.py`, `torch.nn.utils.clip_grad_norm_` over all parameters, and
//! `torch.optim.AdamW` (single-tensor path) with f32 state, operation for operation.

use distclip_config::{Loss, Schedule, TrainConfig};

use crate::StepError;
use crate::params::ParamLayout;

/// `math.log(100)`: `logit_scale` is clamped to `[0, LOGIT_SCALE_MAX]` after every step
/// (`open_clip_train/train.py`: "we clamp to 4.6052 = ln(100), as in the original paper").
pub const LOGIT_SCALE_MAX: f32 = 4.605_170_2;

/// Optimizer and schedule hyperparameters of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimConfig {
    /// Peak (base) learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: u64,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Length of the linear cooldown of `const-cooldown`.
    pub cooldown_steps: u64,
    /// Steps of the whole run (the cosine reaches 0 there).
    pub total_steps: u64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon (added after the square root of the bias-corrected second moment).
    pub eps: f64,
    /// Decoupled weight decay for the parameters [`crate::params::decays`] selects.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value before the update.
    pub grad_clip_norm: Option<f64>,
}

impl OptimConfig {
    /// The `[train]` section of a run config, for a run of `total_steps` steps. Refuses what
    /// this step does not implement rather than training something else silently.
    /// (`train.accum_freq` is the caller's: split the local batch into that many micro-batches
    /// for [`crate::Trainer::forward_backward_accum`].)
    pub fn from_train(train: &TrainConfig, total_steps: u64) -> Result<Self, StepError> {
        if train.loss != Loss::Clip {
            return Err(StepError::Unsupported(format!(
                "train.loss = {:?}: the distributed step implements ClipLoss only",
                train.loss
            )));
        }
        Ok(OptimConfig {
            lr: train.lr,
            warmup: train.warmup,
            schedule: train.schedule,
            cooldown_steps: train.cooldown_steps,
            total_steps,
            beta1: train.beta1,
            beta2: train.beta2,
            eps: train.eps,
            weight_decay: train.weight_decay,
            grad_clip_norm: train.grad_clip_norm,
        })
    }

    /// The learning rate of (0-based) step `step`, as `open_clip_train/scheduler.py` computes it
    /// (`train.py` calls `scheduler(step)` before each step).
    pub fn lr_at(&self, step: u64) -> f64 {
        let base = self.lr;
        if step < self.warmup {
            // _warmup_lr: base_lr * (step + 1) / warmup_length
            return base * (step + 1) as f64 / self.warmup as f64;
        }
        match self.schedule {
            Schedule::Const => base,
            Schedule::Cosine => {
                // cosine_lr: e = step - warmup, es = steps - warmup. Python raises on es == 0;
                // a run that long has no step past its end, so any value is moot: take es = 1.
                let e = (step - self.warmup) as f64;
                let es = self.total_steps.saturating_sub(self.warmup).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * base
            }
            Schedule::ConstCooldown => {
                // const_lr_cooldown with cooldown_power = 1, cooldown_end_lr = 0.
                let start = self.total_steps.saturating_sub(self.cooldown_steps);
                if step < start {
                    base
                } else {
                    let e = (step - start) as f64;
                    let es = (self.total_steps - start).max(1) as f64;
                    (1.0 - e / es).max(0.0) * base
                }
            }
        }
    }
}

/// The global L2 norm of a gradient buffer (accumulated in f64).
pub fn global_norm(grads: &[f32]) -> f64 {
    grads.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt()
}

/// `clip_grad_norm_(params, max_norm)` given the precomputed `total_norm`: scale by
/// `max_norm / (total_norm + 1e-6)` when that is below 1. Returns the factor applied.
pub fn clip_by_global_norm(grads: &mut [f32], max_norm: f64, total_norm: f64) -> f32 {
    let coef = max_norm / (total_norm + 1e-6);
    if coef >= 1.0 {
        return 1.0;
    }
    let c = coef as f32;
    for g in grads.iter_mut() {
        *g *= c;
    }
    c
}

/// AdamW state: first and second moments (f32, as PyTorch keeps them for f32 parameters) and
/// the number of updates applied.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// First moment (`exp_avg`).
    pub m: Vec<f32>,
    /// Second moment (`exp_avg_sq`).
    pub v: Vec<f32>,
    /// Updates applied so far (PyTorch's `state_steps`, the same for every parameter here).
    pub step: u64,
}

impl AdamW {
    /// Zero state for `n` parameters.
    pub fn new(n: usize) -> Self {
        AdamW {
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    /// One `torch.optim.AdamW` update at learning rate `lr`, decay per `layout`
    /// (`_single_tensor_adam` with `decoupled_weight_decay=True`; scalars in f64 as Python
    /// computes them, tensor arithmetic in f32 in PyTorch's operand order).
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], layout: &ParamLayout, lr: f64, cfg: &OptimConfig) {
        self.step += 1;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - cfg.beta1.powf(t);
        let bias_correction2 = 1.0 - cfg.beta2.powf(t);
        let step_size = lr / bias_correction1;
        let bc2_sqrt = bias_correction2.sqrt() as f32;
        let neg_step = (-step_size) as f32;
        let w1 = (1.0 - cfg.beta1) as f32;
        let beta2 = cfg.beta2 as f32;
        let w2 = (1.0 - cfg.beta2) as f32;
        let eps = cfg.eps as f32;
        let decay = (1.0 - lr * cfg.weight_decay) as f32;
        // A locked parameter is not in the optimizer at all (OpenCLIP builds its groups from
        // `requires_grad` parameters only): no decay, no moments, no step.
        for spec in layout.specs().iter().filter(|s| s.trainable) {
            let r = spec.offset..spec.offset + spec.len;
            let (p, g) = (&mut params[r.clone()], &grads[r.clone()]);
            let (m, v) = (&mut self.m[r.clone()], &mut self.v[r]);
            // PyTorch skips the decay multiply in a group whose weight_decay is 0.
            let decayed = spec.decay && cfg.weight_decay != 0.0;
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                if decayed {
                    *p *= decay; // param.mul_(1 - lr * weight_decay)
                }
                *m += w1 * (g - *m); // exp_avg.lerp_(grad, 1 - beta1)
                *v = *v * beta2 + w2 * g * g; // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                let denom = v.sqrt() / bc2_sqrt + eps; // (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                *p += neg_step * *m / denom; // param.addcdiv_(exp_avg, denom, value=-step_size)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distclip_model::ClipConfig;

    #[test]
    fn unimplemented_losses_are_refused_not_ignored() {
        let mut t = TrainConfig::default();
        assert!(OptimConfig::from_train(&t, 10).is_ok());
        t.loss = Loss::Siglip;
        let e = OptimConfig::from_train(&t, 10).unwrap_err().to_string();
        assert!(e.contains("train.loss"), "{e}");
    }

    fn cfg(schedule: Schedule) -> OptimConfig {
        OptimConfig {
            lr: 1e-3,
            warmup: 4,
            schedule,
            cooldown_steps: 4,
            total_steps: 12,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
            grad_clip_norm: None,
        }
    }

    #[test]
    fn logit_scale_bound_is_ln_100_in_f32() {
        assert_eq!(LOGIT_SCALE_MAX, 100f64.ln() as f32);
    }

    #[test]
    fn schedules_match_open_clip_scheduler_py() {
        let c = cfg(Schedule::Cosine);
        // Warmup: base * (step + 1) / warmup.
        for (s, want) in [(0, 2.5e-4), (1, 5e-4), (2, 7.5e-4), (3, 1e-3)] {
            assert!((c.lr_at(s) - want).abs() < 1e-15, "step {s}: {}", c.lr_at(s));
        }
        // Cosine: e = 2, es = 8: 0.5 (1 + cos(pi/4)) base.
        let want = 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) * 1e-3;
        assert!((c.lr_at(6) - want).abs() < 1e-15);
        assert!((c.lr_at(8) - 5e-4).abs() < 1e-15);
        assert!(c.lr_at(12).abs() < 1e-15);
        let c = cfg(Schedule::Const);
        assert_eq!(c.lr_at(11), 1e-3);
        // const-cooldown: constant until 12 - 4 = 8, then linear to 0 at 12.
        let c = cfg(Schedule::ConstCooldown);
        assert_eq!(c.lr_at(7), 1e-3);
        assert_eq!(c.lr_at(8), 1e-3);
        assert!((c.lr_at(10) - 5e-4).abs() < 1e-15);
        assert!((c.lr_at(11) - 2.5e-4).abs() < 1e-15);
    }

    #[test]
    fn global_norm_clipping_follows_clip_grad_norm() {
        let mut g = vec![3.0f32, 4.0];
        let n = global_norm(&g);
        assert_eq!(n, 5.0);
        let c = clip_by_global_norm(&mut g, 1.0, n);
        assert!((c - 1.0 / 5.000001).abs() < 1e-9);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut g = vec![0.3f32, 0.4];
        assert_eq!(clip_by_global_norm(&mut g, 1.0, 0.5), 1.0);
        assert_eq!(g, vec![0.3, 0.4]);
    }

    /// Two steps of AdamW on a decayed and a non-decayed parameter, against values computed
    /// by hand (in f64) from PyTorch's formulas.
    #[test]
    fn adamw_matches_hand_computed_values() {
        // One decayed matrix and the (never decayed) logit_scale of a real model's layout.
        let layout = tiny_layout();
        let w = layout.get("visual.proj").unwrap().clone();
        let s = layout.get("logit_scale").unwrap().clone();
        assert!(w.decay && !s.decay);
        let c = cfg(Schedule::Const);
        let mut params = vec![0.5f32; layout.len()];
        let mut grads = vec![0.0f32; layout.len()];
        grads[w.offset] = 0.1;
        grads[s.offset] = -0.2;
        let mut opt = AdamW::new(layout.len());
        let lr1 = 1e-3;
        opt.update(&mut params, &grads, &layout, lr1, &c);

        // Step 1 by hand: m = 0.1 g, v = 0.02 g^2, m_hat = g, v_hat = g^2,
        // p = p (1 - lr wd) - lr g / (|g| + eps).
        let step1 = |p: f64, g: f64, decay: bool| {
            let p = if decay { p * (1.0 - lr1 * 0.2) } else { p };
            p - lr1 * g / (g.abs() + 1e-6)
        };
        let want_w = step1(0.5, 0.1, true);
        let want_s = step1(0.5, -0.2, false);
        assert!((params[w.offset] as f64 - want_w).abs() < 1e-7, "{} vs {want_w}", params[w.offset]);
        assert!((params[s.offset] as f64 - want_s).abs() < 1e-7);
        // A parameter with zero gradient moves only by its decay.
        assert_eq!(params[w.offset + 1], 0.5f32 * (1.0 - lr1 * 0.2) as f32);
        assert_eq!(params[s.offset].to_bits(), (want_s as f32).to_bits());

        // Step 2 with gradient 0.3 on the matrix element, lr 2e-3.
        grads[w.offset] = 0.3;
        let lr2 = 2e-3;
        let p1 = params[w.offset] as f64;
        opt.update(&mut params, &grads, &layout, lr2, &c);
        let m = 0.9 * 0.01 + 0.1 * 0.3;
        let v = 0.98 * (0.02 * 0.01) + 0.02 * 0.09;
        let m_hat = m / (1.0 - 0.81);
        let v_hat_sqrt = (v / (1.0 - 0.98f64 * 0.98)).sqrt();
        let want = p1 * (1.0 - lr2 * 0.2) - lr2 * m_hat / (v_hat_sqrt + 1e-6);
        assert!((params[w.offset] as f64 - want).abs() < 1e-7, "{} vs {want}", params[w.offset]);
        assert_eq!(opt.step, 2);
    }

    fn tiny_layout() -> ParamLayout {
        let text = r#"{"embed_dim": 4,
            "vision_cfg": {"image_size": 8, "patch_size": 4, "width": 8, "layers": 1, "head_width": 4},
            "text_cfg": {"context_length": 4, "vocab_size": 8, "width": 8, "heads": 2, "layers": 1}}"#;
        let cfg = ClipConfig::from_json_str(text).unwrap();
        let model = cfg.init(&burn::tensor::Device::flex());
        ParamLayout::of(&model)
    }
}
