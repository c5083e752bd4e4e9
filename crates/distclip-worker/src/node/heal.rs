//! Where a worker's state comes from besides its own steps: a peer it heals from, and the
//! checkpoint the run resumed from.

use std::path::Path;

use distclip_comm::CommOptions;

use super::WorkerError;
use super::retry::{self, Retry};
use crate::Trainer;

/// Pull parameters and optimizer state from a peer at `step`. The peer refreshes what it serves
/// when it enters the same quorum, which may be a moment after this worker does: retry while it
/// answers ([`retry::HEAL_WAIT`]), but give up once it could not be reached for
/// [`retry::HEAL_UNREACHABLE`]'s time (it died).
pub(super) fn heal(
    rt: &tokio::runtime::Runtime,
    trainer: &mut Trainer,
    peer: &str,
    opts: &CommOptions,
    step: u64,
) -> Result<(), WorkerError> {
    let mut waiting = Retry::new(retry::HEAL_WAIT);
    let mut unreachable = Retry::new(retry::HEAL_UNREACHABLE);
    loop {
        let attempt = rt
            .block_on(distclip_comm::fetch_state(peer, opts))
            .map_err(|e| e.to_string())
            .and_then(|bytes| trainer.load_state_bytes(&bytes).map_err(|e| e.to_string()));
        match attempt {
            Ok(()) if trainer.step() == step => {
                tracing::info!("healed from {peer} at step {step}");
                return Ok(());
            }
            Ok(()) => {
                unreachable.reset();
                tracing::debug!("{peer} served step {}, waiting for step {step}", trainer.step());
            }
            Err(e) => {
                tracing::debug!("healing from {peer}: {e}");
                if unreachable.next_delay().is_none() {
                    return Err(WorkerError::Setup(format!("could not heal from {peer} at step {step}: {e}")));
                }
            }
        }
        if !waiting.wait() {
            return Err(WorkerError::Setup(format!(
                "could not heal from {peer} at step {step} within {:?}",
                retry::HEAL_WAIT.give_up_after.unwrap_or_default()
            )));
        }
    }
}

/// Load the optimizer state of the checkpoint the run resumed from (the coordinator verified
/// its checksums; the state carries its own).
pub(super) fn resume(trainer: &mut Trainer, dir: &Path) -> Result<(), WorkerError> {
    let path = dir.join(distclip_checkpoint::OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        WorkerError::Setup(format!(
            "resuming from {}: {e}; every worker must see the run directory under the same path (a shared volume), or pass --checkpoint-dir",
            path.display()
        ))
    })?;
    trainer
        .load_state_bytes(&bytes)
        .map_err(|e| WorkerError::Setup(format!("resuming from {}: {e}", path.display())))?;
    tracing::info!("resumed from {} at step {}", dir.display(), trainer.step());
    Ok(())
}
