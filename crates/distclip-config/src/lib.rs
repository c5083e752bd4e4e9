//! The run configuration: one serde tree read from a TOML file, overridden by `--set key=value`,
//! validated, and saved resolved to the run directory. The coordinator owns it and hands the
//! resolved TOML to every worker that joins, so all ranks train with the same settings.
//!
//! Defaults are OpenCLIP's (`open_clip_train/params.py` for ViTs): lr 5e-4, betas 0.9/0.98,
//! eps 1e-6, weight decay 0.2, warmup 10,000 steps, cosine schedule.

mod overrides;
mod template;

use serde::{Deserialize, Serialize};
use std::path::Path;

pub use overrides::{apply_override, known_keys};
pub use template::documented_default;

/// Configuration errors. Each names the key or file and says what would fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or a value of the wrong type.
    #[error("invalid config{}: {message}", location.as_deref().map(|l| format!(" in {l}")).unwrap_or_default())]
    Parse {
        /// File name, if the text came from one.
        location: Option<String>,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A key that does not exist.
    #[error("unknown config key `{key}`{}; run `distclip config` to see every key", suggestion.as_deref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The nearest known key.
        suggestion: Option<String>,
    },
    /// `--set` without `=`.
    #[error("override `{0}` must look like key=value, e.g. train.lr=1e-3")]
    BadOverride(String),
    /// A value out of range.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// Everything a run needs. Sections mirror the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Which model and from which weights.
    pub model: ModelConfig,
    /// Training data.
    pub data: DataConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// Membership, heartbeats, timeouts.
    pub cluster: ClusterConfig,
    /// Evaluation during and after training.
    pub eval: EvalConfig,
    /// Logging and checkpoints.
    pub log: LogConfig,
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A preset name (`distclip models`) or a path to an OpenCLIP model JSON.
    pub name: String,
    /// Start from these weights (OpenCLIP or distclip safetensors / .bin / .pt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
    /// Fraction of image patches dropped in training (FLIP), overriding the model config's
    /// `vision_cfg.patch_dropout` (OpenCLIP's `--force-patch-dropout`). Unset: the model's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_dropout: Option<f64>,
    /// Lock the image tower (OpenCLIP's `--lock-image`, LiT).
    pub lock_image: bool,
    /// Leave the last N image tower groups trainable (`--lock-image-unlocked-groups`).
    pub lock_image_unlocked_groups: usize,
    /// OpenCLIP's `--lock-image-freeze-bn-stats`: accepted for compatibility; a ViT has no
    /// BatchNorm, so it changes nothing.
    pub lock_image_freeze_bn_stats: bool,
    /// Lock the text tower (`--lock-text`).
    pub lock_text: bool,
    /// Leave the last N text tower groups trainable (`--lock-text-unlocked-layers`).
    pub lock_text_unlocked_layers: usize,
    /// Freeze the LayerNorms of locked text groups with them (OpenCLIP's only mode for its
    /// built-in text tower); false leaves them trainable, as OpenCLIP's HF text tower does.
    pub lock_text_freeze_layer_norm: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            name: "ViT-B-32".into(),
            pretrained: None,
            patch_dropout: None,
            lock_image: false,
            lock_image_unlocked_groups: 0,
            lock_image_freeze_bn_stats: false,
            lock_text: false,
            lock_text_unlocked_layers: 0,
            lock_text_freeze_layer_norm: true,
        }
    }
}

/// How training images are augmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// OpenCLIP's RandomResizedCrop(scale 0.9..1.0), bicubic.
    Random,
    /// The eval transform (resize shortest side, centre crop): deterministic inputs.
    None,
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shard spec, e.g. `/data/{00000..00999}.tar` or `s3://bucket/{000..099}.tar::/more/{0..9}.tar`.
    pub train: String,
    /// Samples in one epoch, for the LR schedule when `train.max_steps` is unset. Read from the
    /// shards' `sizes.json` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_per_epoch: Option<u64>,
    /// Where captions are, for training and evaluation alike: a member (`txt`, or another
    /// extension such as `caption`), or `json:FIELD` for a string field of the JSON member.
    pub caption_key: String,
    /// Draw shards with replacement (OpenCLIP's `--dataset-resampled`).
    pub resampled: bool,
    /// Permute shards by seed + epoch and shuffle samples in a buffer.
    pub shuffle: bool,
    /// Train-time augmentation.
    pub augment: Augment,
    /// Per-worker sample shuffle buffer.
    pub shuffle_buffer: usize,
    /// Shards a worker may hold leased and unreported at once (0: no limit). A worker leases
    /// just in time (one shard ahead of its decode threads), so the natural bound is its
    /// shuffle buffer; a limit below what one batch plus the shuffle buffer span would stall
    /// the worker, so keep 0 unless shards are large.
    pub shards_per_worker: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: String::new(),
            samples_per_epoch: None,
            caption_key: "txt".into(),
            resampled: false,
            shuffle: true,
            augment: Augment::Random,
            shuffle_buffer: 5000,
            shards_per_worker: 0,
        }
    }
}

