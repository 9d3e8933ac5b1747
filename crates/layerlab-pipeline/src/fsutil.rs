//! Atomic writes: a temporary file in the same folder, flushed, then renamed into place.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A temporary path beside `path`, unique to this process on this host: `.<name>.tmp-<pid>@<host>`.
/// The host is part of the name because a data folder may be shared by the nodes of a cluster,
/// where process ids repeat.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}@{}", std::process::id(), hostname()))
}

/// This machine's name (the kernel's), or `localhost` where it cannot be read.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Removes temporary files in `dir` left by processes that no longer run (a killed stage), so
/// that they do not pile up beside the results. Only this host's processes are judged: another
/// node's temporary file is left alone. Best effort: a file that cannot be removed stays.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) else { return };
    let host = hostname();
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some((_, owner)) = file.strip_prefix('.').and_then(|f| f.rsplit_once(".tmp-")) else { continue };
        let (pid, owner_host) = match owner.split_once('@') {
            Some((pid, h)) => (pid, Some(h)),
            None => (owner, None),
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if owner_host.is_some_and(|h| h != host) {
            continue;
        }
        if pid != std::process::id() && !crate::lock::process_alive(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Writes `bytes` to `path` so that a reader sees either the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Like [`write_atomic`], with the content produced by `fill` into the open temporary file.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    remove_stale_temps(path.parent().unwrap_or(Path::new(".")));
    let tmp = temp_path_for(path);
    let result = (|| -> Result<()> {
        let mut file =
            File::create(&tmp).with_context(|| format!("cannot create the temporary file {}", tmp.display()))?;
        fill(&mut file)?;
        file.sync_all().with_context(|| format!("cannot flush {}", tmp.display()))?;
        drop(file);
        fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    // Make the rename itself durable (best effort: not every platform can open a folder).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_removes_temporaries_of_dead_processes_only() {
        let dir = std::env::temp_dir().join(format!("layerlab-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let dead = dir.join(".a.parquet.tmp-4294967294");
        let ours = temp_path_for(&dir.join("b.parquet"));
        let other = dir.join(".notes.txt");
        let dead_here = dir.join(format!(".d.parquet.tmp-4294967294@{}", hostname()));
        let elsewhere = dir.join(".e.parquet.tmp-4294967294@another-node");
        for p in [&dead, &ours, &other, &dead_here, &elsewhere] {
            fs::write(p, b"x").unwrap();
        }
        write_atomic(&dir.join("c.json"), b"{}").unwrap();
        assert!(!dead.exists() && !dead_here.exists(), "a dead process's temporary file stayed");
        assert!(ours.exists() && other.exists());
        assert!(elsewhere.exists(), "another node's temporary file was judged by this node's processes");
        assert_eq!(fs::read(dir.join("c.json")).unwrap(), b"{}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_names_the_file_and_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("layerlab-fsutil-fail-{}", std::process::id()));
        let path = dir.join("t.bin");
        let err = write_atomic_with(&path, |_| anyhow::bail!("disk full")).unwrap_err();
        assert!(format!("{err:#}").starts_with(&format!("cannot write {}: disk full", path.display())), "{err:#}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
