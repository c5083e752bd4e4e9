//! Reading a run directory as the coordinator writes it: `metrics.jsonl` (step lines and
//! evaluation lines), `events.jsonl`, `config.toml` and `state.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::ReportError;

/// Everything a report shows, read from one run directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The run directory.
    pub dir: PathBuf,
    /// `run_id` from `state.json`, when the file is there.
    pub run_id: Option<String>,
    /// A few settings of `config.toml`, when the file is there.
    pub config: Option<ConfigSummary>,
    /// One record per committed step, by step; where a step has several lines (a resumed
    /// run redoes the steps after its last persisted state), the last line.
    pub steps: Vec<StepRecord>,
    /// Step lines replaced by a later line for the same step.
    pub superseded: usize,
    /// Evaluation lines, by step (the last line for a step wins, as for steps).
    pub evals: Vec<EvalRecord>,
    /// `events.jsonl` in file order; `None` when the file is missing.
    pub events: Option<Vec<EventRecord>>,
}

/// The settings of `config.toml` a report shows; a field is `None` where the file lacks it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigSummary {
    /// `model.name`.
    pub model: Option<String>,
    /// `train.batch_size` (per worker).
    pub batch_size: Option<u64>,
    /// `train.lr` (peak).
    pub lr: Option<f64>,
    /// `train.epochs`.
    pub epochs: Option<u64>,
    /// `train.max_steps`.
    pub max_steps: Option<u64>,
    /// `train.warmup`.
    pub warmup: Option<u64>,
}

/// One committed step: the global values (loss, lr... from rank 0; times are the slowest
/// worker's) and each worker's own times. `None` where the line has `null` (a non-finite
/// value) or lacks the field.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepRecord {
    /// Step index.
    pub step: u64,
    /// Epoch.
    pub epoch: Option<u64>,
    /// Workers in the step's quorum.
    pub world_size: Option<u64>,
    /// Contrastive loss.
    pub loss: Option<f64>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Exponentiated logit scale.
    pub logit_scale: Option<f64>,
    /// Global gradient norm.
    pub grad_norm: Option<f64>,
    /// Samples in the step (all workers).
    pub samples: Option<u64>,
    /// Samples committed over the run up to and including this step.
    pub samples_seen: Option<u64>,
    /// Samples per second of the step.
    pub samples_per_s: Option<f64>,
    /// Seconds of the step (the slowest worker).
    pub step_s: Option<f64>,
    /// Seconds waiting for data (the slowest worker).
    pub data_s: Option<f64>,
    /// Seconds of forward and backward (the slowest worker).
    pub compute_s: Option<f64>,
    /// Seconds in collectives (the slowest worker).
    pub comm_s: Option<f64>,
    /// Unix time the line was written.
    pub time: Option<f64>,
    /// Per worker, by worker id.
    pub workers: BTreeMap<String, WorkerStep>,
}

/// One worker's share of a step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerStep {
    /// Rank in the step's quorum.
    pub rank: Option<u64>,
    /// Samples it trained on.
    pub samples: Option<u64>,
    /// Its samples per second.
    pub samples_per_s: Option<f64>,
    /// Its step seconds.
    pub step_s: Option<f64>,
    /// Its data-wait seconds.
    pub data_s: Option<f64>,
    /// Its compute seconds.
    pub compute_s: Option<f64>,
    /// Its communication seconds.
    pub comm_s: Option<f64>,
}

/// One periodic evaluation (a metrics line with an `eval` field).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvalRecord {
    /// The step it followed.
    pub step: u64,
    /// Epoch.
    pub epoch: Option<u64>,
    /// Zero-shot classification per task.
    pub zeroshot: BTreeMap<String, ZeroShotScore>,
    /// Retrieval metrics, nested objects flattened to dotted names (`image_to_text_r1`, or
    /// `coco.image_to_text_r1` when grouped by dataset).
    pub retrieval: BTreeMap<String, f64>,
}

/// Zero-shot accuracy on one task.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ZeroShotScore {
    /// Top-1 accuracy (0..1).
    pub top1: Option<f64>,
    /// Top-5 accuracy (0..1).
    pub top5: Option<f64>,
    /// Accuracy of guessing (1 / classes).
    pub chance: Option<f64>,
    /// Images scored.
    pub samples: Option<u64>,
}

/// One line of `events.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// Line number in the file (1-based).
    pub line: usize,
    /// Unix time.
    pub time: Option<f64>,
    /// `join`, `death`, `quorum`, `checkpoint`...
    pub kind: String,
    /// The coordinator's step when it happened.
    pub step: Option<u64>,
    /// The other fields, less the ones every event has (`time`, `kind`, `step`, `epoch`,
    /// `quorum_id`).
    pub fields: Map<String, Value>,
}

