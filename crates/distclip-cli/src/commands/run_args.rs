//! Run options shared by `distclip coordinator` and `distclip launch`: a config file, `--set`
//! overrides, flags for the common keys, and the run token. Everything becomes `key=value`
//! overrides applied after the file, flags first and `--set` last, so an explicit `--set` wins.
//! `--data` is not here: each command declares it (required) itself.

use std::path::PathBuf;

/// Common run options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// TOML run configuration (see `distclip config`); flags and --set override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one config key, e.g. `--set train.lr=1e-3` (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Model preset (`distclip models`) or an OpenCLIP model JSON (model.name).
    #[arg(long)]
    pub model: Option<String>,
    /// Start from these weights: OpenCLIP or distclip safetensors, .bin or .pt (model.pretrained).
    #[arg(long, value_name = "FILE")]
    pub pretrained: Option<PathBuf>,
    /// Drop this fraction of image patches in training, FLIP (model.patch_dropout).
    #[arg(long, value_name = "FRACTION")]
    pub patch_dropout: Option<f64>,
    /// Freeze the image tower, LiT (model.lock_image).
    #[arg(long)]
    pub lock_image: bool,
    /// With --lock-image: leave the last N image groups trainable (model.lock_image_unlocked_groups).
    #[arg(long, value_name = "N")]
    pub lock_image_unlocked_groups: Option<usize>,
    /// Accepted for OpenCLIP compatibility; a ViT has no BatchNorm (model.lock_image_freeze_bn_stats).
    #[arg(long)]
    pub lock_image_freeze_bn_stats: bool,
    /// Freeze the text tower (model.lock_text).
    #[arg(long)]
    pub lock_text: bool,
    /// With --lock-text: leave the last N text groups trainable (model.lock_text_unlocked_layers).
    #[arg(long, value_name = "N")]
    pub lock_text_unlocked_layers: Option<usize>,
    /// Freeze LayerNorms of locked text groups, the default (model.lock_text_freeze_layer_norm).
    #[arg(long)]
    pub lock_text_freeze_layer_norm: bool,
    /// Reporters besides metrics.jsonl, comma-separated: `tensorboard` (log.report_to).
    #[arg(long, value_name = "LIST")]
    pub report_to: Option<String>,
    /// Copy the run directory to this object-store prefix, e.g. s3://bucket/runs/x (log.remote_sync).
    #[arg(long, value_name = "URL")]
    pub remote_sync: Option<String>,
    /// Seconds between remote syncs while training (log.remote_sync_frequency_s).
    #[arg(long, value_name = "SECONDS")]
    pub remote_sync_frequency: Option<u64>,
    /// Samples per worker per step (train.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Stop after this many steps (train.max_steps).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Passes over the data (train.epochs).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Peak learning rate (train.lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps (train.warmup).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Seed of initialisation, shard order, shuffles and augmentation (train.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep shards and samples in spec order (data.shuffle = false).
    #[arg(long)]
    pub no_shuffle: bool,
    /// `random` (RandomResizedCrop) or `none` (the eval transform) (data.augment).
    #[arg(long, value_parser = ["random", "none"])]
    pub augment: Option<String>,
    /// Run token every RPC must carry (`authorization: Bearer <token>`); also read from the
    /// DISTCLIP_TOKEN environment variable. None: no check.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

