//! The run directory: `state.json` and `journal/` (the run state, see [`crate::journal`]),
//! `config.toml`, `events.jsonl`, `metrics.jsonl`, `ledger/epoch-N.json`, `coordinator.addr`
//! and `coordinator.http`.

use crate::error::CoordinatorError;
use crate::machine::{Event, MetricsLine, SavedState};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, the `time` field of every JSON line.
pub fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub use distclip_checkpoint::durable::write_atomic;

/// The run directory's files.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Use (and create) `root` and its `ledger/` folder.
    pub fn create(root: &Path) -> Result<Self, CoordinatorError> {
        let ledger = root.join("ledger");
        std::fs::create_dir_all(&ledger).map_err(|source| CoordinatorError::Io {
            action: "create",
            path: ledger,
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `journal/`: the run state's changes since `state.json`.
    pub fn journal_path(&self) -> PathBuf {
        self.root.join("journal")
    }

    /// `state.json`: the run state's last snapshot.
    pub fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// `events.jsonl`.
    pub fn events_path(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// `ledger/epoch-N.json`.
    pub fn audit_path(&self, epoch: u64) -> PathBuf {
        self.root.join("ledger").join(format!("epoch-{epoch}.json"))
    }

    /// `checkpoints/`, absolute when the run directory can be resolved (workers are told it).
    pub fn checkpoints_path(&self) -> PathBuf {
        let root = std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        root.join("checkpoints")
    }

    /// Drop the `metrics.jsonl` lines of steps at or after `step` (what a run resumed from
    /// the checkpoint after `step` steps will do again), keeping one line per step.
    pub fn truncate_metrics(&self, step: u64) -> Result<usize, CoordinatorError> {
        let path = self.metrics_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(CoordinatorError::Io { action: "read", path, source }),
        };
        let mut kept = String::with_capacity(text.len());
        let mut dropped = 0;
        for line in text.lines() {
            let at = serde_json::from_str::<Value>(line).ok().and_then(|v| v["step"].as_u64());
            if at.is_some_and(|s| s >= step) {
                dropped += 1;
            } else {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if dropped > 0 {
            self.write(path, kept.as_bytes())?;
        }
        Ok(dropped)
    }

    /// `coordinator.addr`: the actual listen address, for launchers of a port-0 coordinator.
    pub fn addr_path(&self) -> PathBuf {
        self.root.join("coordinator.addr")
    }

    /// `coordinator.http`: the actual address of the HTTP endpoint (`/metrics`).
    pub fn http_addr_path(&self) -> PathBuf {
        self.root.join("coordinator.http")
    }

    fn write(&self, path: PathBuf, bytes: &[u8]) -> Result<(), CoordinatorError> {
        write_atomic(&path, bytes).map_err(|source| CoordinatorError::Io {
            action: "write",
            path,
            source,
        })
    }

    /// The saved state (snapshot and journal), if the run directory has one.
    pub fn load_state(&self) -> Result<Option<SavedState>, CoordinatorError> {
        crate::journal::load(self)
    }

    /// Replace `config.toml`.
    pub fn write_config(&self, toml: &str) -> Result<(), CoordinatorError> {
        self.write(self.config_path(), toml.as_bytes())
    }

    /// Write `ledger/epoch-N.json`.
    pub fn write_audit(&self, epoch: u64, audit: &Value) -> Result<(), CoordinatorError> {
        let mut text = serde_json::to_vec_pretty(audit).unwrap_or_default();
        text.push(b'\n');
        self.write(self.audit_path(epoch), &text)
    }

    /// Write `coordinator.addr` (one line, `host:port`).
    pub fn write_addr(&self, addr: &str) -> Result<(), CoordinatorError> {
        self.write(self.addr_path(), format!("{addr}\n").as_bytes())
    }

    /// Write `coordinator.http` (one line, `host:port`).
    pub fn write_http_addr(&self, addr: &str) -> Result<(), CoordinatorError> {
        self.write(self.http_addr_path(), format!("{addr}\n").as_bytes())
    }

    fn append(&self, path: PathBuf, lines: &[impl serde::Serialize]) -> Result<(), CoordinatorError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for l in lines {
            // Lines are objects with string keys: serialising them cannot fail.
            let _ = serde_json::to_writer(&mut buf, l);
            buf.push(b'\n');
        }
        // One write per batch so concurrent readers never see half a line of ours.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&buf))
            .map_err(|source| CoordinatorError::Io {
                action: "append to",
                path,
                source,
            })
    }

    /// Append events as `{"time", "kind", ...fields}` lines.
    pub fn append_events(&self, events: &[Event]) -> Result<(), CoordinatorError> {
        let time = unix_time();
        let lines: Vec<Value> = events.iter().map(|e| e.line(time)).collect();
        self.append(self.events_path(), &lines)
    }

    /// Append metrics lines, each given a `time` (in place: a line of a thousand workers is
    /// too big to copy under the coordinator's lock).
    pub fn append_metrics(&self, metrics: &mut [MetricsLine]) -> Result<(), CoordinatorError> {
        let time = unix_time();
        metrics.iter_mut().for_each(|m| m.set_time(time));
        self.append(self.metrics_path(), metrics)
    }
}