/// Read `dir`'s metrics, events, config and run id. Missing `events.jsonl`, `config.toml` or
/// `state.json` are allowed (the report says so); a missing or step-less `metrics.jsonl` and
/// any malformed file are errors naming the file (and line).
pub fn load_run(dir: &Path) -> Result<Run, ReportError> {
    if !dir.is_dir() {
        return Err(ReportError::NoRunDir { path: dir.to_path_buf() });
    }
    let metrics_path = dir.join("metrics.jsonl");
    let metrics = read_optional(&metrics_path)?
        .ok_or_else(|| ReportError::NoSteps { path: metrics_path.clone() })?;
    let (steps, superseded, evals) = parse_metrics(&metrics_path, &metrics)?;
    if steps.is_empty() {
        return Err(ReportError::NoSteps { path: metrics_path });
    }
    let events_path = dir.join("events.jsonl");
    let events = read_optional(&events_path)?
        .map(|text| parse_events(&events_path, &text))
        .transpose()?;
    let config_path = dir.join("config.toml");
    let config = read_optional(&config_path)?
        .map(|text| parse_config(&config_path, &text))
        .transpose()?;
    let state_path = dir.join("state.json");
    let run_id = match read_optional(&state_path)? {
        Some(text) => parse_run_id(&state_path, &text)?,
        None => None,
    };
    Ok(Run { dir: dir.to_path_buf(), run_id, config, steps, superseded, evals, events })
}

fn read_optional(path: &Path) -> Result<Option<String>, ReportError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ReportError::Io { action: "read", path: path.to_path_buf(), source }),
    }
}

type Metrics = (Vec<StepRecord>, usize, Vec<EvalRecord>);

fn parse_metrics(path: &Path, text: &str) -> Result<Metrics, ReportError> {
    let mut steps = BTreeMap::new();
    let mut evals = BTreeMap::new();
    let mut superseded = 0;
    for (obj, line) in json_objects(path, text)? {
        let malformed = |message: String| ReportError::Malformed { path: path.to_path_buf(), line, message };
        let f = Fields { obj: &obj, prefix: String::new() };
        if let Some(eval) = obj.get("eval") {
            let record = parse_eval(&f, eval).map_err(malformed)?;
            evals.insert(record.step, record);
        } else if obj.contains_key("loss") {
            let record = parse_step(&f).map_err(malformed)?;
            if steps.insert(record.step, record).is_some() {
                superseded += 1;
            }
        } else {
            return Err(malformed(
                "neither a step line (no `loss` field) nor an evaluation line (no `eval` field)".into(),
            ));
        }
    }
    Ok((steps.into_values().collect(), superseded, evals.into_values().collect()))
}

/// A JSON-lines object and its 1-based line number.
type Line = (Map<String, Value>, usize);

/// The non-blank lines of a JSON-lines file as objects, with their line numbers.
fn json_objects(path: &Path, text: &str) -> Result<Vec<Line>, ReportError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let malformed = |message: String| ReportError::Malformed { path: path.to_path_buf(), line: i + 1, message };
        match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(obj)) => out.push((obj, i + 1)),
            Ok(other) => return Err(malformed(format!("a JSON {}, not an object", type_name(&other)))),
            Err(e) => return Err(malformed(format!("not JSON ({e})"))),
        }
    }
    Ok(out)
}

fn parse_step(f: &Fields) -> Result<StepRecord, String> {
    let mut workers = BTreeMap::new();
    match f.obj.get("workers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (id, w) in map {
                let Value::Object(w) = w else {
                    return Err(format!("`workers.{id}` is {}, not an object", show(w)));
                };
                let wf = Fields { obj: w, prefix: format!("workers.{id}.") };
                workers.insert(
                    id.clone(),
                    WorkerStep {
                        rank: wf.u64("rank")?,
                        samples: wf.u64("samples")?,
                        samples_per_s: wf.f64("samples_per_s")?,
                        step_s: wf.f64("step_s")?,
                        data_s: wf.f64("data_s")?,
                        compute_s: wf.f64("compute_s")?,
                        comm_s: wf.f64("comm_s")?,
                    },
                );
            }
        }
        Some(other) => return Err(format!("`workers` is {}, not an object", show(other))),
    }
    Ok(StepRecord {
        step: f.required_u64("step")?,
        epoch: f.u64("epoch")?,
        world_size: f.u64("world_size")?,
        loss: f.f64("loss")?,
        lr: f.f64("lr")?,
        logit_scale: f.f64("logit_scale")?,
        grad_norm: f.f64("grad_norm")?,
        samples: f.u64("samples")?,
        samples_seen: f.u64("samples_seen")?,
        samples_per_s: f.f64("samples_per_s")?,
        step_s: f.f64("step_s")?,
        data_s: f.f64("data_s")?,
        compute_s: f.f64("compute_s")?,
        comm_s: f.f64("comm_s")?,
        time: f.f64("time")?,
        workers,
    })
}

