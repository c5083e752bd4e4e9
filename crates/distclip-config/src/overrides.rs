//! `--set key=value` overrides and the unknown-key check with a "did you mean" suggestion.

use crate::{ConfigError, RunConfig};

/// Every dotted key the config accepts (sections and leaves), from the serialised defaults plus
/// the optional keys that the defaults leave out.
pub fn known_keys() -> Vec<String> {
    let mut keys = Vec::new();
    let defaults: toml::Table = toml::from_str(&RunConfig::default().to_toml()).unwrap_or_default();
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if let toml::Value::Table(sub) = v {
                walk(&key, sub, out);
            }
            out.push(key);
        }
    }
    walk("", &defaults, &mut keys);
    for optional in
        [
        "model.pretrained",
        "model.patch_dropout",
        "log.remote_sync",
        "data.samples_per_epoch",
        "train.max_steps",
        "train.grad_clip_norm",
        "eval.zeroshot",
        "eval.retrieval",
    ]
    {
        keys.push(optional.to_owned());
    }
    keys.sort();
    keys
}

fn nearest(key: &str, known: &[String]) -> Option<String> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

/// Refuse keys the config does not have, naming the nearest known one. serde's own
/// `deny_unknown_fields` message lists every field but does not say which one was meant.
pub(crate) fn check_keys(table: &toml::Table) -> Result<(), ConfigError> {
    let known = known_keys();
    fn walk(prefix: &str, t: &toml::Table, known: &[String]) -> Result<(), ConfigError> {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if !known.contains(&key) {
                return Err(ConfigError::UnknownKey { suggestion: nearest(&key, known), key });
            }
            if let toml::Value::Table(sub) = v {
                walk(&key, sub, known)?;
            }
        }
        Ok(())
    }
    walk("", table, &known)
}

/// Apply one `key=value` to a TOML table. The value is read as TOML (numbers, booleans, quoted
/// strings, arrays) and otherwise taken as a bare string, so `model.name=ViT-B-32` works.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) =
        assignment.split_once('=').ok_or_else(|| ConfigError::BadOverride(assignment.into()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::BadOverride(assignment.into()));
    }
    let known = known_keys();
    if !known.iter().any(|k| k == key) {
        return Err(ConfigError::UnknownKey { key: key.into(), suggestion: nearest(key, &known) });
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let leaf = parts.pop().unwrap_or(key);
    let mut node = table;
    for p in parts {
        let entry = node.entry(p.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(ConfigError::BadOverride(format!("{assignment} (`{p}` is not a section)"))),
        };
    }
    node.insert(leaf.to_owned(), value);
    Ok(())
}
