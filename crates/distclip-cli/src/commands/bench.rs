//! `distclip bench train`: the throughput of one full training step (forward of both towers,
//! ClipLoss, backward, AdamW with OpenCLIP's hyperparameters) on random inputs, the
//! counterpart of `shared/bench/openclip_train_step.py`.

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use distclip_model::{ClipConfig, l2_normalize, loss::clip_loss};

/// `distclip bench ...`
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Time full training steps on random inputs.
    Train(TrainArgs),
    /// Time the input pipeline (or image decoding alone) over a dataset spec.
    Data(super::bench_data::DataArgs),
    /// Bandwidth of collectives between worker processes on loopback (nccl-tests figures).
    Collective(super::bench_collective::Args),
    /// A coordinator under simulated workers over gRPC on loopback: RPC and commit latency, RSS.
    Coordinator(super::bench_coordinator::Args),
}

/// Arguments of `distclip bench train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A built-in config name or an OpenCLIP config JSON file.
    #[arg(long)]
    model: String,
    /// Samples per step.
    #[arg(long)]
    batch: usize,
    /// Timed steps (after `--warmup` untimed ones).
    #[arg(long)]
    steps: usize,
    /// Untimed steps first (allocations, kernel selection); the anchor script also runs 2.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
    /// `flex`, `cpu` (libtorch) or `cuda:N` (libtorch).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Seed of the model init and the random batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Run a benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Train(a) => train(a),
        BenchCommand::Data(a) => super::bench_data::run(a),
        BenchCommand::Collective(a) => super::bench_collective::run(a),
        BenchCommand::Coordinator(a) => super::bench_coordinator::run(a),
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch > 0 && args.steps > 0, "--batch and --steps must be positive");
    super::set_threads(args.threads)?;
    let cfg = ClipConfig::from_name_or_path(&args.model)?;
    let base = distclip_model::device::parse_device(&args.device)?;
    base.seed(args.seed);
    let device = base.clone().autodiff();
    let mut model = cfg.init(&device);
    // OpenCLIP's ViT defaults: lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2.
    let mut optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.98)
        .with_epsilon(1e-6)
        .with_weight_decay(0.2)
        .init();
    let (b, s, ctx) = (args.batch, cfg.vision_cfg.image_size, cfg.text_cfg.context_length);
    let images = Tensor::<4>::random([b, 3, s, s], Distribution::Normal(0.0, 1.0), &base);
    let tokens = random_tokens(b, ctx, cfg.text_cfg.vocab_size, args.seed);
    let tokens = Tensor::<2, Int>::from_data(tokens, &base);

    let mut losses = Vec::new();
    // Per timed step: [forward + loss, backward, optimizer, total]. The phases are host-side
    // times (exact on CPU backends; on CUDA only the total, which waits for the loss, is).
    let mut times: Vec<[f64; 4]> = Vec::new();
    for step in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        let img = l2_normalize(model.encode_image(images.clone().autodiff()));
        let txt = l2_normalize(model.encode_text(tokens.clone().autodiff()));
        let loss = clip_loss(img, txt, model.logit_scale.val().exp());
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let t2 = Instant::now();
        model = optim.step(5e-4, model, grads);
        // Reading the loss waits for the step to finish on asynchronous devices.
        let value = loss.into_scalar::<f32>();
        let t3 = Instant::now();
        let dt = (t3 - t0).as_secs_f64();
        anyhow::ensure!(value.is_finite(), "non-finite loss {value} at step {step}");
        losses.push(value);
        if step >= args.warmup {
            times.push([(t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64(), dt]);
        }
        tracing::info!(step, loss = value, seconds = dt, "bench step");
    }
    let mean = |i: usize| times.iter().map(|t| t[i]).sum::<f64>() / times.len() as f64;
    let step_s = mean(3);
    super::print_json(&serde_json::json!({
        "bench": "train",
        "model": args.model,
        "params": cfg.num_params(),
        "device": args.device,
        "threads": args.threads,
        "batch": b,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_s": step_s,
        "forward_s": mean(0),
        "backward_s": mean(1),
        "optimizer_s": mean(2),
        "samples_per_s": b as f64 / step_s,
        "loss_first": losses.first(),
        "loss_last": losses.last(),
    }))
}

/// Token rows as the anchor script makes them: SOT, random ids in `[1, vocab - 2)`, EOT last.
fn random_tokens(b: usize, ctx: usize, vocab: usize, seed: u64) -> TensorData {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let (sot, eot) = ((vocab - 2) as i64, (vocab - 1) as i64);
    let mut ids = vec![0i64; b * ctx];
    for row in ids.chunks_mut(ctx) {
        for v in row.iter_mut() {
            *v = 1 + (next() % (vocab - 3)) as i64;
        }
        row[0] = sot;
        row[ctx - 1] = eot;
    }
    TensorData::new(ids, [b, ctx])
}
