//! Incremental persistence of the run state. `state.json` is a snapshot; every change after it
//! is one line appended (and fsynced) to `journal/N.jsonl`, where `N` is the segment the
//! snapshot names. A line holds the state's scalars and only the ledger shards that changed, so
//! a commit writes a few hundred bytes whatever the dataset's size, where rewriting the whole
//! state would write every shard ever touched (tens of MB at LAION-2B scale).
//!
//! When a segment outgrows the snapshot, the journal opens segment `N+1` and a background
//! thread writes the snapshot taken at that point (naming `N+1`) and deletes older segments, so
//! the full rewrite happens off the coordinator's lock and rarely. A crash at any point leaves a
//! snapshot and the segments after it: loading applies them in order. A last line cut short by
//! a crash was never acknowledged (its fsync did not return) and is dropped.

use crate::error::CoordinatorError;
use crate::machine::{SavedState, StateChanges};
use crate::persist::{RunDir, write_atomic};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

/// A segment is compacted into a new snapshot once it holds this many bytes and more than the
/// last snapshot: the journal never costs more than twice the state on disk, and a small run
/// rewrites its snapshot at most every 4 MiB of changes.
const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// `state.json`: the state, and the first journal segment that applies on top of it.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    #[serde(flatten)]
    state: SavedState,
    /// Segments numbered from this one on are newer than the snapshot (absent: 0).
    #[serde(default)]
    journal: u64,
}

/// The append side of the journal, owned by the coordinator.
pub struct Journal {
    dir: RunDir,
    segment: u64,
    file: std::fs::File,
    /// Bytes in the current segment.
    bytes: u64,
    /// Size of the last snapshot written.
    snapshot_bytes: Arc<AtomicU64>,
    /// The snapshot being written in the background, if one is.
    compaction: Option<JoinHandle<()>>,
    /// The least segment size that is compacted ([`COMPACT_MIN_BYTES`]; smaller in tests).
    compact_min_bytes: u64,
}

fn io_error(action: &'static str, path: PathBuf) -> impl FnOnce(std::io::Error) -> CoordinatorError {
    move |source| CoordinatorError::Io { action, path, source }
}

/// Segment numbers present in `journal/`, ascending.
fn segments(dir: &RunDir) -> Result<Vec<u64>, CoordinatorError> {
    let path = dir.journal_path();
    let entries = match std::fs::read_dir(&path) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", path)(e)),
    };
    let mut out: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".jsonl")?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn segment_path(dir: &RunDir, segment: u64) -> PathBuf {
    dir.journal_path().join(format!("{segment:012}.jsonl"))
}

/// The state saved in `dir` (its snapshot brought up to date by the journal), if any.
pub fn load(dir: &RunDir) -> Result<Option<SavedState>, CoordinatorError> {
    let path = dir.state_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", path)(e)),
    };
    let bad = |path: &Path, message: String| CoordinatorError::State { path: path.to_path_buf(), message };
    let snapshot: Snapshot = serde_json::from_str(&text).map_err(|e| bad(&path, e.to_string()))?;
    let mut state = snapshot.state;
    let newer: Vec<u64> = segments(dir)?.into_iter().filter(|&s| s >= snapshot.journal).collect();
    let mut lines = Vec::new();
    for (i, &segment) in newer.iter().enumerate() {
        let path = segment_path(dir, segment);
        let text = std::fs::read_to_string(&path).map_err(io_error("read", path.clone()))?;
        let last_segment = i + 1 == newer.len();
        let count = text.lines().count();
        for (n, line) in text.lines().enumerate() {
            match serde_json::from_str::<StateChanges>(line) {
                Ok(l) => lines.push(l),
                // Cut short by a crash while it was written: never acknowledged, so dropped.
                Err(e) if last_segment && n + 1 == count && !text.ends_with('\n') => {
                    tracing::warn!("{}: dropping a last line cut short ({e})", path.display());
                }
                Err(e) => {
                    return Err(bad(
                        &path,
                        format!("line {}: {e} (the journal is damaged; restore the run directory from a backup or resume from a checkpoint with --resume)", n + 1),
                    ));
                }
            }
        }
    }
    state.apply(lines);
    Ok(Some(state))
}

fn write_snapshot(dir: &RunDir, state: &SavedState, journal: u64) -> Result<u64, CoordinatorError> {
    let snapshot = Snapshot { state: state.clone(), journal };
    let mut text = serde_json::to_vec_pretty(&snapshot).unwrap_or_default();
    text.push(b'\n');
    let path = dir.state_path();
    write_atomic(&path, &text).map_err(io_error("write", path))?;
    Ok(text.len() as u64)
}

/// Delete the segments older than `keep_from` (already in a snapshot on disk).
fn delete_before(dir: &RunDir, keep_from: u64) {
    for s in segments(dir).unwrap_or_default().into_iter().filter(|&s| s < keep_from) {
        let path = segment_path(dir, s);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("could not delete the compacted journal segment {}: {e}", path.display());
        }
    }
}