/// Learning-rate schedule after warmup (`open_clip_train/scheduler.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Cosine decay to 0 at the last step.
    Cosine,
    /// Constant.
    Const,
    /// Constant, then a linear cooldown over `train.cooldown_steps`.
    ConstCooldown,
}

/// Contrastive loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// OpenCLIP's ClipLoss (InfoNCE, both directions).
    Clip,
    /// SigLIP's sigmoid loss.
    Siglip,
}

/// Numeric precision of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// fp32 everywhere.
    Fp32,
    /// bf16 towers with fp32 master weights, loss, gradients and optimizer.
    Bf16,
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Samples per worker per step (the global batch is this times the workers).
    pub batch_size: usize,
    /// Passes over the data.
    pub epochs: u64,
    /// Stop after this many steps (also the schedule's length when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: u64,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Cooldown steps for `const-cooldown`.
    pub cooldown_steps: u64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// AdamW decoupled weight decay (not applied to gains, biases, `logit_scale` and other
    /// tensors of fewer than 2 dimensions, as OpenCLIP's trainer).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip_norm: Option<f64>,
    /// Gradient accumulation: micro-batches per step.
    pub accum_freq: usize,
    /// Seed of initialisation, shard order, shuffles and augmentation.
    pub seed: u64,
    /// Loss function.
    pub loss: Loss,
    /// Numeric precision.
    pub precision: Precision,
    /// Stop the run after this many consecutive steps with a non-finite loss or gradient
    /// (each is dropped on every rank).
    pub max_non_finite_steps: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            epochs: 1,
            max_steps: None,
            lr: 5e-4,
            warmup: 10_000,
            schedule: Schedule::Cosine,
            cooldown_steps: 0,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
            grad_clip_norm: None,
            accum_freq: 1,
            seed: 0,
            loss: Loss::Clip,
            precision: Precision::Fp32,
            max_non_finite_steps: 5,
        }
    }
}

/// `[cluster]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Training waits until this many workers are in the quorum.
    pub min_workers: usize,
    /// Further workers are refused (0: no limit).
    pub max_workers: usize,
    /// How long the first rendezvous waits for `min_workers` before the run fails.
    pub join_timeout_s: u64,
    /// How often workers heartbeat.
    pub heartbeat_interval_ms: u64,
    /// A worker silent this long leaves the membership.
    pub heartbeat_timeout_ms: u64,
    /// A collective that makes no progress for this long fails the step.
    pub step_timeout_s: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 0,
            join_timeout_s: 300,
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 5000,
            step_timeout_s: 120,
        }
    }
}

/// `[eval]`: held-out evaluation that rank 0 runs during training; results land in
/// `metrics.jsonl` (lines with an `eval` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Zero-shot classification: a `zeroshot.json` (a labelled WebDataset with class names and
    /// templates, as `distclip synth` writes) or an image folder with one subfolder per class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zeroshot: Option<String>,
    /// Retrieval: a shard spec of held-out image-caption pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<String>,
    /// Evaluate every N steps (0: only after the last step). Nothing runs unless `zeroshot` or
    /// `retrieval` is set.
    pub every_steps: u64,
    /// Images or captions per forward pass.
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { zeroshot: None, retrieval: None, every_steps: 0, batch_size: 64 }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Console line every N steps (metrics.jsonl gets every step).
    pub every_steps: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Where metrics go besides `metrics.jsonl` (OpenCLIP's `--report-to`): `tensorboard`
    /// writes event files to `RUN/tensorboard/`.
    pub report_to: Vec<String>,
    /// Copy the run directory to this object-store prefix (`s3://bucket/runs/name`, `gs://`,
    /// `az://`, `file://`) after every checkpoint and at the end (OpenCLIP's `--remote-sync`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_sync: Option<String>,
    /// Also sync every N seconds while training (0: only at checkpoints and the end);
    /// OpenCLIP's `--remote-sync-frequency`.
    pub remote_sync_frequency_s: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            every_steps: 10,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            report_to: Vec::new(),
            remote_sync: None,
            remote_sync_frequency_s: 300,
        }
    }
}