/// A TOML string literal, so paths and specs are never misread as numbers or tables.
pub(crate) fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl RunArgs {
    /// The flags as `key=value` overrides, followed by the `--set` ones.
    pub fn overrides(&self) -> Vec<String> {
        let mut o = Vec::new();
        if let Some(m) = &self.model {
            o.push(format!("model.name={}", quoted(m)));
        }
        if let Some(p) = &self.pretrained {
            o.push(format!(
                "model.pretrained={}",
                quoted(&p.display().to_string())
            ));
        }
        if let Some(p) = self.patch_dropout {
            o.push(format!("model.patch_dropout={p:?}"));
        }
        if self.lock_image {
            o.push("model.lock_image=true".into());
        }
        if let Some(n) = self.lock_image_unlocked_groups {
            o.push(format!("model.lock_image_unlocked_groups={n}"));
        }
        if self.lock_image_freeze_bn_stats {
            o.push("model.lock_image_freeze_bn_stats=true".into());
        }
        if self.lock_text {
            o.push("model.lock_text=true".into());
        }
        if let Some(n) = self.lock_text_unlocked_layers {
            o.push(format!("model.lock_text_unlocked_layers={n}"));
        }
        if self.lock_text_freeze_layer_norm {
            o.push("model.lock_text_freeze_layer_norm=true".into());
        }
        if let Some(r) = &self.report_to {
            let list: Vec<String> = r.split(',').map(str::trim).filter(|s| !s.is_empty()).map(quoted).collect();
            o.push(format!("log.report_to=[{}]", list.join(", ")));
        }
        if let Some(u) = &self.remote_sync {
            o.push(format!("log.remote_sync={}", quoted(u)));
        }
        if let Some(f) = self.remote_sync_frequency {
            o.push(format!("log.remote_sync_frequency_s={f}"));
        }
        if let Some(b) = self.batch_size {
            o.push(format!("train.batch_size={b}"));
        }
        if let Some(s) = self.max_steps {
            o.push(format!("train.max_steps={s}"));
        }
        if let Some(e) = self.epochs {
            o.push(format!("train.epochs={e}"));
        }
        if let Some(lr) = self.lr {
            // `{:?}` keeps a decimal point or exponent, so TOML reads a float, never an integer.
            o.push(format!("train.lr={lr:?}"));
        }
        if let Some(w) = self.warmup {
            o.push(format!("train.warmup={w}"));
        }
        if let Some(s) = self.seed {
            o.push(format!("train.seed={s}"));
        }
        if self.no_shuffle {
            o.push("data.shuffle=false".into());
        }
        if let Some(a) = &self.augment {
            o.push(format!("data.augment={}", quoted(a)));
        }
        o.extend(self.set.iter().cloned());
        o
    }

    /// The same options as command-line arguments for a child `distclip coordinator` (what
    /// `distclip launch` forwards): `--config` and one `--set` per override. The token is not
    /// among them: it goes through the environment, where other users cannot read it.
    pub fn to_cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(c) = &self.config {
            args.push("--config".to_string());
            args.push(c.display().to_string());
        }
        for o in self.overrides() {
            args.push("--set".to_string());
            args.push(o);
        }
        args
    }

    /// The run token: `--token`, else DISTCLIP_TOKEN, else none.
    pub fn token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| std::env::var("DISTCLIP_TOKEN").ok())
            .filter(|t| !t.is_empty())
    }

    /// Load the config file (if any) with these overrides, then `extra` ones (a command's own
    /// flags such as `--min-workers`), validated.
    pub fn load(&self, extra: &[String]) -> anyhow::Result<distclip_config::RunConfig> {
        let mut overrides = self.overrides();
        // A command's own flags go before --set, so --set still has the last word.
        let at = overrides.len() - self.set.len();
        overrides.splice(at..at, extra.iter().cloned());
        Ok(distclip_config::RunConfig::load(
            self.config.as_deref(),
            &overrides,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_overrides_and_set_wins() {
        let a = RunArgs {
            model: Some("ViT-B-32".into()),
            batch_size: Some(8),
            lr: Some(1.0),
            no_shuffle: true,
            augment: Some("none".into()),
            set: vec!["train.batch_size=16".into()],
            ..Default::default()
        };
        let c = a
            .load(&[
                "cluster.min_workers=2".into(),
                "data.train=\"/d/{0..3}.tar\"".into(),
            ])
            .unwrap();
        assert_eq!(c.data.train, "/d/{0..3}.tar");
        assert_eq!(c.train.batch_size, 16, "--set is applied last");
        assert_eq!(c.train.lr, 1.0);
        assert!(!c.data.shuffle);
        assert_eq!(c.data.augment, distclip_config::Augment::None);
        assert_eq!(c.cluster.min_workers, 2);
        assert_eq!(quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
        let cli = RunArgs {
            token: Some("t".into()),
            ..a
        }
        .to_cli_args();
        assert_eq!(&cli[..2], ["--set", "model.name=\"ViT-B-32\""]);
        assert_eq!(&cli[cli.len() - 2..], ["--set", "train.batch_size=16"]);
        assert!(!cli.iter().any(|a| a.contains("token") || a == "t"), "the token never goes on a command line: {cli:?}");
    }
}
