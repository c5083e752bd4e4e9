//! Everything a worker builds from the coordinator's run config before its first step: the
//! model and trainer (from the run's seed, a pretrained file, or the checkpoint the run resumed
//! from), the loader settings, and rank 0's checkpoint and evaluation duties.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use distclip_config::{Augment, RunConfig};
use distclip_data::{Augment as DataAugment, CaptionKey, LoaderConfig, Order, ShardList, TransformConfig};
use distclip_eval::Suite;
use distclip_model::ClipConfig;
use distclip_model::checkpoint::{load_state_dict, read_state_dict};
use distclip_model::lock::Locking;
use distclip_model::pos_embed::resize_pos_embed;
use distclip_model::device::parse_device;
use distclip_proto::v1 as pb;

use super::rank0::{Checkpoints, Evaluator, Rank0};
use super::{WorkerError, WorkerOptions, heal};
use crate::{OptimConfig, Trainer};

/// What the step loop starts from.
pub(super) struct Setup {
    pub(super) trainer: Trainer,
    pub(super) rank0: Rank0,
    /// The run's shard list (`data.train`).
    pub(super) list: Arc<ShardList>,
    /// Loader settings; each epoch's feed sets the epoch and the order.
    pub(super) loader: LoaderConfig,
}

impl Setup {
    /// Build the worker's model, trainer and data settings from the run config it was sent.
    pub(super) fn new(opts: &WorkerOptions, config: &RunConfig, join: &pb::JoinResponse) -> Result<Setup, WorkerError> {
        // Every fresh worker initialises from the run's seed, so all ranks start equal
        // (checked by the parameter checksums in every commit); a late joiner heals from a peer.
        let mut model_cfg = ClipConfig::from_name_or_path(&config.model.name)
            .map_err(|e| WorkerError::Config(format!("model.name = {:?}: {e}", config.model.name)))?;
        if let Some(p) = config.model.patch_dropout {
            model_cfg.vision_cfg.patch_dropout = p;
        }
        let device = parse_device(&opts.device).map_err(|e| WorkerError::Setup(e.to_string()))?;
        device.seed(config.train.seed);
        let mut model = model_cfg.init(&device);
        if let Some(path) = &config.model.pretrained {
            let mut state = read_state_dict(Path::new(path))
                .map_err(|e| WorkerError::Setup(format!("model.pretrained {path}: {e}")))?;
            // Fine-tuning at another image size (OpenCLIP's load_checkpoint does the same).
            if let Some((from, to)) = resize_pos_embed(&mut state, model_cfg.grid_size())
                .map_err(|e| WorkerError::Setup(format!("model.pretrained {path}: {e}")))?
            {
                tracing::info!(path, from, to, "resized the positional embedding's patch grid");
            }
            model = load_state_dict(model, &state)
                .map_err(|e| WorkerError::Setup(format!("model.pretrained {path}: {e}")))?;
        }
        let (image_size, context_length) = (model.image_size(), model.context_length());
        let optim = OptimConfig::from_train(&config.train, join.total_steps)
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        let mut trainer = Trainer::new(model, optim, &device)
            .map_err(|e| WorkerError::Setup(e.to_string()))?
            .with_precision(config.train.precision)
            .with_patch_dropout_seed(config.train.seed)
            .with_locking(&locking(&config.model))
            .map_err(|e| WorkerError::Setup(e.to_string()))?;
        if !join.resume_from.is_empty() {
            heal::resume(&mut trainer, Path::new(&join.resume_from))?;
        }

        let caption_key: CaptionKey =
            config.data.caption_key.parse().map_err(|e| WorkerError::Config(format!("data.caption_key: {e}")))?;
        let rank0 = Rank0 {
            checkpoints: Checkpoints {
                root: opts
                    .checkpoint_dir
                    .clone()
                    .or_else(|| (!join.checkpoint_dir.is_empty()).then(|| PathBuf::from(&join.checkpoint_dir))),
                keep: config.log.keep_checkpoints,
                config_toml: join.config_toml.clone(),
            },
            evaluator: Evaluator {
                model: model_cfg,
                device,
                suite: Suite {
                    zeroshot: config.eval.zeroshot.clone(),
                    templates: Vec::new(),
                    retrieval: config.eval.retrieval.clone(),
                },
                batch_size: config.eval.batch_size,
                caption_key: caption_key.clone(),
            },
            eval_every: config.eval.every_steps,
            last_eval: None,
        };

        let list = Arc::new(
            ShardList::parse(&config.data.train).map_err(|e| WorkerError::Config(format!("data.train: {e}")))?,
        );
        let shuffle = config.data.shuffle;
        let loader = LoaderConfig {
            threads: opts.data_threads.max(1),
            batch_size: config.train.batch_size,
            seed: config.train.seed,
            epoch: 0,
            order: Order::Epoch,
            shuffle,
            shuffle_buffer: if shuffle { config.data.shuffle_buffer } else { 0 },
            shuffle_initial: if shuffle { config.data.shuffle_buffer.min(1000) } else { 0 },
            prefetch: (2 * config.train.batch_size).max(16),
            keep_partial: true,
            transform: TransformConfig {
                image_size,
                context_length,
                augment: match config.data.augment {
                    Augment::Random => DataAugment::train(),
                    Augment::None => DataAugment::None,
                },
                caption_key,
                ..TransformConfig::default()
            },
        };
        Ok(Setup { trainer, rank0, list, loader })
    }
}

/// The run's `[model]` lock keys as the trainer's [`Locking`].
fn locking(m: &distclip_config::ModelConfig) -> Locking {
    Locking {
        image_unlocked_groups: m.lock_image.then_some(m.lock_image_unlocked_groups),
        text_unlocked_layers: m.lock_text.then_some(m.lock_text_unlocked_layers),
        text_freeze_layer_norm: m.lock_text_freeze_layer_norm,
    }
}