impl RunConfig {
    /// Parse TOML text. `location` names the file in errors.
    pub fn from_toml(text: &str, location: Option<&str>) -> Result<Self, ConfigError> {
        let value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            location: location.map(str::to_owned),
            message: e.to_string(),
        })?;
        Self::from_table(value, location)
    }

    /// Read a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text, Some(&path.display().to_string()))
    }

    /// Load an optional file, then apply `key=value` overrides in order, then validate.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    location: Some(p.display().to_string()),
                    message: e.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        Self::from_table(table, path.map(|p| p.display().to_string()).as_deref())
    }

    fn from_table(table: toml::Table, location: Option<&str>) -> Result<Self, ConfigError> {
        overrides::check_keys(&table)?;
        let config: RunConfig = table.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
            location: location.map(str::to_owned),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Check ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if self.model.name.trim().is_empty() {
            return bad("model.name", "must name a preset (see `distclip models`) or a model JSON");
        }
        if self.model.patch_dropout.is_some_and(|p| !(0.0..1.0).contains(&p)) {
            return bad("model.patch_dropout", "must lie in [0, 1): the fraction of patches dropped");
        }
        if !self.model.lock_image && self.model.lock_image_unlocked_groups > 0 {
            return bad("model.lock_image_unlocked_groups", "has no effect unless model.lock_image = true");
        }
        if !self.model.lock_text && self.model.lock_text_unlocked_layers > 0 {
            return bad("model.lock_text_unlocked_layers", "has no effect unless model.lock_text = true");
        }
        if let Some(r) = self.log.report_to.iter().find(|r| r.as_str() != "tensorboard") {
            let message = if r == "wandb" {
                "wandb is not supported (no network service in the product); use \"tensorboard\""
            } else {
                "takes \"tensorboard\" (the only reporter besides metrics.jsonl)"
            };
            return bad("log.report_to", message);
        }
        if self.train.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if self.train.accum_freq == 0 {
            return bad("train.accum_freq", "must be at least 1");
        }
        if self.train.max_non_finite_steps == 0 {
            return bad("train.max_non_finite_steps", "must be at least 1");
        }
        if !(self.train.lr.is_finite() && self.train.lr >= 0.0) {
            return bad("train.lr", "must be a finite number >= 0");
        }
        if !(0.0..1.0).contains(&self.train.beta1) || !(0.0..1.0).contains(&self.train.beta2) {
            return bad("train.beta1", "betas must lie in [0, 1)");
        }
        // NaN fails too.
        if self.train.eps.is_nan() || self.train.eps <= 0.0 {
            return bad("train.eps", "must be > 0");
        }
        if self.train.grad_clip_norm.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return bad("train.grad_clip_norm", "must be > 0 (omit it to disable clipping)");
        }
        if self.eval.batch_size == 0 {
            return bad("eval.batch_size", "must be at least 1");
        }
        if self.cluster.min_workers == 0 {
            return bad("cluster.min_workers", "must be at least 1");
        }
        if self.cluster.max_workers != 0 && self.cluster.max_workers < self.cluster.min_workers {
            return bad("cluster.max_workers", "must be 0 (no limit) or >= cluster.min_workers");
        }
        if self.cluster.heartbeat_timeout_ms <= self.cluster.heartbeat_interval_ms {
            return bad(
                "cluster.heartbeat_timeout_ms",
                "must be larger than cluster.heartbeat_interval_ms",
            );
        }
        Ok(())
    }

    /// The resolved config as TOML (what the run directory keeps and workers receive).
    pub fn to_toml(&self) -> String {
        // Serialising plain structs of numbers, strings and enums cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_openclip_and_round_trip() {
        let c = RunConfig::default();
        assert_eq!(c.train.lr, 5e-4);
        assert_eq!((c.train.beta1, c.train.beta2, c.train.eps), (0.9, 0.98, 1e-6));
        assert_eq!(c.train.weight_decay, 0.2);
        let back = RunConfig::from_toml(&c.to_toml(), None).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn file_then_overrides() {
        let dir = std::env::temp_dir().join(format!("distclip-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("run.toml");
        std::fs::write(&p, "[train]\nlr = 1e-3\nbatch_size = 8\n[model]\nname = \"tiny\"\n").unwrap();
        let c = RunConfig::load(
            Some(&p),
            &["train.lr=2e-3".into(), "data.augment=none".into(), "train.max_steps=7".into()],
        )
        .unwrap();
        assert_eq!(c.train.lr, 2e-3);
        assert_eq!(c.train.batch_size, 8);
        assert_eq!(c.model.name, "tiny");
        assert_eq!(c.data.augment, Augment::None);
        assert_eq!(c.train.max_steps, Some(7));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_key_suggests_nearest() {
        let e = RunConfig::load(None, &["train.learning_rat=1".into()]).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownKey { ref key, .. } if key == "train.learning_rat"));
        let e = RunConfig::from_toml("[train]\nbatchsize = 3\n", Some("x.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("train.batchsize") && msg.contains("train.batch_size"), "{msg}");
        let e = RunConfig::from_toml("[trian]\nlr = 3\n", None).unwrap_err();
        assert!(e.to_string().contains("did you mean `train`"), "{e}");
    }

    #[test]
    fn wrong_types_and_ranges_are_named() {
        let e = RunConfig::from_toml("[train]\nlr = \"fast\"\n", Some("a.toml")).unwrap_err();
        assert!(e.to_string().contains("a.toml") && e.to_string().contains("lr"), "{e}");
        let e = RunConfig::load(None, &["train.batch_size=0".into()]).unwrap_err();
        assert!(e.to_string().contains("train.batch_size"), "{e}");
        let e = RunConfig::load(None, &["train.lr".into()]).unwrap_err();
        assert!(matches!(e, ConfigError::BadOverride(_)));
        let e = RunConfig::load(None, &["data.augment=sideways".into()]).unwrap_err();
        assert!(e.to_string().contains("augment"), "{e}");
    }
}
