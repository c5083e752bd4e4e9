//! Errors of the coordinator as a program (start-up, files, network). Errors a worker's call
//! can get are [`crate::machine::MachineError`], sent back as gRPC statuses.

use std::path::PathBuf;

/// Why the coordinator could not start or keep running. Each names the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The run has no shards.
    #[error(
        "no training data: pass --data SPEC (or set data.train in the config) naming at least one shard"
    )]
    NoData,
    /// Resampled runs have no natural end.
    #[error(
        "data.resampled draws shards with replacement, so the run needs an end: set train.max_steps or data.samples_per_epoch"
    )]
    ResampledWithoutEnd,
    /// A file in the run directory could not be written or read.
    #[error(
        "cannot {action} {path}: {source}; check that the run directory is writable and the disk not full"
    )]
    Io {
        /// read, write, create, ...
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `state.json` exists but cannot be used.
    #[error(
        "cannot resume from {path}: {message}; use a fresh --run-dir or move the file away to start over"
    )]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `--resume` named no usable checkpoint.
    #[error(
        "cannot resume from checkpoint `{spec}`: {message}; pass --resume latest, a checkpoint directory, or start over with a fresh --run-dir"
    )]
    Checkpoint {
        /// The `--resume` value.
        spec: String,
        /// What is wrong.
        message: String,
    },
    /// A configured destination (`log.remote_sync`) that cannot be used.
    #[error("{0}")]
    Remote(String),
    /// The listen address is bad or taken.
    #[error(
        "cannot listen on {addr}: {message}; pick another --listen address (port 0 picks a free port)"
    )]
    Bind {
        /// The address as given.
        addr: String,
        /// Why.
        message: String,
    },
    /// The HTTP (metrics) listen address is bad or taken.
    #[error(
        "cannot listen for HTTP (/metrics) on {addr}: {message}; pick another --http-listen address (port 0 picks a free port)"
    )]
    HttpBind {
        /// The address as given.
        addr: String,
        /// Why.
        message: String,
    },
    /// The gRPC server stopped with an error.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}
