//! The documented default config file that `distclip config` prints: every key with a short
//! description, its allowed values and its default, optional keys commented out with an example.
//!
//! The values come from [`RunConfig::default`] serialised, not from this file, so a changed
//! default shows up here by itself; the descriptions live in [`DOCS`], and the tests fail when a
//! key of [`known_keys`](crate::known_keys) has none (or a description names a key that is gone).

use crate::RunConfig;
use std::fmt::Write as _;

/// The description of one section or key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyDoc {
    /// Dotted key (`train.lr`), or a section name (`train`).
    pub key: &'static str,
    /// What it does, in a sentence or two.
    pub doc: &'static str,
    /// The allowed values of an enum or boolean key, as written in TOML.
    pub values: &'static [&'static str],
    /// Shown commented out with this value (TOML syntax) instead of the default: optional keys,
    /// and `data.train`, which a run needs but the defaults cannot know.
    pub example: Option<&'static str>,
}

const fn key(key: &'static str, doc: &'static str) -> KeyDoc {
    KeyDoc { key, doc, values: &[], example: None }
}

const fn choice(key: &'static str, doc: &'static str, values: &'static [&'static str]) -> KeyDoc {
    KeyDoc { key, doc, values, example: None }
}

const fn example(key: &'static str, doc: &'static str, example: &'static str) -> KeyDoc {
    KeyDoc { key, doc, values: &[], example: Some(example) }
}

const BOOL: &[&str] = &["true", "false"];

