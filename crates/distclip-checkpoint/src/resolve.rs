//! Finding and verifying checkpoints: `--resume latest|PATH`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::write::step_of_name;
use crate::{CheckpointError, FINAL_NAME, FORMAT_VERSION, MANIFEST_FILE, Manifest, io, sha256_hex};

/// A checkpoint that was passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its directory.
    pub path: PathBuf,
    /// What was wrong with it.
    pub reason: String,
}

/// The checkpoint to resume from.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Its directory.
    pub dir: PathBuf,
    /// Its verified manifest.
    pub manifest: Manifest,
    /// Newer checkpoints that were corrupt or incomplete (warn about each).
    pub skipped: Vec<Skipped>,
}

fn corrupt(dir: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt { path: dir.to_owned(), reason: reason.into() }
}

fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt(dir, "no manifest.json (the write was interrupted)"));
        }
        Err(e) => return Err(CheckpointError::Io { path, source: e }),
    };
    let m: Manifest =
        serde_json::from_slice(&text).map_err(|e| corrupt(dir, format!("manifest.json: {e}")))?;
    if m.format != FORMAT_VERSION {
        return Err(corrupt(dir, format!("manifest format {}, this build reads {FORMAT_VERSION}", m.format)));
    }
    Ok(m)
}

/// Check every file of the checkpoint in `dir` against its manifest (size, then SHA-256).
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let m = read_manifest(dir)?;
    for (name, entry) in &m.files {
        let path = dir.join(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(corrupt(dir, format!("{name} is missing")));
            }
            Err(e) => return Err(io(&path)(e)),
        };
        if bytes.len() as u64 != entry.bytes {
            return Err(corrupt(
                dir,
                format!("{name} has {} bytes, the manifest says {} (truncated?)", bytes.len(), entry.bytes),
            ));
        }
        if sha256_hex(&bytes) != entry.sha256 {
            return Err(corrupt(dir, format!("{name} does not match its SHA-256")));
        }
    }
    Ok(m)
}

/// The checkpoints in `root`, newest first: `(step, path)`. The step comes from the manifest
/// when it is readable, else from the name (`final` without a manifest sorts first, so it is
/// tried and reported rather than silently passed over).
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let by_name = if name == FINAL_NAME { Some(u64::MAX) } else { step_of_name(&name) };
        let Some(by_name) = by_name else { continue };
        let step = read_manifest(&path).map(|m| m.step).unwrap_or(by_name);
        out.push((step, path));
    }
    // Newest first; at equal steps `final` (a superset: it follows the last step) wins.
    out.sort_by(|a, b| {
        b.0.cmp(&a.0).then_with(|| {
            let fin = |p: &Path| p.file_name().is_some_and(|n| n == FINAL_NAME);
            fin(&b.1).cmp(&fin(&a.1))
        })
    });
    Ok(out)
}

