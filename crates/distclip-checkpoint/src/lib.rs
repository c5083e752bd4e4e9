//! Checkpoint directories of a run (`RUN/checkpoints/step-00000120/`, `RUN/checkpoints/final/`).
//!
//! A checkpoint is a directory of files plus `manifest.json`, which names the step and holds
//! every file's size and SHA-256. It is written under a temporary name and renamed into place
//! after everything (manifest last) is on disk, so a reader sees a whole checkpoint or none;
//! the checksums catch what the rename cannot (a truncated copy, a flipped bit on a disk).
//!
//! The files distclip writes (the worker writes them, the coordinator reads `run_state.json`):
//! - [`MODEL_FILE`]: the model as safetensors with OpenCLIP's parameter names;
//! - [`OPTIMIZER_FILE`]: parameters, AdamW moments and step (the worker's trainer state);
//! - [`RUN_STATE_FILE`]: the coordinator's run state at that step (epoch, samples seen, the
//!   exactly-once ledger's committed positions); every random choice of a run is derived from
//!   `train.seed` and a position (epoch, shard, sample), so this is also the RNG state.
//! - [`CONFIG_FILE`]: the resolved run configuration.
//!
//! This crate knows files, not models: no Burn, no network.

pub mod durable;
mod resolve;
mod write;

pub use resolve::{Resolved, Skipped, list, resolve, verify};
pub use write::{prune, write_checkpoint};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The model, OpenCLIP-named safetensors.
pub const MODEL_FILE: &str = "model.safetensors";
/// Parameters, optimizer moments and step.
pub const OPTIMIZER_FILE: &str = "optimizer.bin";
/// The coordinator's run state (JSON).
pub const RUN_STATE_FILE: &str = "run_state.json";
/// The resolved run configuration (TOML).
pub const CONFIG_FILE: &str = "config.toml";
/// The manifest, written last.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the checkpoint written when a run finishes.
pub const FINAL_NAME: &str = "final";
/// Version of the manifest layout.
pub const FORMAT_VERSION: u32 = 1;

/// The directory name of the checkpoint after `step` steps.
pub fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Steps applied to the weights in this checkpoint.
    pub step: u64,
    /// The epoch the run was in.
    pub epoch: u64,
    /// Samples committed before this checkpoint.
    pub samples_seen: u64,
    /// The run it belongs to.
    pub run_id: String,
    /// Seconds since the Unix epoch when it was written.
    pub created_unix: f64,
    /// Every file: size and SHA-256 (hex).
    pub files: BTreeMap<String, FileEntry>,
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

/// What a checkpoint is about, besides its files.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// Steps applied.
    pub step: u64,
    /// Epoch.
    pub epoch: u64,
    /// Samples committed.
    pub samples_seen: u64,
    /// The run's id.
    pub run_id: String,
}

/// Checkpoint errors; each names the directory or file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The checkpoint is incomplete or damaged.
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt {
        /// The checkpoint directory.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// No usable checkpoint.
    #[error("no usable checkpoint in {path}{}", if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join("; ")) })]
    NoneUsable {
        /// Where it looked.
        path: PathBuf,
        /// The ones it rejected and why.
        skipped: Vec<String>,
    },
    /// A file name that cannot be part of a checkpoint.
    #[error("invalid checkpoint file name {0:?}: plain names only")]
    BadName(String),
}

fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.into();
    move |source| CheckpointError::Io { path, source }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