/// Sections and keys in the order the file shows them.
pub(crate) const DOCS: &[KeyDoc] = &[
    key("model", "Which model to train, and from which weights."),
    key(
        "model.name",
        "A built-in preset (`distclip models` lists them) or the path of an OpenCLIP model config JSON.",
    ),
    example(
        "model.pretrained",
        "Start from these weights instead of a fresh initialisation (seeded by train.seed): OpenCLIP \
         or distclip safetensors, .bin or .pt. Unset: fresh weights.",
        "\"/models/ViT-B-32-openai.safetensors\"",
    ),
    example(
        "model.patch_dropout",
        "Fraction of image patches dropped in training (FLIP patch dropout, [0, 1)), overriding the \
         model config's vision_cfg.patch_dropout (OpenCLIP's --force-patch-dropout). Unset: the model's.",
        "0.5",
    ),
    choice("model.lock_image", "Freeze the image tower (LiT; OpenCLIP's --lock-image).", BOOL),
    key(
        "model.lock_image_unlocked_groups",
        "With lock_image: leave the last N groups trainable (proj; last block + ln_post; each earlier \
         block; the stem), as OpenCLIP's --lock-image-unlocked-groups.",
    ),
    choice(
        "model.lock_image_freeze_bn_stats",
        "OpenCLIP's --lock-image-freeze-bn-stats, accepted for compatibility: a ViT has no BatchNorm.",
        BOOL,
    ),
    choice("model.lock_text", "Freeze the text tower (OpenCLIP's --lock-text).", BOOL),
    key(
        "model.lock_text_unlocked_layers",
        "With lock_text: leave the last N groups trainable (text_projection; last block + ln_final; \
         each earlier block; the embeddings), as OpenCLIP's --lock-text-unlocked-layers.",
    ),
    choice(
        "model.lock_text_freeze_layer_norm",
        "With lock_text: freeze the LayerNorms of locked groups too (OpenCLIP's built-in text tower \
         always does); false leaves them trainable, as OpenCLIP's HF text tower does.",
        BOOL,
    ),
    key("data", "Training data: WebDataset shards that every worker streams, decodes and augments."),
    example(
        "data.train",
        "Shard spec: bash-style braces ({00000..00999}, {a,b}), `::` between sources, `@W` after a \
         source to upsample its shards by W; local paths, file://, s3://, gs://, az://, http(s):// \
         or a .txt list of patterns. Required for a run; `--data SPEC` sets it.",
        "\"/data/{00000..00999}.tar::s3://bucket/laion/{000..099}.tar@2\"",
    ),
    example(
        "data.samples_per_epoch",
        "Samples in one epoch: the LR schedule's length when train.max_steps is unset, and where a \
         resampled epoch ends. Unset: read from the shards' sizes.json, if there is one.",
        "1000000",
    ),
    key(
        "data.caption_key",
        "Which tar member holds the caption, in training and evaluation: `txt`, another member such as `caption`, or `json:FIELD` for a field of the `json` member.",
    ),
    choice(
        "data.resampled",
        "Draw shards with replacement (OpenCLIP's --dataset-resampled) instead of every sample exactly \
         once per epoch; needs train.max_steps or data.samples_per_epoch.",
        BOOL,
    ),
    choice(
        "data.shuffle",
        "Permute the shards by seed + epoch and shuffle samples in each worker's buffer; `false` keeps \
         spec order.",
        BOOL,
    ),
    choice(
        "data.augment",
        "Train-time augmentation: `random` is OpenCLIP's RandomResizedCrop (scale 0.9 to 1, bicubic), \
         `none` the eval transform (resize the shortest side, centre crop).",
        &["random", "none"],
    ),
    key("data.shuffle_buffer", "Samples in each worker's shuffle buffer."),
    key(
        "data.shards_per_worker",
        "Shards a worker may hold leased and unreported at once (0: no limit). Workers lease just in \
         time, so keep 0 unless shards are large: a limit below one batch plus the shuffle buffer \
         stalls the worker.",
    ),
    key("train", "Optimisation. The defaults are OpenCLIP's for ViTs."),
    key(
        "train.batch_size",
        "Samples per worker per step (at least 1); the global batch is this times the workers.",
    ),
    key("train.epochs", "Passes over the data."),
    example(
        "train.max_steps",
        "Stop after this many steps; also the LR schedule's length. Unset: run train.epochs.",
        "10000",
    ),
    key("train.lr", "Peak learning rate (>= 0), reached at the end of the warmup."),
    key("train.warmup", "Steps of linear warmup from 0 to train.lr."),
    choice(
        "train.schedule",
        "Learning rate after the warmup: `cosine` decays to 0 at the last step, `const` stays at \
         train.lr, `const-cooldown` stays, then decays linearly over train.cooldown_steps.",
        &["cosine", "const", "const-cooldown"],
    ),
    key("train.cooldown_steps", "Steps of the final linear cooldown of `const-cooldown`."),
    key("train.beta1", "AdamW beta1, in [0, 1)."),
    key("train.beta2", "AdamW beta2, in [0, 1)."),
    key("train.eps", "AdamW epsilon (> 0)."),
    key(
        "train.weight_decay",
        "AdamW decoupled weight decay; as in OpenCLIP's trainer not applied to gains, biases, \
         logit_scale and other tensors of fewer than 2 dimensions.",
    ),
    example(
        "train.grad_clip_norm",
        "Clip the global gradient norm to this value (> 0). Unset: no clipping.",
        "1.0",
    ),
    key(
        "train.accum_freq",
        "Gradient accumulation: micro-batches per step (at least 1); a step updates as one batch of \
         accum_freq x batch_size samples would.",
    ),
    key("train.seed", "Seed of the initialisation, shard order, shuffles and augmentation."),
    choice(
        "train.loss",
        "Contrastive loss: `clip` is OpenCLIP's ClipLoss (InfoNCE both ways), `siglip` SigLIP's \
         sigmoid loss.",
        &["clip", "siglip"],
    ),
    choice(
        "train.precision",
        "Numeric precision: `fp32` everywhere, or `bf16` mixed precision: the towers compute in \
         bf16 from fp32 master weights; loss, gradients and optimizer stay fp32. Meant for \
         `--device cuda:N` (tch build); its speed is not measured yet.",
        &["fp32", "bf16"],
    ),
    key(
        "train.max_non_finite_steps",
        "A step whose loss or gradient is not finite is dropped on every rank (event \
         `step_non_finite`); this many in a row (at least 1) stop the run.",
    ),
    key("cluster", "Membership, heartbeats and timeouts, decided by the coordinator."),
    key("cluster.min_workers", "Training waits until this many workers (at least 1) are in the quorum."),
    key(
        "cluster.max_workers",
        "Refuse workers beyond this many (0: no limit; otherwise at least cluster.min_workers).",
    ),
    key(
        "cluster.join_timeout_s",
        "Seconds the run may stay below cluster.min_workers (at the start or later) before it fails.",
    ),
    key("cluster.heartbeat_interval_ms", "How often workers heartbeat, in milliseconds."),
    key(
        "cluster.heartbeat_timeout_ms",
        "A worker silent this long (milliseconds, more than the interval) leaves the membership.",
    ),
    key(
        "cluster.step_timeout_s",
        "Seconds a collective or a vote may make no progress before the step fails; also how long a \
         quorum waits for stragglers.",
    ),
    key(
        "eval",
        "Held-out evaluation that rank 0 runs during training; results land in metrics.jsonl (lines \
         with an `eval` field).",
    ),
    example(
        "eval.zeroshot",
        "Zero-shot classification: a zeroshot.json (a labelled WebDataset with class names and \
         templates, as `distclip synth` writes) or an image folder with one subfolder per class. \
         Unset: none.",
        "\"/data/heldout/zeroshot.json\"",
    ),
    example(
        "eval.retrieval",
        "Image-text retrieval on a shard spec of held-out pairs. Unset: none.",
        "\"/data/heldout/{00000..00003}.tar\"",
    ),
    key(
        "eval.every_steps",
        "Evaluate every N steps (0: only after the last step). Nothing runs unless eval.zeroshot or \
         eval.retrieval is set.",
    ),
    key("eval.batch_size", "Images or captions per forward pass (at least 1)."),
    key("log", "Logging and checkpoints."),
    key("log.every_steps", "Console line every N steps (metrics.jsonl gets every step)."),
    key("log.checkpoint_every", "Checkpoint every N steps (0: only at the end)."),
    key("log.keep_checkpoints", "How many checkpoints to keep."),
    key(
        "log.report_to",
        "Reporters besides metrics.jsonl (OpenCLIP's --report-to): [\"tensorboard\"] writes TensorBoard \
         event files to RUN/tensorboard/ (train/<metric> per step, val/<metric> per evaluation).",
    ),
    example(
        "log.remote_sync",
        "Copy the run directory (logs, state, checkpoints) to this object-store prefix after every \
         checkpoint, every remote_sync_frequency_s and at the end (OpenCLIP's --remote-sync); new and \
         changed files only, nothing deleted remotely. Credentials as for data.train. Unset: no copy.",
        "\"s3://bucket/runs/my-run\"",
    ),
    key(
        "log.remote_sync_frequency_s",
        "With remote_sync: also sync every N seconds while training (0: only at checkpoints and the end).",
    ),
];

