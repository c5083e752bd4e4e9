//! The data-plane ring of a quorum and the step's collectives over it.

use std::sync::Arc;
use std::time::Instant;

use distclip_comm::{Group, GroupSpec, PeerServer};
use distclip_proto::v1 as pb;

use crate::{Collective, CollectiveError};

/// Connect the ring of `quorum` as `rank`; `None` (logged) when a peer cannot be reached: the
/// step then fails and is dropped on every rank, like any failed collective.
pub(super) fn connect(rt: &tokio::runtime::Runtime, server: &PeerServer, quorum: &pb::Quorum, rank: usize) -> Option<Arc<Group>> {
    let spec = GroupSpec {
        quorum_id: quorum.quorum_id,
        rank,
        peers: quorum.members.iter().map(|m| m.peer_address.clone()).collect(),
    };
    match rt.block_on(Group::connect(server, spec)) {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            tracing::warn!("could not build the ring for quorum {}: {e}", quorum.quorum_id);
            None
        }
    }
}

/// The step's collectives over the data-plane ring, timed for the step's metrics.
pub(super) struct Ring<'a> {
    pub(super) group: &'a Group,
    pub(super) handle: &'a tokio::runtime::Handle,
    /// Seconds spent in collectives.
    pub(super) comm_s: f64,
}

impl Ring<'_> {
    fn timed<T>(&mut self, f: impl FnOnce(&Group, &tokio::runtime::Handle) -> T) -> T {
        let t = Instant::now();
        let out = f(self.group, self.handle);
        self.comm_s += t.elapsed().as_secs_f64();
        out
    }
}

impl Collective for Ring<'_> {
    fn rank(&self) -> usize {
        self.group.rank()
    }
    fn world_size(&self) -> usize {
        self.group.world_size()
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        self.timed(|g, h| h.block_on(g.all_gather(local)))
            .map_err(|e| CollectiveError::Transport(Box::new(e)))
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.timed(|g, h| h.block_on(g.all_reduce_sum(buf)))
            .map_err(|e| CollectiveError::Transport(Box::new(e)))
    }
}
