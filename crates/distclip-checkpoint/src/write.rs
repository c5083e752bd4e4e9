//! Writing a checkpoint atomically and keeping the last K.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{
    CheckpointError, CheckpointMeta, FORMAT_VERSION, FileEntry, MANIFEST_FILE, Manifest, io,
    sha256_hex,
};

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    crate::durable::write_synced(path, bytes).map_err(io(path))
}

/// Make a rename durable: fsync the directory that holds the entry.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    crate::durable::sync_dir(dir).map_err(io(dir))
}

/// Write `files` and a manifest as the checkpoint `root/name`, atomically: everything goes to
/// a hidden temporary directory first, which is renamed into place at the end (an existing
/// checkpoint of the same name is replaced). Returns the checkpoint's path.
pub fn write_checkpoint(
    root: &Path,
    name: &str,
    meta: &CheckpointMeta,
    files: &[(&str, &[u8])],
) -> Result<PathBuf, CheckpointError> {
    for (file, _) in files {
        let plain = !file.is_empty()
            && !file.starts_with('.')
            && !file.contains(['/', '\\'])
            && *file != MANIFEST_FILE;
        if !plain {
            return Err(CheckpointError::BadName((*file).to_owned()));
        }
    }
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
        return Err(CheckpointError::BadName(name.to_owned()));
    }
    fs::create_dir_all(root).map_err(io(root))?;
    let unique = format!("{}-{:x}", std::process::id(), (unix_now() * 1e6) as u64);
    let tmp = root.join(format!(".{name}.tmp-{unique}"));
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = (|| {
        let mut manifest = Manifest {
            format: FORMAT_VERSION,
            step: meta.step,
            epoch: meta.epoch,
            samples_seen: meta.samples_seen,
            run_id: meta.run_id.clone(),
            created_unix: unix_now(),
            files: Default::default(),
        };
        for (file, bytes) in files {
            write_synced(&tmp.join(file), bytes)?;
            manifest.files.insert(
                (*file).to_owned(),
                FileEntry { bytes: bytes.len() as u64, sha256: sha256_hex(bytes) },
            );
        }
        // Serialising a struct of strings and numbers cannot fail.
        let text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        write_synced(&tmp.join(MANIFEST_FILE), &text)?;
        sync_dir(&tmp)?;
        let dest = root.join(name);
        if dest.exists() {
            // rename(2) does not replace a non-empty directory: move the old one aside first.
            let old = root.join(format!(".{name}.old-{unique}"));
            fs::rename(&dest, &old).map_err(io(&dest))?;
            fs::rename(&tmp, &dest).map_err(io(&dest))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&tmp, &dest).map_err(io(&dest))?;
        }
        sync_dir(root)?;
        Ok(dest)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// The step in a `step-N` directory name.
pub(crate) fn step_of_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-").and_then(|n| n.parse().ok())
}

/// Keep the newest `keep` `step-N` checkpoints in `root` (0 keeps all) and remove the rest,
/// plus leftovers of interrupted writes. `final` is never removed. Returns what was removed.
pub fn prune(root: &Path, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut steps = Vec::new();
    let mut removed = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(CheckpointError::Io { path: root.to_owned(), source: e }),
    };
    let me = format!("-{}-", std::process::id());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(step) = step_of_name(&name) {
            steps.push((step, path));
        } else if name.starts_with('.')
            && (name.contains(".tmp-") || name.contains(".old-"))
            && !name.contains(&me)
        {
            // Another process's interrupted write (this process's own are in flight).
            fs::remove_dir_all(&path).map_err(io(&path))?;
            removed.push(path);
        }
    }
    if keep == 0 {
        return Ok(removed);
    }
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    for (_, path) in steps.into_iter().skip(keep) {
        fs::remove_dir_all(&path).map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}