const WIDTH: usize = 96;

/// `# `-prefixed lines of at most about [`WIDTH`] columns.
fn comment(out: &mut String, text: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > WIDTH - 2 {
            let _ = writeln!(out, "# {line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "# {line}");
    }
}

fn describe(out: &mut String, d: &KeyDoc) {
    let mut text = d.doc.to_owned();
    if !d.values.is_empty() {
        let values: Vec<String> = d.values.iter().map(|v| format!("`{v}`")).collect();
        let _ = write!(text, " One of {}.", values.join(" | "));
    }
    comment(out, &text);
}

/// The default run configuration as a commented TOML file with `model.name = model`.
///
/// Every key of [`RunConfig`] appears once, under a comment that says what it does and which
/// values it takes; optional keys and `data.train` are commented out with an example. Parsed
/// back with [`RunConfig::from_toml`] it gives exactly [`RunConfig::default`] with that model
/// name. The name is not checked here (this crate does not know the model presets).
pub fn documented_default(model: &str) -> String {
    let mut config = RunConfig::default();
    config.model.name = model.to_owned();
    // Serialising plain structs of numbers, strings and enums cannot fail.
    let values = match toml::Value::try_from(&config) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let mut out = String::new();
    comment(
        &mut out,
        "distclip run configuration. Every key is shown with its default; commented-out keys are \
         optional and show an example. Use it with `distclip coordinator --config FILE` or `distclip \
         launch --config FILE`; command-line flags and `--set key=value` override it.",
    );
    let doc_of = |k: &str| DOCS.iter().find(|d| d.key == k);
    // Sections in the documented order, then any the docs miss, so the file always round-trips.
    let mut sections: Vec<&str> =
        DOCS.iter().filter(|d| !d.key.contains('.')).map(|d| d.key).collect();
    sections.extend(values.keys().map(String::as_str).filter(|s| doc_of(s).is_none()));
    for section in sections {
        let table = match values.get(section) {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => toml::Table::new(),
        };
        out.push('\n');
        match doc_of(section) {
            Some(d) => describe(&mut out, d),
            None => comment(&mut out, "(not documented yet)"),
        }
        let _ = writeln!(out, "[{section}]");
        let prefix = format!("{section}.");
        let mut keys: Vec<(String, Option<&KeyDoc>)> = DOCS
            .iter()
            .filter_map(|d| d.key.strip_prefix(&prefix).map(|leaf| (leaf.to_owned(), Some(d))))
            .collect();
        keys.extend(
            table
                .keys()
                .filter(|leaf| doc_of(&format!("{prefix}{leaf}")).is_none())
                .map(|leaf| (leaf.clone(), None)),
        );
        for (leaf, d) in keys {
            out.push('\n');
            match d {
                Some(d) => describe(&mut out, d),
                None => comment(&mut out, "(not documented yet)"),
            }
            match (d.and_then(|d| d.example), table.get(&leaf)) {
                (Some(example), _) => {
                    let _ = writeln!(out, "# {leaf} = {example}");
                }
                (None, Some(value)) => {
                    let _ = writeln!(out, "{leaf} = {value}");
                }
                // Documented but absent from the defaults and without an example: the tests
                // refuse this; show the key so the reader still learns it exists.
                (None, None) => {
                    let _ = writeln!(out, "# {leaf} =");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::known_keys;
    use std::collections::BTreeSet;

    #[test]
    fn every_key_is_documented_and_every_doc_names_a_key() {
        let known: BTreeSet<String> = known_keys().into_iter().collect();
        let documented: BTreeSet<String> = DOCS.iter().map(|d| d.key.to_owned()).collect();
        let missing: Vec<_> = known.difference(&documented).collect();
        assert!(missing.is_empty(), "keys without a description in template.rs DOCS: {missing:?}");
        let stale: Vec<_> = documented.difference(&known).collect();
        assert!(stale.is_empty(), "descriptions of keys RunConfig does not have: {stale:?}");
        assert_eq!(documented.len(), DOCS.len(), "a key is described twice");
        for d in DOCS {
            assert!(!d.doc.trim().is_empty(), "{} has an empty description", d.key);
        }
    }

    #[test]
    fn the_file_parses_back_to_the_defaults_with_the_model_name() {
        for model in ["tiny", "ViT-B-32", "/models/my \"odd\" config.json"] {
            let text = documented_default(model);
            let parsed = RunConfig::from_toml(&text, Some("template"))
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            let mut expected = RunConfig::default();
            expected.model.name = model.to_owned();
            assert_eq!(parsed, expected, "{text}");
        }
    }

    #[test]
    fn every_key_appears_with_a_comment_above_it() {
        let text = documented_default("tiny");
        assert!(!text.contains("not documented yet"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let defaults: toml::Table = toml::from_str(&RunConfig::default().to_toml()).unwrap();
        for d in DOCS {
            let Some((section, leaf)) = d.key.split_once('.') else {
                let at = lines.iter().position(|l| *l == format!("[{}]", d.key));
                let at = at.unwrap_or_else(|| panic!("no [{}] header", d.key));
                assert!(lines[at - 1].starts_with("# "), "[{}] has no comment", d.key);
                continue;
            };
            let start = lines.iter().position(|l| *l == format!("[{section}]")).unwrap();
            let end = lines[start + 1..]
                .iter()
                .position(|l| l.starts_with('['))
                .map_or(lines.len(), |e| start + 1 + e);
            let optional = defaults[section].get(leaf).is_none();
            let (live, commented) = (format!("{leaf} = "), format!("# {leaf} = "));
            let at = (start..end)
                .find(|&i| lines[i].starts_with(&live) || lines[i].starts_with(&commented))
                .unwrap_or_else(|| panic!("{} is missing from [{section}]:\n{text}", d.key));
            assert!(lines[at - 1].starts_with("# "), "{} has no comment above it", d.key);
            if optional {
                assert!(d.example.is_some(), "optional {} needs an example", d.key);
                assert!(lines[at].starts_with(&commented), "optional {} is not commented", d.key);
            }
            if d.example.is_none() {
                assert!(lines[at].starts_with(&live), "{} should be set to its default", d.key);
            }
        }
        assert!(text.contains("\nname = \"tiny\"\n"), "{text}");
        assert!(text.contains("`cosine` | `const` | `const-cooldown`"), "{text}");
        assert!(text.contains("`clip` | `siglip`") && text.contains("`fp32` | `bf16`"), "{text}");
        assert!(text.contains("`random` | `none`"), "{text}");
        assert!(text.lines().all(|l| l.len() <= WIDTH + 20), "{text}");
    }

    #[test]
    fn listed_values_and_examples_are_accepted_and_others_refused() {
        for d in DOCS {
            for v in d.values {
                RunConfig::load(None, &[format!("{}={v}", d.key)])
                    .unwrap_or_else(|e| panic!("{} = {v} is listed but refused: {e}", d.key));
            }
            if !d.values.is_empty() && d.values != BOOL {
                let bad = RunConfig::load(None, &[format!("{}=no-such-value", d.key)]);
                assert!(bad.is_err(), "{} accepts values it does not list", d.key);
            }
            if let Some(e) = d.example {
                RunConfig::load(None, &[format!("{}={e}", d.key)])
                    .unwrap_or_else(|err| panic!("the example {} = {e} is refused: {err}", d.key));
            }
        }
    }
}
