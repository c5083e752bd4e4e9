//! State transfer: a joining worker pulls a peer's serialised parameters and optimizer state.

use distclip_proto::v1::FetchStateRequest;

use crate::server::{connect_client, request, stale_quorum_of};
use crate::{CommError, CommOptions, PeerId};

/// Pull the state bytes that the worker at `peer_addr` (its data-plane `host:port`) serves
/// through [`crate::PeerServer::set_state_provider`]. Each step (connecting, every chunk) must
/// come within `opts.timeout`; the result is checked to be complete.
pub async fn fetch_state(peer_addr: &str, opts: &CommOptions) -> Result<Vec<u8>, CommError> {
    opts.validate()?;
    let op = "fetch_state".to_string();
    let peer = PeerId { rank: None, addr: peer_addr.to_string() };
    let timeout = opts.timeout;
    let timed_out = |what: &str| CommError::Timeout { op: op.clone(), peer: peer.clone(), what: what.into(), timeout };
    let mut client = tokio::time::timeout(timeout, connect_client(peer_addr, opts))
        .await
        .map_err(|_| timed_out("connecting"))?
        .map_err(|detail| CommError::Connection { op: op.clone(), peer: peer.clone(), detail })?;
    let refused = |s: tonic::Status| match stale_quorum_of(&s) {
        Some(theirs) => CommError::StaleQuorum { op: op.clone(), peer: peer.clone(), ours: 0, theirs },
        None => CommError::Refused { op: op.clone(), peer: peer.clone(), detail: format!("{:?}: {}", s.code(), s.message()) },
    };
    let mut stream = tokio::time::timeout(timeout, client.fetch_state(request(FetchStateRequest { quorum_id: 0 }, opts)))
        .await
        .map_err(|_| timed_out("the state provider's answer"))?
        .map_err(refused)?
        .into_inner();
    let protocol = |detail: String| CommError::Protocol { op: op.clone(), peer: peer.clone(), detail };
    let mut out: Vec<u8> = Vec::new();
    let mut total: Option<u64> = None;
    loop {
        let msg = tokio::time::timeout(timeout, stream.message()).await.map_err(|_| timed_out("the next state chunk"))?;
        let Some(chunk) = msg.map_err(refused)? else { break };
        match total {
            None => {
                total = Some(chunk.total_bytes);
                // Reserve for what the peer announced, within reason: a bogus size must not
                // allocate memory we never receive.
                out.reserve(chunk.total_bytes.min(1 << 30) as usize);
            }
            Some(t) if t != chunk.total_bytes => {
                return Err(protocol(format!("total size changed from {t} to {} mid-transfer", chunk.total_bytes)));
            }
            Some(_) => {}
        }
        if chunk.offset != out.len() as u64 {
            return Err(protocol(format!("chunk at offset {} but {} bytes received so far", chunk.offset, out.len())));
        }
        if out.len() as u64 + chunk.data.len() as u64 > chunk.total_bytes {
            return Err(protocol(format!("chunks exceed the announced total of {} bytes", chunk.total_bytes)));
        }
        out.extend_from_slice(&chunk.data);
    }
    match total {
        Some(t) if t == out.len() as u64 => Ok(out),
        Some(t) => Err(protocol(format!("stream ended after {} of {t} bytes", out.len()))),
        None => Err(protocol("stream ended without any chunk".into())),
    }
}
