//! The [`Trainer`] and its two-phase step.

use std::path::Path;
use std::time::Instant;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use distclip_config::Precision;
use distclip_model::checkpoint::{StateDict, save_safetensors, state_dict};
use distclip_model::loss::clip_loss_local;
use distclip_model::lock::Locking;
use distclip_model::{Clip, l2_normalize, patch_dropout};

use crate::collective::Collective;
use crate::optim::{AdamW, LOGIT_SCALE_MAX, OptimConfig, clip_by_global_norm, global_norm};
use crate::params::{ParamLayout, checksum, read_grads, read_values, write_values};
use crate::{StepError, state};

/// Gradient all-reduce bucket size in bytes (PyTorch DDP's default `bucket_cap_mb=25`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// This rank's share of a step: `len` pairs as host buffers, as the data loader produces them.
#[derive(Debug, Clone, Copy)]
pub struct LocalBatch<'a> {
    /// `len × 3 × S × S` preprocessed (CLIP-normalised) images, row-major.
    pub images: &'a [f32],
    /// `len × context_length` token ids.
    pub tokens: &'a [i64],
    /// Number of pairs; may be 0 (e.g. at the end of an epoch), and may differ between ranks.
    pub len: usize,
}

/// Gradients of one step, summed over every rank, not yet applied. Pass it to
/// [`Trainer::apply`] once the step is committed, or drop it to abandon the step.
#[derive(Debug)]
pub struct PendingStep {
    step: u64,
    layout: u64,
    grads: Vec<f32>,
    loss: f32,
    grad_norm: f64,
    local_samples: usize,
    global_samples: usize,
    compute_s: f64,
    comm_s: f64,
}

impl PendingStep {
    /// The step (0-based count of updates applied before it) these gradients belong to.
    pub fn step(&self) -> u64 {
        self.step
    }
    /// The global mean loss over the whole global batch (identical on every rank).
    pub fn loss(&self) -> f32 {
        self.loss
    }
    /// Global gradient L2 norm before clipping (identical on every rank).
    pub fn grad_norm(&self) -> f64 {
        self.grad_norm
    }
    /// Pairs this rank contributed.
    pub fn local_samples(&self) -> usize {
        self.local_samples
    }
    /// Pairs in the global batch.
    pub fn global_samples(&self) -> usize {
        self.global_samples
    }
    /// The summed gradient, laid out as [`Trainer::layout`] (unclipped).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }
}

/// What one applied step did, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// 0-based index of the step just applied.
    pub step: u64,
    /// Global mean loss of the step's batch (before the update).
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were scaled by (1 when not clipped).
    pub clip_coef: f32,
    /// `logit_scale` after the update and clamp (log temperature; `exp` of it is the scale).
    pub logit_scale: f32,
    /// Pairs this rank contributed.
    pub local_samples: usize,
    /// Pairs in the global batch.
    pub global_samples: usize,
    /// Seconds of forward/backward computation in `forward_backward`.
    pub compute_s: f64,
    /// Seconds spent in collectives in `forward_backward`.
    pub comm_s: f64,
    /// Seconds of `apply` (clip, AdamW, write-back).
    pub optimizer_s: f64,
    /// Checksum of the parameters after the step ([`checksum`]); equal on every rank.
    pub checksum: u64,
}

/// One worker's model, flat parameters and optimizer state.
#[derive(Debug)]
pub struct Trainer {
    model: Clip,
    device: Device,
    layout: ParamLayout,
    params: Vec<f32>,
    optim: AdamW,
    cfg: OptimConfig,
    bucket_elems: usize,
    embed_dim: usize,
    vocab_size: usize,
    logit_scale_at: usize,
    /// Dtype the towers compute in (None: the parameters' fp32).
    compute: Option<FloatDType>,
    /// Seed of the patch-dropout subsets (used when the image tower drops patches).
    patch_seed: u64,
    /// Fixed subsets per global row, replacing the seeded draw (see `with_patch_subsets`).
    patch_fixed: Option<Vec<Vec<usize>>>,
}

/// Casts every float parameter; on an autodiff device the cast is tracked, so gradients flow
/// back to (and accumulate in) the fp32 parameters the copy was made from.
struct CastParams(FloatDType);

