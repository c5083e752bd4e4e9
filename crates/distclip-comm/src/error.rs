//! Errors of the data plane. Every failure that involves a peer names it (rank and address) and
//! the operation, so a log line says which worker to look at.

use std::fmt;
use std::time::Duration;

/// A peer of the data plane: its rank in the quorum when known, and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerId {
    /// Rank in the current quorum (`None` for a plain address such as a `fetch_state` source).
    pub rank: Option<usize>,
    /// Data-plane address (`host:port`).
    pub addr: String,
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Some(r) => write!(f, "rank {r} at {}", self.addr),
            None => write!(f, "peer at {}", self.addr),
        }
    }
}

/// Errors of collectives, channels and state transfer.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The server could not listen.
    #[error("cannot listen for peers on {addr}: {source}; choose a free port or a local address")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// [`crate::CommOptions`] or a [`crate::GroupSpec`] is inconsistent.
    #[error("invalid data-plane settings: {detail}")]
    InvalidOptions {
        /// What is wrong and what to set instead.
        detail: String,
    },
    /// A collective was called with arguments it cannot work on.
    #[error("{op}: {detail}")]
    InvalidArgument {
        /// The operation, e.g. `broadcast #3`.
        op: String,
        /// What is wrong.
        detail: String,
    },
    /// A peer did not answer in time.
    #[error(
        "{op}: {peer} did not answer within {timeout:?} ({what}); check that it is alive, \
         reachable and in the same quorum, or raise the timeout"
    )]
    Timeout {
        /// The operation.
        op: String,
        /// Who was silent.
        peer: PeerId,
        /// What we were waiting for.
        what: String,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The connection to a peer failed or closed (the peer most likely died or gave up).
    #[error("{op}: connection with {peer} failed: {detail}")]
    Connection {
        /// The operation.
        op: String,
        /// The peer.
        peer: PeerId,
        /// The underlying error.
        detail: String,
    },
    /// A peer refused the call (token, version, or its own error mid-collective).
    #[error("{op}: {peer} refused: {detail}")]
    Refused {
        /// The operation.
        op: String,
        /// The peer.
        peer: PeerId,
        /// Its reason.
        detail: String,
    },
    /// Two sides disagree about the quorum: one of them holds an older membership.
    #[error(
        "{op}: {peer} is in quorum {theirs} but this worker is in quorum {ours}; the older side \
         must rejoin the coordinator's current quorum"
    )]
    StaleQuorum {
        /// The operation.
        op: String,
        /// The peer.
        peer: PeerId,
        /// This worker's quorum id.
        ours: u64,
        /// The peer's (or the message's) quorum id.
        theirs: u64,
    },
    /// A peer sent something malformed or out of order (wrong op, wrong length, bad frame).
    #[error("{op}: protocol error from {peer}: {detail}")]
    Protocol {
        /// The operation.
        op: String,
        /// The peer.
        peer: PeerId,
        /// What was wrong.
        detail: String,
    },
    /// An earlier error left the ring in an unknown state; the group cannot be used again.
    #[error(
        "the group of quorum {quorum_id} failed earlier ({cause}); form a new quorum and connect a \
         new Group"
    )]
    Broken {
        /// The group's quorum.
        quorum_id: u64,
        /// The first error.
        cause: String,
    },
}
