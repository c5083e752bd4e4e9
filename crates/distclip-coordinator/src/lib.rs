//! distclip's coordinator: admits workers, forms a quorum for every step, leases shards from an
//! exactly-once ledger, decides commits by unanimous vote, persists the run state, and serves
//! it all as the `distclip.v1.Coordinator` gRPC service (plus `grpc.health.v1`), with
//! Prometheus metrics over HTTP on a port of its own ([`metrics`]).
//!
//! The decisions live in pure, synchronous state machines ([`membership`], [`ledger`],
//! [`machine`]) tested without a network; [`service`] is the async shell around them and
//! [`persist`] the run directory. See [`machine`] for the protocol a worker follows.
//!
//! The coordinator never links Burn or the model: it knows steps, shards and sample positions.

pub mod dataset;
pub mod error;
mod http;
pub mod journal;
pub mod ledger;
pub mod machine;
pub mod membership;
pub mod metrics;
pub mod persist;
pub mod progress;
pub mod ranges;
mod remote;
mod resume;
pub mod service;
pub mod status;
pub mod tensorboard;

pub use error::CoordinatorError;
pub use ledger::ShardInfo;
pub use machine::{Machine, MachineConfig, MachineError, Phase, SavedState, StateChanges};
pub use persist::RunDir;
pub use service::{Coordinator, CoordinatorOptions, MAX_MESSAGE_BYTES, RunOutcome, serve};