impl ModuleMapper for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}

/// Accumulates seconds spent in collectives.
struct Clock {
    comm: f64,
}

impl Clock {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.comm += t.elapsed().as_secs_f64();
        out
    }
}

fn backend<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> StepError + '_ {
    move |e| StepError::Backend(format!("{what}: {e:?}"))
}

impl Trainer {
    /// Take over `model` (any device) for training on `device` (its autodiff form is used) with
    /// fresh AdamW state at step 0.
    pub fn new(model: Clip, cfg: OptimConfig, device: &Device) -> Result<Self, StepError> {
        let device = device.clone().autodiff();
        let layout = ParamLayout::of(&model);
        let params = read_values(&model, &layout).map_err(StepError::Backend)?;
        let model = write_values(model, &layout, &params, &device).map_err(StepError::Backend)?;
        let dim1 = |name: &str| layout.get(name).and_then(|s| s.shape.get(1).copied());
        // Burn keeps [width, embed_dim] for both the raw matrix and a Linear's weight.
        let embed_dim = dim1("text_projection")
            .or_else(|| dim1("text_projection.weight"))
            .ok_or_else(|| StepError::Unsupported("model without a text projection".into()))?;
        let vocab_size = layout
            .get("token_embedding.weight")
            .map(|s| s.shape[0])
            .ok_or_else(|| StepError::Unsupported("model without a token embedding".into()))?;
        let logit_scale_at = layout
            .get("logit_scale")
            .map(|s| s.offset)
            .ok_or_else(|| StepError::Unsupported("model without logit_scale".into()))?;
        let n = layout.len();
        Ok(Trainer {
            model,
            device,
            layout,
            params,
            optim: AdamW::new(n),
            cfg,
            bucket_elems: DEFAULT_BUCKET_BYTES / 4,
            embed_dim,
            vocab_size,
            logit_scale_at,
            compute: None,
            patch_seed: 0,
            patch_fixed: None,
        })
    }

