//! `--resume latest|PATH`: the run state of a checkpoint replaces `state.json`, so the run
//! continues exactly after the checkpoint's step (the ledger's committed positions included);
//! steps committed after it are done again, and their metrics lines are dropped.

use std::path::PathBuf;

use serde_json::json;

use crate::error::CoordinatorError;
use crate::machine::{Event, SavedState};
use crate::persist::RunDir;

/// The run state to resume with and the checkpoint it came from.
pub(crate) fn from_checkpoint(dir: &RunDir, spec: &str) -> Result<(SavedState, PathBuf), CoordinatorError> {
    let fail = |message: String| CoordinatorError::Checkpoint { spec: spec.to_owned(), message };
    let resolved = distclip_checkpoint::resolve(spec, &dir.checkpoints_path()).map_err(|e| fail(e.to_string()))?;
    let state_path = resolved.dir.join(distclip_checkpoint::RUN_STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(|e| fail(format!("{}: {e}", state_path.display())))?;
    let mut saved: SavedState =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("{}: {e}", state_path.display())))?;
    // Quorum ids only grow: the aborted attempt may have used higher ones than the checkpoint
    // knew, and a late message of that attempt must never match a new quorum.
    if let Ok(Some(current)) = dir.load_state() {
        saved.quorum_id = saved.quorum_id.max(current.quorum_id) + 1;
    }
    saved.last_commit = None;
    let dropped = dir.truncate_metrics(saved.step)?;
    let mut events = Vec::new();
    for s in &resolved.skipped {
        tracing::warn!("skipping checkpoint {}: {}", s.path.display(), s.reason);
        events.push(Event {
            kind: "checkpoint_corrupt",
            fields: obj(json!({"path": s.path.display().to_string(), "reason": s.reason})),
        });
    }
    tracing::info!(
        "resuming from checkpoint {} (after step {}, epoch {}, {} samples seen)",
        resolved.dir.display(),
        saved.step,
        saved.epoch,
        saved.samples_seen
    );
    events.push(Event {
        kind: "resume_from_checkpoint",
        fields: obj(json!({
            "path": resolved.dir.display().to_string(),
            "after_step": saved.step,
            "epoch": saved.epoch,
            "samples_seen": saved.samples_seen,
            "metrics_lines_dropped": dropped,
            "skipped": resolved.skipped.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>(),
        })),
    });
    dir.append_events(&events)?;
    Ok((saved, resolved.dir))
}

fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().cloned().unwrap_or_default()
}
