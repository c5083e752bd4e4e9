//! What rank 0 does besides training: checkpoints, held-out evaluation, and telling the
//! coordinator about both.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;
use distclip_data::CaptionKey;
use distclip_eval::{EvalOptions, Suite};
use distclip_model::ClipConfig;
use distclip_model::checkpoint::load_state_dict;
use distclip_proto::v1 as pb;

use super::control::Client;
use crate::Trainer;

/// Rank 0's duties and what they remember between steps.
pub(super) struct Rank0 {
    pub(super) checkpoints: Checkpoints,
    pub(super) evaluator: Evaluator,
    /// `eval.every_steps` (0: only at the end).
    pub(super) eval_every: u64,
    /// The step last evaluated, so the end of the run does not evaluate it twice.
    pub(super) last_eval: Option<u64>,
}

impl Rank0 {
    /// After a committed step as rank 0: write the checkpoint the coordinator asked for (it
    /// sent the run state to store with it), evaluate when due, and record both.
    pub(super) fn after_commit(&mut self, rt: &tokio::runtime::Runtime, client: &mut Client, worker_id: &str, trainer: &Trainer, run_state: &[u8]) {
        let step = trainer.step();
        let written = (!run_state.is_empty())
            .then(|| self.checkpoints.write(trainer, &distclip_checkpoint::step_name(step), run_state));
        let eval_due = self.eval_every > 0 && step.is_multiple_of(self.eval_every);
        let results = if eval_due { self.evaluator.run(trainer) } else { None };
        if results.is_some() {
            self.last_eval = Some(step);
        }
        record(rt, client, worker_id, step, written, results);
    }

    /// At the end of the run, as the run's one final writer: evaluate (unless the last step
    /// was), write the final checkpoint and record both.
    pub(super) fn at_finish(&mut self, rt: &tokio::runtime::Runtime, client: &mut Client, worker_id: &str, trainer: &Trainer, run_state: &[u8]) {
        let step = trainer.step();
        let results = if self.last_eval != Some(step) { self.evaluator.run(trainer) } else { None };
        let written = (!run_state.is_empty())
            .then(|| self.checkpoints.write(trainer, distclip_checkpoint::FINAL_NAME, run_state));
        record(rt, client, worker_id, step, written, results);
    }
}

/// Where and how rank 0 writes checkpoints.
pub(super) struct Checkpoints {
    pub(super) root: Option<PathBuf>,
    pub(super) keep: usize,
    pub(super) config_toml: String,
}

impl Checkpoints {
    /// Write the checkpoint `name` (model, optimizer state, the coordinator's run state, the
    /// config) atomically, then drop all but the newest `keep`. Returns its path or why not.
    fn write(&self, trainer: &Trainer, name: &str, run_state: &[u8]) -> Result<PathBuf, String> {
        let root = self.root.as_ref().ok_or("the coordinator named no checkpoint directory; pass --checkpoint-dir")?;
        let state: serde_json::Value =
            serde_json::from_slice(run_state).map_err(|e| format!("the coordinator sent an unreadable run state: {e}"))?;
        let meta = distclip_checkpoint::CheckpointMeta {
            step: trainer.step(),
            epoch: state["epoch"].as_u64().unwrap_or(0),
            samples_seen: state["samples_seen"].as_u64().unwrap_or(0),
            run_id: state["run_id"].as_str().unwrap_or_default().to_owned(),
        };
        let model = distclip_model::checkpoint::safetensors_bytes(&trainer.state_dict()).map_err(|e| e.to_string())?;
        let optimizer = trainer.state_bytes();
        let files: [(&str, &[u8]); 4] = [
            (distclip_checkpoint::MODEL_FILE, &model),
            (distclip_checkpoint::OPTIMIZER_FILE, &optimizer),
            (distclip_checkpoint::RUN_STATE_FILE, run_state),
            (distclip_checkpoint::CONFIG_FILE, self.config_toml.as_bytes()),
        ];
        let path = distclip_checkpoint::write_checkpoint(root, name, &meta, &files).map_err(|e| e.to_string())?;
        if let Err(e) = distclip_checkpoint::prune(root, self.keep) {
            tracing::warn!("pruning old checkpoints: {e}");
        }
        tracing::info!("checkpoint after step {} written to {}", meta.step, path.display());
        Ok(path)
    }
}

/// Rank 0's held-out evaluation (`[eval]` of the run config).
pub(super) struct Evaluator {
    pub(super) model: ClipConfig,
    pub(super) device: Device,
    pub(super) suite: Suite,
    pub(super) batch_size: usize,
    /// `data.caption_key`: retrieval sets are read like the training data.
    pub(super) caption_key: CaptionKey,
}

impl Evaluator {
    /// Results as a JSON object, or None when nothing is configured or it failed (logged).
    fn run(&self, trainer: &Trainer) -> Option<String> {
        if self.suite.is_empty() {
            return None;
        }
        let t = Instant::now();
        // A plain (non-autodiff) copy of the current weights: evaluation needs no graph.
        let model = match load_state_dict(self.model.init(&self.device), &trainer.state_dict()) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("evaluation skipped: {e}");
                return None;
            }
        };
        let opts = EvalOptions {
            batch_size: self.batch_size.max(1),
            caption_key: self.caption_key.clone(),
            ..EvalOptions::default()
        };
        match distclip_eval::evaluate(&model, &self.device, &self.suite, &opts) {
            Ok(v) => {
                tracing::info!("evaluated after step {} in {:.1}s", trainer.step(), t.elapsed().as_secs_f64());
                Some(v.to_string())
            }
            Err(e) => {
                tracing::warn!("evaluation after step {} failed: {e}; check [eval] in the run config", trainer.step());
                None
            }
        }
    }
}

/// Tell the coordinator about a checkpoint and evaluation results (best effort: the run goes
/// on without its records, and the files are on disk either way).
fn record(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    worker_id: &str,
    step: u64,
    checkpoint: Option<Result<PathBuf, String>>,
    eval: Option<String>,
) {
    if checkpoint.is_none() && eval.is_none() {
        return;
    }
    let (path, error) = match checkpoint {
        Some(Ok(p)) => (p.display().to_string(), String::new()),
        Some(Err(e)) => {
            tracing::error!("checkpoint after step {step} failed: {e}");
            (String::new(), e)
        }
        None => (String::new(), String::new()),
    };
    let req = pb::RecordRequest {
        worker_id: worker_id.to_owned(),
        step,
        checkpoint: path,
        checkpoint_error: error,
        eval_json: eval.unwrap_or_default(),
    };
    if let Err(s) = rt.block_on(client.record(req)) {
        tracing::warn!("could not record a checkpoint or evaluation with the coordinator: {}", s.message());
    }
}