impl Journal {
    /// Start the journal of a coordinator whose state is `state`: a snapshot of it, written now,
    /// and a new segment after any already on disk.
    pub fn open(dir: &RunDir, state: &SavedState) -> Result<Self, CoordinatorError> {
        let folder = dir.journal_path();
        std::fs::create_dir_all(&folder).map_err(io_error("create", folder))?;
        let segment = segments(dir)?.last().map_or(0, |s| s + 1);
        let mut journal = Self {
            dir: dir.clone(),
            segment,
            file: Self::create_segment(dir, segment)?,
            bytes: 0,
            snapshot_bytes: Arc::new(AtomicU64::new(0)),
            compaction: None,
            compact_min_bytes: COMPACT_MIN_BYTES,
        };
        journal.snapshot_now(state)?;
        Ok(journal)
    }

    fn create_segment(dir: &RunDir, segment: u64) -> Result<std::fs::File, CoordinatorError> {
        let path = segment_path(dir, segment);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error("create", path))?;
        // The new segment must be on disk before a snapshot that names it.
        let _ = distclip_checkpoint::durable::sync_dir(&dir.journal_path());
        Ok(file)
    }

    /// Append one line and wait until it is on disk.
    pub fn append(&mut self, changes: &StateChanges) -> Result<(), CoordinatorError> {
        let mut line = serde_json::to_vec(changes).unwrap_or_default();
        line.push(b'\n');
        let path = || segment_path(&self.dir, self.segment);
        self.file.write_all(&line).map_err(io_error("append to", path()))?;
        self.file.sync_data().map_err(io_error("sync", path()))?;
        self.bytes += line.len() as u64;
        Ok(())
    }

    /// Whether the current segment should be folded into a new snapshot.
    pub fn wants_snapshot(&self) -> bool {
        let done = self.compaction.as_ref().is_none_or(|h| h.is_finished());
        done && self.bytes >= self.compact_min_bytes.max(self.snapshot_bytes.load(Ordering::Relaxed))
    }

    /// Start a new segment and write `state` (the state at this point) as the snapshot in the
    /// background. Failures are logged: the older segments stay until a snapshot succeeds.
    pub fn snapshot_in_background(&mut self, state: SavedState) -> Result<(), CoordinatorError> {
        self.wait_for_compaction();
        self.next_segment()?;
        let (dir, segment, size) = (self.dir.clone(), self.segment, self.snapshot_bytes.clone());
        self.compaction = Some(std::thread::spawn(move || match write_snapshot(&dir, &state, segment) {
            Ok(n) => {
                size.store(n, Ordering::Relaxed);
                delete_before(&dir, segment);
            }
            Err(e) => tracing::error!("state snapshot failed, the journal keeps growing: {e}"),
        }));
        Ok(())
    }

    /// Start a new segment and write `state` as the snapshot before returning (at start and
    /// when the run ends, so `state.json` alone tells the outcome).
    pub fn snapshot_now(&mut self, state: &SavedState) -> Result<(), CoordinatorError> {
        self.wait_for_compaction();
        if self.bytes > 0 {
            self.next_segment()?;
        }
        let n = write_snapshot(&self.dir, state, self.segment)?;
        self.snapshot_bytes.store(n, Ordering::Relaxed);
        delete_before(&self.dir, self.segment);
        Ok(())
    }

    fn next_segment(&mut self) -> Result<(), CoordinatorError> {
        self.file = Self::create_segment(&self.dir, self.segment + 1)?;
        self.segment += 1;
        self.bytes = 0;
        Ok(())
    }

    /// Two snapshots must land in order: the older one would name a segment already deleted.
    fn wait_for_compaction(&mut self) {
        if let Some(h) = self.compaction.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.wait_for_compaction();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{LedgerChanges, LedgerState, ShardState};
    use crate::ranges::RangeSet;

    fn dir(name: &str) -> RunDir {
        let d = std::env::temp_dir().join(format!("distclip-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        RunDir::create(&d).unwrap()
    }

    fn state(step: u64) -> SavedState {
        SavedState {
            version: crate::machine::STATE_VERSION,
            run_id: "run".into(),
            num_shards: 100,
            step,
            epoch: 0,
            quorum_id: 1,
            samples_seen: step * 2,
            epoch_samples: step * 2,
            finished: false,
            ledger: Some(LedgerState { epoch: 0, ..Default::default() }),
            last_commit: None,
            commit_quorum: 1,
            final_writer: None,
        }
    }

    /// Step `step` commits positions `2*step` and `2*step + 1` of shard `step % 7`.
    fn commit(disk: &mut SavedState, step: u64) -> StateChanges {
        let shard = step % 7;
        let mut s = disk.ledger.as_ref().unwrap().shards.iter().find(|s| s.shard == shard).cloned();
        let s = s.get_or_insert_with(|| ShardState { shard, ..Default::default() });
        s.committed.insert(2 * step);
        s.committed.insert(2 * step + 1);
        let line = StateChanges {
            state: SavedState { ledger: None, ..state(step + 1) },
            ledger: Some(LedgerChanges {
                state: LedgerState { epoch: 0, shards: vec![s.clone()], committed_samples: 2 * (step + 1), refused_commits: 0 },
                fresh: false,
            }),
        };
        disk.apply([line.clone()]);
        line
    }

    #[test]
    fn a_reload_applies_every_line_after_the_snapshot() {
        let d = dir("reload");
        let mut expect = state(0);
        let mut j = Journal::open(&d, &expect).unwrap();
        for step in 0..20 {
            j.append(&commit(&mut expect, step)).unwrap();
        }
        drop(j);
        let back = load(&d).unwrap().unwrap();
        assert_eq!(back, expect);
        assert_eq!(back.step, 20);
        let l = back.ledger.unwrap();
        assert_eq!((l.shards.len(), l.committed_samples), (7, 40));
        // Shard 3 had steps 3, 10 and 17: positions 6, 7, 20, 21, 34, 35.
        let mut want = RangeSet::default();
        [6, 7, 20, 21, 34, 35].into_iter().for_each(|i| want.insert(i));
        assert_eq!(l.shards[3].committed, want);
        // A restarted coordinator starts a new segment after a fresh snapshot of what it loaded.
        let j = Journal::open(&d, &load(&d).unwrap().unwrap()).unwrap();
        assert_eq!(segments(&d).unwrap(), [j.segment]);
        assert_eq!(load(&d).unwrap().unwrap(), expect);
    }

    #[test]
    fn a_last_line_cut_short_is_dropped_and_a_damaged_one_elsewhere_is_an_error() {
        let d = dir("torn");
        let mut expect = state(0);
        let mut j = Journal::open(&d, &expect).unwrap();
        for step in 0..3 {
            j.append(&commit(&mut expect, step)).unwrap();
        }
        let path = segment_path(&d, j.segment);
        drop(j);
        let whole = std::fs::read_to_string(&path).unwrap();
        // A crash in the middle of the fourth line: it was never acknowledged.
        std::fs::write(&path, format!("{whole}{{\"version\":1,\"run_")).unwrap();
        assert_eq!(load(&d).unwrap().unwrap(), expect);
        // The same damage in the middle of the journal loses acknowledged lines: refuse.
        let mut lines: Vec<&str> = whole.lines().collect();
        lines[1] = "{\"version\":1,\"run_";
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let e = load(&d).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("journal is damaged"), "{e}");
    }

    #[test]
    fn compaction_snapshots_in_the_background_and_drops_old_segments() {
        let d = dir("compact");
        let mut expect = state(0);
        let mut j = Journal::open(&d, &expect).unwrap();
        j.compact_min_bytes = 2000;
        let mut snapshots = 0;
        for step in 0..200 {
            let line = commit(&mut expect, step);
            if j.wants_snapshot() {
                j.snapshot_in_background(expect.clone()).unwrap();
                snapshots += 1;
            } else {
                j.append(&line).unwrap();
            }
        }
        j.wait_for_compaction();
        assert!(snapshots >= 3, "{snapshots} snapshots");
        // Only the segment after the last snapshot is left, and it is smaller than the next
        // compaction's threshold (plus the line that crossed it).
        assert_eq!(segments(&d).unwrap(), [j.segment]);
        let threshold = j.snapshot_bytes.load(Ordering::Relaxed).max(2000);
        assert!(j.bytes < threshold + 1000, "{} bytes against {threshold}", j.bytes);
        drop(j);
        assert_eq!(load(&d).unwrap().unwrap(), expect);
        let on_disk: Snapshot = serde_json::from_str(&std::fs::read_to_string(d.state_path()).unwrap()).unwrap();
        assert!(on_disk.state.step < 200 && on_disk.journal > 0);
    }

    #[test]
    fn a_new_epoch_and_resampled_mode_replace_the_ledger() {
        let mut disk = state(0);
        commit(&mut disk, 0);
        let fresh = StateChanges {
            state: SavedState { ledger: None, epoch: 1, ..state(1) },
            ledger: Some(LedgerChanges { state: LedgerState { epoch: 1, ..Default::default() }, fresh: true }),
        };
        disk.apply([fresh]);
        assert_eq!(disk.ledger, Some(LedgerState { epoch: 1, ..Default::default() }));
        disk.apply([StateChanges { state: SavedState { ledger: None, ..state(2) }, ledger: None }]);
        assert_eq!((disk.ledger.as_ref(), disk.step), (None, 2));
    }
}