fn parse_eval(f: &Fields, eval: &Value) -> Result<EvalRecord, String> {
    let Value::Object(eval) = eval else {
        return Err(format!("`eval` is {}, not an object", show(eval)));
    };
    let mut zeroshot = BTreeMap::new();
    match eval.get("zeroshot") {
        None | Some(Value::Null) => {}
        Some(Value::Object(tasks)) => {
            for (task, score) in tasks {
                let Value::Object(score) = score else {
                    return Err(format!("`eval.zeroshot.{task}` is {}, not an object", show(score)));
                };
                let sf = Fields { obj: score, prefix: format!("eval.zeroshot.{task}.") };
                zeroshot.insert(
                    task.clone(),
                    ZeroShotScore {
                        top1: sf.f64("top1")?,
                        top5: sf.f64("top5")?,
                        chance: sf.f64("chance")?,
                        samples: sf.u64("samples")?,
                    },
                );
            }
        }
        Some(other) => return Err(format!("`eval.zeroshot` is {}, not an object", show(other))),
    }
    let mut retrieval = BTreeMap::new();
    if let Some(r) = eval.get("retrieval") {
        flatten_numbers("eval.retrieval", "", r, &mut retrieval)?;
    }
    Ok(EvalRecord { step: f.required_u64("step")?, epoch: f.u64("epoch")?, zeroshot, retrieval })
}

/// Collect the numbers under `value` as `a.b.c` names; `null`s (non-finite values) are left
/// out, anything else that is not a number or an object is an error.
fn flatten_numbers(
    field: &str,
    name: &str,
    value: &Value,
    out: &mut BTreeMap<String, f64>,
) -> Result<(), String> {
    match value {
        Value::Null => Ok(()),
        Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.insert(name.to_string(), v);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (k, v) in map {
                let name = if name.is_empty() { k.clone() } else { format!("{name}.{k}") };
                flatten_numbers(field, &name, v, out)?;
            }
            Ok(())
        }
        other => {
            let sep = if name.is_empty() { "" } else { "." };
            Err(format!("`{field}{sep}{name}` is {}, not a number", show(other)))
        }
    }
}

fn parse_events(path: &Path, text: &str) -> Result<Vec<EventRecord>, ReportError> {
    let mut out = Vec::new();
    for (mut obj, line) in json_objects(path, text)? {
        let malformed = |message: String| ReportError::Malformed { path: path.to_path_buf(), line, message };
        let f = Fields { obj: &obj, prefix: String::new() };
        let kind = match obj.get("kind") {
            Some(Value::String(k)) => k.clone(),
            Some(other) => return Err(malformed(format!("`kind` is {}, not a string", show(other)))),
            None => return Err(malformed("no `kind` field".into())),
        };
        let time = f.f64("time").map_err(malformed)?;
        let step = f.u64("step").map_err(malformed)?;
        for common in ["time", "kind", "step", "epoch", "quorum_id"] {
            obj.remove(common);
        }
        out.push(EventRecord { line, time, kind, step, fields: obj });
    }
    Ok(out)
}

fn parse_config(path: &Path, text: &str) -> Result<ConfigSummary, ReportError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ReportError::BadFile { path: path.to_path_buf(), message: e.to_string() })?;
    let get = |section: &str, key: &str| table.get(section).and_then(|s| s.get(key));
    let int = |section: &str, key: &str| get(section, key).and_then(toml::Value::as_integer).and_then(|v| u64::try_from(v).ok());
    Ok(ConfigSummary {
        model: get("model", "name").and_then(toml::Value::as_str).map(str::to_string),
        batch_size: int("train", "batch_size"),
        // TOML writes `lr = 1` for a whole number; accept both.
        lr: get("train", "lr").and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64))),
        epochs: int("train", "epochs"),
        max_steps: int("train", "max_steps"),
        warmup: int("train", "warmup"),
    })
}

fn parse_run_id(path: &Path, text: &str) -> Result<Option<String>, ReportError> {
    let state: Value = serde_json::from_str(text)
        .map_err(|e| ReportError::BadFile { path: path.to_path_buf(), message: format!("not JSON ({e})") })?;
    Ok(state.get("run_id").and_then(Value::as_str).map(str::to_string))
}

/// Typed access to one JSON object's fields, with errors that name the field by its path.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: String,
}

impl Fields<'_> {
    /// A number; missing or `null` (the coordinator's non-finite value) is `None`.
    fn f64(&self, name: &str) -> Result<Option<f64>, String> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(format!("`{}{name}` is {}, not a number", self.prefix, show(other))),
        }
    }

    /// A non-negative integer; missing or `null` is `None`.
    fn u64(&self, name: &str) -> Result<Option<u64>, String> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.is_u64() => Ok(n.as_u64()),
            Some(other) => Err(format!("`{}{name}` is {}, not a non-negative integer", self.prefix, show(other))),
        }
    }

    fn required_u64(&self, name: &str) -> Result<u64, String> {
        self.u64(name)?.ok_or_else(|| format!("no `{}{name}` field", self.prefix))
    }
}

/// A value as it appears in an error: numbers and short strings verbatim, else the type.
fn show(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() <= 40 => format!("{s:?}"),
        other => format!("a JSON {}", type_name(other)),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Worker ids that appear in any step, with every rank each had (ranks change with quorums).
pub(crate) fn worker_ranks(steps: &[StepRecord]) -> BTreeMap<&str, BTreeSet<u64>> {
    let mut out: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for s in steps {
        for (id, w) in &s.workers {
            let ranks = out.entry(id.as_str()).or_default();
            ranks.extend(w.rank);
        }
    }
    out
}
