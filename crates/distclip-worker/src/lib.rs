//! The distributed CLIP training step of DESIGN.md ("One training step"), exact with respect to
//! the global batch: W workers × b samples give the update of 1 worker × W·b samples.
//!
//! A [`Trainer`] holds the model (Burn, autodiff), its parameters as one flat f32 buffer and the
//! AdamW state. A step is two calls so that a coordinator's commit vote can sit in between:
//!
//! 1. [`Trainer::forward_backward`] runs the forward pass, gathers features from every rank
//!    through a [`Collective`], computes the global InfoNCE loss on leaves, reduces the feature
//!    gradients, back-propagates through the towers and all-reduces the parameter gradients.
//!    Nothing is applied; the result is a [`PendingStep`].
//! 2. If every rank of the step's quorum finished (the coordinator says "commit"),
//!    [`Trainer::apply`] clips, runs AdamW with OpenCLIP's schedule and clamps `logit_scale`.
//!    Otherwise the caller drops the `PendingStep`, and the trainer is as before the step.
//!
//! The network is not here: the step talks to the other ranks only through [`Collective`].

pub mod collective;
pub mod node;
pub mod optim;
pub mod params;
mod state;
mod step;

pub use collective::{Collective, CollectiveError, SingleProcess, ThreadGroup};
pub use optim::{AdamW, LOGIT_SCALE_MAX, OptimConfig};
pub use params::{ParamLayout, ParamSpec, checksum};
pub use step::{DEFAULT_BUCKET_BYTES, LocalBatch, PendingStep, StepStats, Trainer};

/// Why a step (or a state transfer) failed. Any error from [`Trainer::forward_backward`] means
/// the step is dropped: nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// This rank's batch is malformed (sizes, token ids out of the vocabulary).
    #[error("local batch: {0}")]
    Batch(String),
    /// Another rank reported a malformed batch, so no rank can complete the step.
    #[error("rank {rank} reported a malformed batch; the step is dropped")]
    PeerBatch {
        /// The rank that reported it.
        rank: usize,
    },
    /// Every rank had 0 samples.
    #[error("the global batch is empty (every rank has 0 samples)")]
    EmptyGlobalBatch,
    /// A collective failed (a peer died, timed out, or disagreed on sizes).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// Peers exchanged values that cannot be right (e.g. a negative sample count).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The global loss or gradient is NaN or infinite; the step must be dropped on every rank
    /// (all ranks see the same reduced values, so all of them report it).
    #[error("non-finite {what} ({value}); the step is dropped")]
    NonFinite {
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The offending value.
        value: f64,
    },
    /// A [`PendingStep`] computed at another step or for another model was passed to apply.
    #[error("pending step was computed at step {pending} (layout {pending_layout:016x}), trainer is at step {current} (layout {current_layout:016x})")]
    Stale {
        /// Step the pending gradients belong to.
        pending: u64,
        /// The trainer's step.
        current: u64,
        /// Layout fingerprint of the pending gradients.
        pending_layout: u64,
        /// The trainer's layout fingerprint.
        current_layout: u64,
    },
    /// A tensor could not be created or read back on the device.
    #[error("backend: {0}")]
    Backend(String),
    /// Serialised trainer state that cannot be loaded.
    #[error("trainer state: {0}")]
    State(String),
    /// A configuration this step does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Model construction or checkpoint I/O.
    #[error(transparent)]
    Model(#[from] distclip_model::ModelError),
}
