//! One call for everything a run evaluates (`[eval]` of the run config, `distclip eval`):
//! zero-shot on a task file or an image folder, and retrieval on a shard spec, as one JSON
//! object `{"zeroshot": {TASK: {top1, top5, samples, chance}}, "retrieval": {...}}`.

use std::path::Path;

use burn::tensor::Device;
use distclip_model::Clip;
use serde_json::{Map, Value, json};

use crate::{EvalError, EvalOptions, ZeroShotFile, retrieval, zero_shot_folder, zero_shot_webdataset};

/// What to evaluate.
#[derive(Debug, Clone, Default)]
pub struct Suite {
    /// A `zeroshot.json` task file, or an image folder with one subfolder per class (reported
    /// as the task `folder`).
    pub zeroshot: Option<String>,
    /// Prompt templates for an image folder (`{}` is the class name); OpenCLIP's defaults
    /// when empty.
    pub templates: Vec<String>,
    /// A captioned shard spec for retrieval.
    pub retrieval: Option<String>,
}

impl Suite {
    /// Whether there is anything to run.
    pub fn is_empty(&self) -> bool {
        self.zeroshot.is_none() && self.retrieval.is_none()
    }
}

/// Zero-shot accuracy per task, as a JSON object.
pub fn zero_shot_path(
    model: &Clip,
    device: &Device,
    path: &Path,
    templates: &[String],
    opts: &EvalOptions,
) -> Result<Value, EvalError> {
    if path.is_dir() {
        let acc = zero_shot_folder(model, device, path, templates, opts)?;
        return Ok(json!({ "folder": acc }));
    }
    let file = ZeroShotFile::load(path)?;
    let results = zero_shot_webdataset(model, device, &file, opts)?;
    Ok(Value::Object(
        results.into_iter().map(|(name, acc)| (name, serde_json::to_value(acc).unwrap_or_default())).collect(),
    ))
}

/// Run the suite.
pub fn evaluate(model: &Clip, device: &Device, suite: &Suite, opts: &EvalOptions) -> Result<Value, EvalError> {
    let mut out = Map::new();
    if let Some(path) = &suite.zeroshot {
        out.insert("zeroshot".into(), zero_shot_path(model, device, Path::new(path), &suite.templates, opts)?);
    }
    if let Some(spec) = &suite.retrieval {
        let m = retrieval(model, device, spec, opts)?;
        out.insert("retrieval".into(), serde_json::to_value(m).unwrap_or_default());
    }
    Ok(Value::Object(out))
}