/// The checkpoint `spec` names: `latest` (the newest good checkpoint in `checkpoints`), a
/// checkpoint directory, or a directory of checkpoints (a run's `checkpoints/` or the run
/// directory itself). A corrupt or incomplete checkpoint is skipped in favour of the next
/// older one in the same directory, and listed in [`Resolved::skipped`].
pub fn resolve(spec: &str, checkpoints: &Path) -> Result<Resolved, CheckpointError> {
    let (root, newest) = if spec == "latest" {
        (checkpoints.to_owned(), None)
    } else {
        let path = PathBuf::from(spec);
        if !path.exists() {
            return Err(CheckpointError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint; pass `latest` or a checkpoint directory"),
            });
        }
        if path.join("checkpoints").is_dir() {
            (path.join("checkpoints"), None)
        } else if path.join(MANIFEST_FILE).exists() || path.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n == FINAL_NAME || step_of_name(&n).is_some()
        }) {
            let parent = path.parent().map(Path::to_owned).unwrap_or_default();
            (parent, Some(path))
        } else {
            (path, None)
        }
    };
    let mut candidates = list(&root)?;
    if let Some(first) = &newest {
        // Start at the named checkpoint; fall back only to older ones.
        let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let first = canon(first);
        match candidates.iter().position(|(_, p)| canon(p) == first) {
            Some(i) => {
                candidates.drain(..i);
            }
            None => candidates.insert(0, (u64::MAX, first)),
        }
    }
    let mut skipped = Vec::new();
    let mut limit = u64::MAX;
    for (step, dir) in candidates {
        if step > limit {
            continue;
        }
        match verify(&dir) {
            Ok(manifest) => return Ok(Resolved { dir, manifest, skipped }),
            Err(e) => {
                tracing::warn!("{e}; trying an older checkpoint");
                skipped.push(Skipped { path: dir, reason: e.to_string() });
                if newest.is_some() && limit == u64::MAX {
                    // Below the named one only.
                    limit = step;
                }
            }
        }
    }
    Err(CheckpointError::NoneUsable {
        path: root,
        skipped: skipped.into_iter().map(|s| s.reason).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CheckpointMeta, FINAL_NAME, prune, step_name, write_checkpoint};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("distclip-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn meta(step: u64) -> CheckpointMeta {
        CheckpointMeta { step, epoch: step / 10, samples_seen: step * 8, run_id: "run-x".into() }
    }

    fn write(root: &Path, step: u64) -> PathBuf {
        let body = format!("weights at {step}");
        write_checkpoint(root, &step_name(step), &meta(step), &[("model.safetensors", body.as_bytes()), ("run_state.json", b"{}")])
            .unwrap()
    }

    #[test]
    fn writes_verifies_and_resolves_the_newest() {
        let root = tmp("newest");
        for s in [5, 10, 15] {
            write(&root, s);
        }
        let r = resolve("latest", &root).unwrap();
        assert_eq!(r.manifest.step, 15);
        assert_eq!(r.dir, root.join("step-00000015"));
        assert!(r.skipped.is_empty());
        assert_eq!(fs::read(r.dir.join("model.safetensors")).unwrap(), b"weights at 15");
        assert_eq!(r.manifest.files["run_state.json"].bytes, 2);
        // No temporary directory is left behind.
        let hidden = fs::read_dir(&root).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).count();
        assert_eq!(hidden, 0);
        // A run directory or the checkpoint itself work as specs too.
        let run = tmp("run");
        fs::create_dir_all(&run).unwrap();
        fs::rename(&root, run.join("checkpoints")).unwrap();
        assert_eq!(resolve(run.to_str().unwrap(), Path::new("/nonexistent")).unwrap().manifest.step, 15);
        let ten = run.join("checkpoints/step-00000010");
        assert_eq!(resolve(ten.to_str().unwrap(), Path::new("/nonexistent")).unwrap().manifest.step, 10);
        fs::remove_dir_all(&run).unwrap();
    }

    #[test]
    fn a_truncated_or_altered_checkpoint_falls_back_to_the_previous_one() {
        let root = tmp("corrupt");
        for s in [5, 10, 15] {
            write(&root, s);
        }
        // Truncate the newest checkpoint's model.
        let newest = root.join("step-00000015/model.safetensors");
        let len = fs::metadata(&newest).unwrap().len();
        fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(len - 3).unwrap();
        let r = resolve("latest", &root).unwrap();
        assert_eq!(r.manifest.step, 10);
        assert_eq!(r.skipped.len(), 1);
        assert!(r.skipped[0].reason.contains("truncated"), "{:?}", r.skipped);
        // Same length, one byte changed: caught by the checksum.
        let ten = root.join("step-00000010/model.safetensors");
        let mut b = fs::read(&ten).unwrap();
        b[0] ^= 1;
        fs::write(&ten, b).unwrap();
        let r = resolve("latest", &root).unwrap();
        assert_eq!(r.manifest.step, 5);
        assert!(r.skipped[1].reason.contains("SHA-256"), "{:?}", r.skipped);
        // Naming a corrupt checkpoint falls back to older ones, never to newer ones.
        let r = resolve(root.join("step-00000010").to_str().unwrap(), &root).unwrap();
        assert_eq!(r.manifest.step, 5);
        // An interrupted write (no manifest) is skipped too.
        fs::remove_file(root.join("step-00000005/manifest.json")).unwrap();
        let e = resolve("latest", &root).unwrap_err().to_string();
        assert!(e.contains("no usable checkpoint") && e.contains("interrupted"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn final_wins_a_tie_and_replacing_is_atomic() {
        let root = tmp("final");
        write(&root, 20);
        write_checkpoint(&root, FINAL_NAME, &meta(20), &[("model.safetensors", b"a")]).unwrap();
        write_checkpoint(&root, FINAL_NAME, &meta(20), &[("model.safetensors", b"b")]).unwrap();
        let r = resolve("latest", &root).unwrap();
        assert_eq!(r.dir, root.join(FINAL_NAME));
        assert_eq!(fs::read(r.dir.join("model.safetensors")).unwrap(), b"b");
        assert!(write_checkpoint(&root, "x", &meta(1), &[("../evil", b"")]).is_err());
        assert!(write_checkpoint(&root, "../x", &meta(1), &[]).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn prune_keeps_the_newest_k_and_final() {
        let root = tmp("prune");
        for s in [1, 2, 3, 4, 5] {
            write(&root, s);
        }
        write_checkpoint(&root, FINAL_NAME, &meta(5), &[]).unwrap();
        fs::create_dir_all(root.join(".step-00000009.tmp-1-ff")).unwrap();
        let removed = prune(&root, 2).unwrap();
        assert_eq!(removed.len(), 4, "{removed:?}");
        let mut left: Vec<String> = fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["final", "step-00000004", "step-00000005"]);
        assert!(prune(&root, 0).unwrap().is_empty());
        fs::remove_dir_all(&root).unwrap();
    }
}
