//! The data feed of one epoch: the loader, the lease thread that leases shards for it just in
//! time, and what a step tells the coordinator about the data it consumed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use distclip_data::loader::ShardSummary;
use distclip_data::{Batch, Loader, LoaderConfig, Order, ShardList, ShardOpener, ShardTask};
use distclip_proto::v1 as pb;

use super::WorkerError;
use super::control::Client;
use super::retry::{self, Retry};

/// The loader of one epoch plus the relay thread that leases shards for it just in time: the
/// relay holds at most one leased shard that no decode thread has taken yet (a rendezvous
/// channel), so a worker never sits on shards it is not reading.
pub(super) struct Feed {
    pub(super) epoch: u64,
    loader: Loader,
    /// The loader has ended: every leased shard is read and no more will come.
    pub(super) ended: bool,
    stop: Arc<AtomicBool>,
}

/// What a feed needs besides its epoch; the same for every epoch of the run.
#[derive(Clone)]
pub(super) struct FeedSource {
    pub(super) list: Arc<ShardList>,
    pub(super) opener: ShardOpener,
    pub(super) loader: LoaderConfig,
    pub(super) client: Client,
    pub(super) handle: tokio::runtime::Handle,
    pub(super) worker_id: String,
}

impl Feed {
    /// Start the loader and the lease thread of `epoch`.
    pub(super) fn start(epoch: u64, source: &FeedSource) -> Result<Feed, WorkerError> {
        let (tx, rx) = crossbeam_channel::bounded::<ShardTask>(0);
        let stop = Arc::new(AtomicBool::new(false));
        let mut cfg = source.loader.clone();
        cfg.epoch = epoch;
        cfg.order = Order::Feed(rx);
        let loader = Loader::new(source.list.clone(), source.opener.clone(), cfg)
            .map_err(|e| WorkerError::Setup(format!("data loader: {e}")))?;
        let relay_stop = stop.clone();
        let (client, handle, worker_id) = (source.client.clone(), source.handle.clone(), source.worker_id.clone());
        std::thread::Builder::new()
            .name("distclip-lease".into())
            .spawn(move || relay(epoch, client, handle, worker_id, tx, relay_stop))
            .map_err(|e| WorkerError::Setup(format!("cannot start the lease thread: {e}")))?;
        Ok(Feed { epoch, loader, ended: false, stop })
    }

    /// The next batch, or `None` once every leased shard is read and no more will come.
    pub(super) fn next_batch(&mut self) -> Result<Option<Batch>, WorkerError> {
        if self.ended {
            return Ok(None);
        }
        match self.loader.next() {
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(WorkerError::Setup(format!("data loader: {e}"))),
            None => {
                self.ended = true;
                Ok(None)
            }
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Lease one shard at a time and hand it to whichever decode thread asks first. Ends (closing
/// the channel, which lets the loader finish) when the coordinator says the epoch has no
/// unleased shard left, or when the loader is gone.
fn relay(
    epoch: u64,
    mut client: Client,
    handle: tokio::runtime::Handle,
    worker_id: String,
    tx: crossbeam_channel::Sender<ShardTask>,
    stop: Arc<AtomicBool>,
) {
    let mut at_cap = Retry::new(retry::LEASE_AT_CAP);
    let mut failing = Retry::new(retry::LEASE_FAILED);
    // Until the first answer, ask the coordinator to take back what it thinks this worker
    // holds: an earlier feed of this worker may have been dropped with shards half read.
    let mut fresh = true;
    while !stop.load(Ordering::SeqCst) {
        let req = pb::LeaseRequest { worker_id: worker_id.clone(), epoch, want: 1, shard_reports: vec![], fresh };
        match handle.block_on(client.lease(req)) {
            Ok(resp) => {
                fresh = false;
                failing.reset();
                let resp = resp.into_inner();
                if resp.leases.is_empty() {
                    if resp.exhausted {
                        return;
                    }
                    // At the lease cap: shards come back as this worker reports its own.
                    at_cap.wait();
                    continue;
                }
                at_cap.reset();
                for l in resp.leases {
                    let task = ShardTask {
                        shard: l.shard as usize,
                        start: 0,
                        skip: l.skip.iter().map(|r| r.start..r.end).collect(),
                    };
                    if tx.send(task).is_err() {
                        return; // the loader was dropped (epoch over, or shutdown)
                    }
                }
            }
            Err(status) => {
                tracing::warn!("lease request failed: {}; retrying", status.message());
                failing.wait();
            }
        }
    }
}

/// Positions of a step's micro-batches, grouped by shard for the commit.
pub(super) fn consumed(micro: &[Batch]) -> Vec<pb::ShardIndices> {
    let mut by_shard: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for p in micro.iter().flat_map(|b| b.positions.iter()) {
        by_shard.entry(p.shard).or_default().push(p.index);
    }
    by_shard.into_iter().map(|(shard, indices)| pb::ShardIndices { shard: shard as u64, indices }).collect()
}

/// A finished shard as the coordinator's report.
pub(super) fn report(epoch: u64, s: &ShardSummary) -> pb::ShardReport {
    pb::ShardReport {
        shard: s.shard as u64,
        epoch,
        samples: s.samples,
        skipped: s.skipped.clone(),
        skipped_by_reason: s.skipped_by_reason.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        failed: s.failed.clone().unwrap_or_default(),
    }
}
