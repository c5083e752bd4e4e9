//! Files that survive a crash whole: the one implementation of "write to a temporary name,
//! fsync, rename, fsync the folder" that checkpoints, the coordinator's state, exported weights
//! and written shards all use. A reader sees the old file or the new one, never a mix, and a
//! crash leaves one of them on disk.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// The folder that holds `path` (`.` for a bare file name).
fn folder(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Write `bytes` to `path` and fsync it (no rename: for a file inside a folder that is itself
/// renamed into place).
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Make the entries of `dir` (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `path` with `bytes` atomically and durably: a temporary file in the same folder,
/// fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = folder(path).join(format!(".{name}.tmp-{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    rename_synced(&tmp, path)
}

/// Move a finished file `from` (written by other means) to `to` durably: fsync its contents,
/// rename, fsync the folder.
pub fn publish(from: &Path, to: &Path) -> std::io::Result<()> {
    File::open(from)?.sync_all()?;
    rename_synced(from, to)
}

fn rename_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    // Best effort where folders cannot be opened (some platforms): the rename itself happened.
    let _ = sync_dir(folder(to));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("distclip-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let partial = dir.join("00000.tar.partial");
        std::fs::write(&partial, b"tar").unwrap();
        publish(&partial, &dir.join("00000.tar")).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["00000.tar", "state.json"]);
        assert!(write_atomic(&dir.join("missing/x"), b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
