//! Copying a run directory to object storage (`log.remote_sync`, OpenCLIP's `--remote-sync`):
//! every file new or changed (size or modification time) since the last sync is uploaded under
//! the remote prefix at the same relative path, as `aws s3 sync` does for OpenCLIP. Nothing is
//! deleted remotely, and hidden entries (a checkpoint still being written under its temporary
//! name) are skipped. Large files go up as multipart uploads, so memory stays bounded.
//!
//! Stores are built as shard sources are ([`crate::source`]): the same URL schemes (`s3://`,
//! `gs://`, `az://`, `file://` or a plain path) and the same credential variables.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

use crate::spec::Location;

/// Files at or above this size are sent as multipart uploads of this chunk size.
pub const MULTIPART_BYTES: usize = 16 * 1024 * 1024;

/// A failed sync, naming the file and the remote.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The remote URL cannot be used.
    #[error("log.remote_sync {url}: {message}")]
    Remote {
        /// The configured URL.
        url: String,
        /// Why.
        message: String,
    },
    /// A local file could not be read.
    #[error("remote sync: reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// An upload failed.
    #[error("remote sync: uploading {path} to {url}: {message}")]
    Upload {
        /// The local file.
        path: PathBuf,
        /// The remote object.
        url: String,
        /// The store's error.
        message: String,
    },
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Files uploaded.
    pub uploaded: usize,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Files already up to date remotely.
    pub unchanged: usize,
}

/// A run directory's remote copy.
#[derive(Debug)]
pub struct RemoteSync {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    chunk: usize,
    /// Relative path -> (size, mtime) at its last upload.
    sent: HashMap<PathBuf, (u64, SystemTime)>,
}

impl RemoteSync {
    /// The remote at `url` (`s3://bucket/prefix`, `gs://`, `az://`, `file:///dir` or a path),
    /// with object_store config keys in `options` on top of the environment's.
    pub fn new(url: &str, options: &[(String, String)]) -> Result<RemoteSync, SyncError> {
        let remote = |message: String| SyncError::Remote { url: url.to_string(), message };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match Location::parse(url).map_err(|e| remote(e.to_string()))? {
            Location::Local(dir) => {
                std::fs::create_dir_all(&dir).map_err(|e| remote(format!("cannot create the folder: {e}")))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(|e| remote(e.to_string()))?;
                (Arc::new(fs), String::new())
            }
            Location::Object { scheme, bucket, key } => {
                if matches!(scheme.as_str(), "http" | "https" | "memory") {
                    return Err(remote(format!("{scheme}:// is not writable here; use s3://, gs://, az:// or a local folder")));
                }
                let store = crate::source::build_store(url, &scheme, &bucket, options).map_err(|e| remote(e.to_string()))?;
                (store, key.trim_end_matches('/').to_string())
            }
        };
        Ok(RemoteSync::with_store(url, store, &prefix))
    }

    /// Sync into `store` under `prefix` (`url` is for messages).
    pub fn with_store(url: &str, store: Arc<dyn ObjectStore>, prefix: &str) -> RemoteSync {
        RemoteSync {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix: prefix.trim_matches('/').to_string(),
            chunk: MULTIPART_BYTES,
            sent: HashMap::new(),
        }
    }

    /// Send files of `bytes` or more as multipart uploads in chunks of that size.
    pub fn with_multipart_bytes(mut self, bytes: usize) -> Self {
        self.chunk = bytes.max(1);
        self
    }

    /// Upload what changed under `local` since the last sync.
    pub async fn sync(&mut self, local: &Path) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        for rel in files(local) {
            let path = local.join(&rel);
            // A file may vanish between listing and reading (an old checkpoint rotated out).
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let stamp = (meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            if self.sent.get(&rel) == Some(&stamp) {
                report.unchanged += 1;
                continue;
            }
            let key = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/");
            let key = if self.prefix.is_empty() { key } else { format!("{}/{key}", self.prefix) };
            match self.upload(&path, &key, meta.len()).await {
                Ok(()) => {}
                Err(SyncError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            report.uploaded += 1;
            report.bytes += meta.len();
            self.sent.insert(rel, stamp);
        }
        Ok(report)
    }

    async fn upload(&self, path: &Path, key: &str, len: u64) -> Result<(), SyncError> {
        let failed = |message: String| SyncError::Upload {
            path: path.to_path_buf(),
            url: format!("{}/{}", self.url, key.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(key)),
            message,
        };
        let read_err = |source| SyncError::Read { path: path.to_path_buf(), source };
        let dest = StorePath::from(key);
        if (len as usize) < self.chunk {
            let bytes = std::fs::read(path).map_err(read_err)?;
            self.store.put(&dest, bytes.into()).await.map_err(|e| failed(e.to_string()))?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&dest).await.map_err(|e| failed(e.to_string()))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.chunk);
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let mut buf = vec![0u8; self.chunk];
        loop {
            let n = file.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(4).await.map_err(|e| failed(e.to_string()))?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(|e| failed(e.to_string()))?;
        Ok(())
    }
}

/// Every regular, non-hidden file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&rel)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                stack.push(rel.join(&name));
            } else if kind.is_file() {
                out.push(rel.join(&name));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn changed_files_go_up_hidden_ones_do_not() {
        let base = std::env::temp_dir().join(format!("distclip-sync-{}", std::process::id()));
        let (local, remote) = (base.join("run"), base.join("remote"));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(local.join("checkpoints/step-2")).unwrap();
        std::fs::create_dir_all(local.join("checkpoints/.step-4.tmp")).unwrap();
        std::fs::write(local.join("metrics.jsonl"), "{\"step\":0}\n").unwrap();
        std::fs::write(local.join("checkpoints/step-2/model.safetensors"), vec![7u8; 100]).unwrap();
        std::fs::write(local.join("checkpoints/.step-4.tmp/model.safetensors"), b"partial").unwrap();
        let rt = runtime();
        let mut sync = RemoteSync::new(remote.to_str().unwrap(), &[]).unwrap().with_multipart_bytes(64);
        let first = rt.block_on(sync.sync(&local)).unwrap();
        assert_eq!(first, SyncReport { uploaded: 2, bytes: 111, unchanged: 0 });
        assert_eq!(std::fs::read(remote.join("checkpoints/step-2/model.safetensors")).unwrap(), vec![7u8; 100]);
        assert!(!remote.join("checkpoints/.step-4.tmp").exists());
        std::fs::write(local.join("metrics.jsonl"), "{\"step\":0}\n{\"step\":1}\n").unwrap();
        let second = rt.block_on(sync.sync(&local)).unwrap();
        assert_eq!((second.uploaded, second.unchanged), (1, 1));
        assert_eq!(std::fs::read_to_string(remote.join("metrics.jsonl")).unwrap().lines().count(), 2);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn unwritable_remotes_are_refused_with_the_url() {
        let e = RemoteSync::new("https://example.com/runs", &[]).unwrap_err().to_string();
        assert!(e.contains("https://example.com/runs") && e.contains("not writable"), "{e}");
    }
}
