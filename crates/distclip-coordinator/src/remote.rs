//! `log.remote_sync`: the run directory (state, journal, logs, TensorBoard events and the
//! checkpoints under it) copied to object storage after every checkpoint, every
//! `log.remote_sync_frequency_s` seconds, and once more when the run ends, as OpenCLIP's
//! `--remote-sync` keeps a remote copy of its log folder. A failed sync is logged and retried
//! at the next occasion; it never stops training (the local copy is whole).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use distclip_data::remote_sync::RemoteSync;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// The sync task: wake it through the `Notify` it was given, end it (after a last sync) with
/// `finish`.
pub(crate) struct Syncer {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Syncer {
    /// Start syncing `root` with `sync` whenever `wake` is notified, and every `every` (zero:
    /// only when woken).
    pub(crate) fn spawn(mut sync: RemoteSync, root: PathBuf, every: Duration, wake: Arc<Notify>) -> Syncer {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                let last = tokio::select! {
                    _ = wake.notified() => false,
                    _ = async {
                        if every.is_zero() { std::future::pending::<()>().await } else { tokio::time::sleep(every).await }
                    } => false,
                    _ = &mut stopped => true,
                };
                match sync.sync(&root).await {
                    Ok(r) if r.uploaded > 0 => tracing::info!(files = r.uploaded, bytes = r.bytes, final_sync = last, "remote sync"),
                    Ok(_) => {}
                    Err(e) => tracing::error!("{e} (the local run directory is intact; the next sync tries again)"),
                }
                if last {
                    return;
                }
            }
        });
        Syncer { stop: Some(stop), task }
    }

    /// Sync once more and wait for it.
    pub(crate) async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}