    /// Run the towers in `precision`. `Bf16` is mixed precision in the manner of PyTorch's
    /// autocast with fp32 master weights: each forward uses a bf16 copy of the fp32 parameters
    /// and bf16 inputs; the features are cast back to fp32 before normalisation, so the
    /// gather, the loss, the gradient all-reduce, AdamW and every checkpoint stay fp32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.compute = match precision {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
        };
        self
    }

    /// Train only what `locking` leaves unlocked (OpenCLIP's `--lock-image` / `--lock-text`):
    /// locked parameters become constants, get no gradient, are left out of the gradient
    /// all-reduce and are never updated. Every rank of a run must lock alike.
    pub fn with_locking(mut self, locking: &Locking) -> Result<Self, StepError> {
        self.layout.lock(locking);
        self.model = write_values(self.model, &self.layout, &self.params, &self.device).map_err(StepError::Backend)?;
        Ok(self)
    }

    /// Seed the patch-dropout subsets (the run seed): a sample's subset is drawn from this
    /// seed, the step and its row in the global batch, so it does not depend on the rank.
    pub fn with_patch_dropout_seed(mut self, seed: u64) -> Self {
        self.patch_seed = seed;
        self
    }

    /// Keep exactly these patches at every step (row `i` of the global batch keeps
    /// `subsets[i]`, all of equal length) instead of a seeded draw: replays the subsets another
    /// implementation drew, e.g. to check a step against OpenCLIP's.
    pub fn with_patch_subsets(mut self, subsets: Vec<Vec<usize>>) -> Self {
        self.patch_fixed = Some(subsets);
        self
    }

    /// As [`Trainer::new`], then load [`Trainer::state_bytes`] from a peer or a checkpoint.
    pub fn from_state_bytes(model: Clip, cfg: OptimConfig, device: &Device, bytes: &[u8]) -> Result<Self, StepError> {
        let mut t = Self::new(model, cfg, device)?;
        t.load_state_bytes(bytes)?;
        Ok(t)
    }

    /// Use all-reduce buckets of `bytes` (at least one f32). Every rank must use the same size.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_elems = (bytes / 4).max(1);
        self
    }

    /// Number of optimizer updates applied so far (the 0-based index of the next step).
    pub fn step(&self) -> u64 {
        self.optim.step
    }

    /// The model (autodiff device), holding exactly [`Trainer::params`].
    pub fn model(&self) -> &Clip {
        &self.model
    }

    /// Where each parameter lives in the flat buffers.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The flat parameter buffer.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// AdamW state.
    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    /// Hyperparameters.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Checksum of the parameters; ranks with equal checksums hold bit-identical parameters.
    pub fn checksum(&self) -> u64 {
        checksum(&self.params)
    }

    /// The parameters under OpenCLIP's names and shapes.
    pub fn state_dict(&self) -> StateDict {
        state_dict(&self.model)
    }

    /// Write the model as OpenCLIP-named safetensors (atomically, via a temporary file).
    pub fn save_safetensors(&self, path: &Path) -> Result<(), StepError> {
        Ok(save_safetensors(&self.model, path)?)
    }

    /// Parameters, AdamW moments and step as versioned, checksummed bytes.
    pub fn state_bytes(&self) -> Vec<u8> {
        state::encode(self.optim.step, self.layout.fingerprint(), &self.params, &self.optim.m, &self.optim.v)
    }

    /// Replace parameters, moments and step by `bytes` from [`Trainer::state_bytes`] of a
    /// trainer of the same model architecture. On error nothing changes.
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<(), StepError> {
        let s = state::decode(bytes)?;
        if s.fingerprint != self.layout.fingerprint() || s.params.len() != self.layout.len() {
            return Err(StepError::State(format!(
                "state is for another model ({} parameters, layout {:016x}; this model has {}, layout {:016x})",
                s.params.len(),
                s.fingerprint,
                self.layout.len(),
                self.layout.fingerprint()
            )));
        }
        self.model = write_values(self.model.clone(), &self.layout, &s.params, &self.device).map_err(StepError::Backend)?;
        self.params = s.params;
        self.optim = AdamW {
            m: s.m,
            v: s.v,
            step: s.step,
        };
        Ok(())
    }

    /// L2-normalised image and text features of `b` (validated), rows `first_row..` of the
    /// global batch, through `model` on `device`, with this step's patch dropout.
    fn encode(&self, model: &Clip, b: &LocalBatch<'_>, first_row: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let s = self.model.image_size();
        let ctx = self.model.context_length();
        let images = Tensor::<4>::from_data(TensorData::new(b.images.to_vec(), [b.len, 3, s, s]), device);
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(b.tokens.to_vec(), [b.len, ctx]), device);
        let prob = self.model.visual.patch_dropout();
        let keep = (prob > 0.0).then(|| match &self.patch_fixed {
            Some(fixed) => {
                let rows = &fixed[first_row.min(fixed.len())..(first_row + b.len).min(fixed.len())];
                let k = rows.first().map_or(0, Vec::len);
                let ids: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
                Tensor::from_data(TensorData::new(ids, [rows.len(), k]), device)
            }
            None => {
                let patches = self.model.visual.num_patches();
                patch_dropout::keep_tensor(patches, prob, self.patch_seed, self.optim.step, first_row, b.len, device)
            }
        });
        match self.compute {
            None => (l2_normalize(model.encode_image_kept(images, keep)), l2_normalize(model.encode_text(tokens))),
            Some(dtype) => {
                let low = model.clone().map(&mut CastParams(dtype));
                let fp32 = |f: Tensor<2>| l2_normalize(f.cast(FloatDType::F32));
                (fp32(low.encode_image_kept(images.cast(dtype), keep)), fp32(low.encode_text(tokens)))
            }
        }
    }

    fn check_batch(&self, b: &LocalBatch<'_>) -> Result<(), String> {
        let s = self.model.image_size();
        let ctx = self.model.context_length();
        let want_images = b.len.checked_mul(3 * s * s);
        if want_images != Some(b.images.len()) {
            return Err(format!("{} image values for {} samples of 3x{s}x{s}", b.images.len(), b.len));
        }
        if b.len.checked_mul(ctx) != Some(b.tokens.len()) {
            return Err(format!("{} token ids for {} samples of context {ctx}", b.tokens.len(), b.len));
        }
        if let Some(t) = b.tokens.iter().find(|&&t| t < 0 || t as u64 >= self.vocab_size as u64) {
            return Err(format!("token id {t} outside the vocabulary of {}", self.vocab_size));
        }
        Ok(())
    }

    /// Phase 1 of a step, on rank `comm.rank()` of `comm.world_size()`: forward, global
    /// InfoNCE, backward, gradient all-reduce. Every rank of the group must call it for the
    /// same step. Nothing is applied: pass the result to [`Trainer::apply`] once the step is
    /// committed, or drop it. Ranks may hold different numbers of pairs (including 0).
    ///
    /// The gradient is that of the global loss `L = (1/N) Σ_rows (CE_i2t + CE_t2i)/2` over all
    /// `N` pairs of all ranks, OpenCLIP's `ClipLoss` of the concatenated batch; summed
    /// (not averaged) over ranks it is exact, so W ranks × b equals 1 rank × W·b.
    pub fn forward_backward(&mut self, batch: LocalBatch<'_>, comm: &mut dyn Collective) -> Result<PendingStep, StepError> {
        self.forward_backward_accum(&[batch], comm)
    }

    /// [`Trainer::forward_backward`] with gradient accumulation: this rank's share of the step
    /// is the concatenation of `micro` (in order), but only one micro-batch's activations are
    /// alive at a time. The features of all micro-batches are computed first without a graph;
    /// after the global loss, each micro-batch is run again with autodiff and back-propagated
    /// with its rows of the feature gradient. The result equals one batch of all the rows
    /// (k × b gives the update of 1 × k·b, DESIGN.md), unlike OpenCLIP's `accum_freq`, which
    /// back-propagates the loss k times and so counts the `logit_scale` gradient k times.
    pub fn forward_backward_accum(&mut self, micro: &[LocalBatch<'_>], comm: &mut dyn Collective) -> Result<PendingStep, StepError> {
        let (world, rank) = (comm.world_size(), comm.rank());
        let span = tracing::debug_span!("forward_backward", rank, world, step = self.optim.step);
        let _guard = span.enter();
        if rank >= world {
            return Err(StepError::Protocol(format!("rank {rank} of a group of {world}")));
        }
        let started = Instant::now();
        let mut clock = Clock { comm: 0.0 };
        let d = self.embed_dim;
        let n: usize = micro.iter().map(|b| b.len).sum();

        // Counts first, with a validity flag, so a malformed batch on one rank fails the step on
        // every rank instead of leaving the others waiting in the next collective.
        let valid = micro.iter().try_for_each(|b| self.check_batch(b));
        let counts = clock.time(|| comm.all_gather(&[n as f32, if valid.is_ok() { 1.0 } else { 0.0 }]))?;
        valid.map_err(StepError::Batch)?;
        if counts.len() != 2 * world {
            return Err(StepError::Protocol(format!("count gather returned {} values for {world} ranks", counts.len())));
        }
        let mut sizes = Vec::with_capacity(world);
        for (q, pair) in counts.chunks_exact(2).enumerate() {
            if pair[1] != 1.0 {
                return Err(StepError::PeerBatch { rank: q });
            }
            let c = pair[0];
            let whole = c >= 0.0 && c.fract() == 0.0 && c < 16_777_216.0;
            if !whole {
                return Err(StepError::Protocol(format!("rank {q} reported {c} samples")));
            }
            sizes.push(c as usize);
        }
        let total: usize = sizes.iter().sum();
        if total == 0 {
            return Err(StepError::EmptyGlobalBatch);
        }
        let offset: usize = sizes[..rank].iter().sum();
        let max_n = sizes.iter().copied().max().unwrap_or(0);

        // 1. Forward both towers: with autodiff when the rank's share is one batch (its graph is
        //    kept for step 5), otherwise without a graph, one micro-batch at a time.
        let ad = self.device.clone();
        let live = micro.len() == 1;
        let no_grad = if live { None } else { Some(self.model.valid()) };
        let mut features = None;
        let mut send = vec![0f32; 2 * max_n * d];
        let mut row = 0;
        for b in micro.iter().filter(|b| b.len > 0) {
            let (f_img, f_txt) = match &no_grad {
                Some(model) => self.encode(model, b, offset + row, &ad.clone().inner()),
                None => self.encode(&self.model, b, offset + row, &ad),
            };
            let img = f_img.clone().try_into_vec_as::<f32>().map_err(backend("image features"))?;
            let txt = f_txt.clone().try_into_vec_as::<f32>().map_err(backend("text features"))?;
            if img.len() != b.len * d || txt.len() != b.len * d {
                return Err(StepError::Backend("features of the wrong size".into()));
            }
            // 2. (below) gathers the values, padded to the largest share of any rank.
            send[row * d..(row + b.len) * d].copy_from_slice(&img);
            send[(max_n + row) * d..(max_n + row + b.len) * d].copy_from_slice(&txt);
            row += b.len;
            if live {
                features = Some((f_img, f_txt));
            }
        }
        let gathered = clock.time(|| comm.all_gather(&send))?;
        if gathered.len() != world * send.len() {
            return Err(StepError::Protocol(format!("feature gather returned {} values, expected {}", gathered.len(), world * send.len())));
        }
        let mut all_img = Vec::with_capacity(total * d);
        let mut all_txt = Vec::with_capacity(total * d);
        for (q, chunk) in gathered.chunks_exact(send.len().max(1)).enumerate() {
            let rows = sizes[q] * d;
            all_img.extend_from_slice(&chunk[..rows]);
            all_txt.extend_from_slice(&chunk[max_n * d..max_n * d + rows]);
        }

        // 3. The loss of this rank's rows against all columns, on fresh leaves. Weighted by
        //    n/N, the ranks' terms sum to the global mean over N rows, so gradients are summed,
        //    never averaged (OpenCLIP local_loss rows, labels offset by this rank's first row).
        let scale_raw = self.params[self.logit_scale_at];
        let mut reduce = vec![0f32; 2 * total * d + 1];
        let mut dscale = 0f32;
        if n > 0 {
            let img_leaf = Tensor::<2>::from_data(TensorData::new(all_img, [total, d]), &ad).require_grad();
            let txt_leaf = Tensor::<2>::from_data(TensorData::new(all_txt, [total, d]), &ad).require_grad();
            let scale_leaf = Tensor::<1>::from_data(TensorData::new(vec![scale_raw], [1]), &ad).require_grad();
            let loss = clip_loss_local(
                img_leaf.clone().narrow(0, offset, n),
                txt_leaf.clone().narrow(0, offset, n),
                img_leaf.clone(),
                txt_leaf.clone(),
                scale_leaf.clone().exp(),
                offset,
            ) * (n as f64 / total as f64);
            let grads = loss.backward();
            let read = |t: &Tensor<2>| -> Result<Vec<f32>, StepError> {
                match t.grad(&grads) {
                    Some(g) => g.try_into_vec_as::<f32>().map_err(backend("feature gradient")),
                    None => Ok(vec![0.0; total * d]),
                }
            };
            let g_img = read(&img_leaf)?;
            let g_txt = read(&txt_leaf)?;
            if g_img.len() != total * d || g_txt.len() != total * d {
                return Err(StepError::Backend("feature gradient of the wrong size".into()));
            }
            reduce[..total * d].copy_from_slice(&g_img);
            reduce[total * d..2 * total * d].copy_from_slice(&g_txt);
            reduce[2 * total * d] = loss.try_into_vec_as::<f32>().map_err(backend("loss"))?.first().copied().unwrap_or(f32::NAN);
            if let Some(g) = scale_leaf.grad(&grads) {
                dscale = g.try_into_vec_as::<f32>().map_err(backend("logit_scale gradient"))?.first().copied().unwrap_or(f32::NAN);
            }
        }

        // 4. Sum feature gradients over ranks (and the loss terms); keep this rank's rows.
        clock.time(|| comm.all_reduce_sum(&mut reduce))?;
        let loss = reduce[2 * total * d];

        // 5. Surrogate backward: sum(f·g) has exactly the upstream gradient g of the global loss.
        let mut flat = vec![0f32; self.layout.len()];
        let surrogate = |f_img: Tensor<2>, f_txt: Tensor<2>, first: usize, len: usize| {
            let rows = |start: usize| reduce[start + first * d..start + (first + len) * d].to_vec();
            let g_img = Tensor::<2>::from_data(TensorData::new(rows(0), [len, d]), &ad);
            let g_txt = Tensor::<2>::from_data(TensorData::new(rows(total * d), [len, d]), &ad);
            ((f_img * g_img).sum() + (f_txt * g_txt).sum()).backward()
        };
        if let Some((f_img, f_txt)) = features {
            let grads = surrogate(f_img, f_txt, offset, n);
            read_grads(&self.model, &self.layout, &grads, &mut flat).map_err(StepError::Backend)?;
        } else if !live {
            let mut part = vec![0f32; self.layout.len()];
            let mut first = offset;
            for b in micro.iter().filter(|b| b.len > 0) {
                let (f_img, f_txt) = self.encode(&self.model, b, first, &ad);
                let grads = surrogate(f_img, f_txt, first, b.len);
                read_grads(&self.model, &self.layout, &grads, &mut part).map_err(StepError::Backend)?;
                for (f, p) in flat.iter_mut().zip(&part) {
                    *f += p;
                }
                first += b.len;
            }
        }
        // logit_scale is not in the towers' graph: its gradient is this rank's part of
        // d loss / d logit_scale, summed over ranks by the all-reduce below.
        flat[self.logit_scale_at] += dscale;
        let compute_s = started.elapsed().as_secs_f64() - clock.comm;

        // 6. All-reduce (sum) the trainable parameters' gradients, bucket by bucket (locked
        //    ones are zero everywhere).
        for range in self.layout.trainable_ranges() {
            for bucket in flat[range].chunks_mut(self.bucket_elems) {
                clock.time(|| comm.all_reduce_sum(bucket))?;
            }
        }

        if !loss.is_finite() {
            return Err(StepError::NonFinite {
                what: "loss",
                value: loss as f64,
            });
        }
        let grad_norm = global_norm(&flat);
        if !grad_norm.is_finite() {
            return Err(StepError::NonFinite {
                what: "gradient norm",
                value: grad_norm,
            });
        }
        tracing::debug!(loss, grad_norm, local = n, global = total, "gradients ready");
        Ok(PendingStep {
            step: self.optim.step,
            layout: self.layout.fingerprint(),
            grads: flat,
            loss,
            grad_norm,
            local_samples: n,
            global_samples: total,
            compute_s,
            comm_s: clock.comm,
        })
    }

    /// Phase 2, after the commit: global-norm clipping, AdamW at this step's learning rate,
    /// `logit_scale` clamped to `[0, ln 100]` (the order of `open_clip_train/train.py`), and
    /// the new parameters written into the model. Fails only if `pending` belongs to another
    /// step or model, in which case nothing changes.
    pub fn apply(&mut self, pending: PendingStep) -> Result<StepStats, StepError> {
        let started = Instant::now();
        let fingerprint = self.layout.fingerprint();
        if pending.step != self.optim.step || pending.layout != fingerprint || pending.grads.len() != self.params.len() {
            return Err(StepError::Stale {
                pending: pending.step,
                current: self.optim.step,
                pending_layout: pending.layout,
                current_layout: fingerprint,
            });
        }
        let step = self.optim.step;
        let lr = self.cfg.lr_at(step);
        let mut grads = pending.grads;
        let clip_coef = match self.cfg.grad_clip_norm {
            Some(max) => clip_by_global_norm(&mut grads, max, pending.grad_norm),
            None => 1.0,
        };
        // In place: a copy of parameters and moments would triple the host memory of the step.
        self.optim.update(&mut self.params, &grads, &self.layout, lr, &self.cfg);
        let s = &mut self.params[self.logit_scale_at];
        *s = s.clamp(0.0, LOGIT_SCALE_MAX);
        let logit_scale = *s;
        // Cannot fail: the layout was taken from this very model.
        self.model = write_values(self.model.clone(), &self.layout, &self.params, &self.device).map_err(StepError::Backend)?;
        Ok(StepStats {
            step,
            loss: pending.loss,
            lr,
            grad_norm: pending.grad_norm,
            clip_coef,
            logit_scale,
            local_samples: pending.local_samples,
            global_samples: pending.global_samples,
            compute_s: pending.compute_s,
            comm_s: pending.comm_s,
            optimizer_s: started.elapsed().as_secs_f64(),
            checksum: checksum(&self.params),
        })
    }
}
