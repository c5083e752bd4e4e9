//! Collectives and state transfer between distclip workers.
//!
//! One [`PeerServer`] per worker process serves the data plane (`distclip.v1.Peer`, see
//! `proto/distclip/v1/peer.proto`). For each quorum the worker connects a [`Group`]: a ring over
//! the quorum's members in rank order, on which every rank calls the same collectives in the same
//! order. Tensor bytes travel on a framed TCP stream negotiated through gRPC (the default,
//! [`Transport::Tcp`]) or on gRPC client streams ([`Transport::Grpc`]); both share the server's
//! single port. A joining worker pulls state bytes from a peer with [`fetch_state`].
//!
//! This crate knows bytes and f32 tensors, nothing of CLIP or Burn.

mod error;
mod group;
mod server;
mod state;
#[cfg(test)]
mod tests;
mod wire;

pub use error::{CommError, PeerId};
pub use group::{Group, GroupSpec, block_range};
pub use server::PeerServer;
pub use state::fetch_state;
#[doc(hidden)]
pub use wire::parse_untrusted;

use std::time::Duration;

/// How tensor bytes travel between ring neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transport {
    /// Length-prefixed frames on a plain TCP connection, opened with a ticket from the gRPC
    /// `OpenChannel` call. No copy between the tensor and the socket.
    #[default]
    Tcp,
    /// `TensorChunk` messages on a gRPC client stream (`Peer.Transfer`): one extra copy per chunk
    /// plus HTTP/2 framing and flow control.
    Grpc,
}

impl Transport {
    /// The name used on the wire and on command lines: `tcp` or `grpc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Grpc => "grpc",
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "grpc" => Ok(Transport::Grpc),
            other => Err(format!("unknown transport `{other}`: expected `tcp` or `grpc`")),
        }
    }
}

/// Settings of the data plane, shared by the server and the groups and calls made through it.
#[derive(Clone, Debug)]
pub struct CommOptions {
    /// Longest wait for any single step: connecting to a peer, or the peer's next frame during a
    /// collective. It must exceed the longest time by which ranks may arrive apart at a
    /// collective; a dead peer is reported no later than this.
    pub timeout: Duration,
    /// Payload bytes per frame: collectives are cut into pieces of this size so that sending,
    /// receiving and reducing overlap along the ring.
    pub chunk_bytes: usize,
    /// Largest payload accepted in one frame or message; bigger ones are refused as malformed.
    pub max_chunk_bytes: usize,
    /// The run's token. When set, the server refuses RPCs and data channels without it, and
    /// clients send it with every call (`authorization: Bearer <token>`).
    pub token: Option<String>,
    /// How this side sends tensor bytes (each receiver accepts both). With `tls` set, both are
    /// encrypted: framed TCP channels do their own TLS handshake on the server's port.
    pub transport: Transport,
    /// TLS (mutual when its settings say so) on the server and every call; None: plaintext.
    pub tls: Option<distclip_proto::tls::Tls>,
}

impl Default for CommOptions {
    fn default() -> Self {
        CommOptions {
            timeout: Duration::from_secs(60),
            chunk_bytes: 1 << 20,
            max_chunk_bytes: 16 << 20,
            token: None,
            transport: Transport::Tcp,
            tls: None,
        }
    }
}

impl CommOptions {
    /// Check the settings, so a bad value is reported where it was made, not mid-collective.
    pub fn validate(&self) -> Result<(), CommError> {
        let bad = |detail: String| Err(CommError::InvalidOptions { detail });
        if self.timeout.is_zero() {
            return bad("timeout must be positive".into());
        }
        if self.chunk_bytes < 4 || !self.chunk_bytes.is_multiple_of(4) {
            return bad(format!("chunk_bytes = {} must be a positive multiple of 4 (one f32)", self.chunk_bytes));
        }
        if self.chunk_bytes > self.max_chunk_bytes {
            return bad(format!(
                "chunk_bytes = {} exceeds max_chunk_bytes = {}",
                self.chunk_bytes, self.max_chunk_bytes
            ));
        }
        Ok(())
    }

    /// The per-piece element count for f32 collectives.
    pub(crate) fn piece_elems(&self) -> usize {
        self.chunk_bytes / 4
    }
}

/// Version of the data-plane wire protocol; peers refuse channels of another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// The `grpc.health.v1` service name that is SERVING whenever a worker's server answers at all,
/// in or out of a quorum: for liveness probes (readiness asks for `""`, which is SERVING only in
/// a quorum, and a liveness probe on it would restart every worker that waits for peers).
pub const LIVENESS_SERVICE: &str = "liveness";
