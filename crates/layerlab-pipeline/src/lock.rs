//! The run lock: one `run-all` per data folder. A lock left by a dead process is taken over.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// Held while alive; the lock file is removed on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

/// Whether a process runs (on Linux; elsewhere every process counts as alive, so nothing is
/// ever taken from a live one). A zombie (killed, not yet reaped by its parent) is not running.
pub fn process_alive(pid: u32) -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => {
            !matches!(stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()), Some("Z" | "X" | "x"))
        }
        Err(_) => Path::new(&format!("/proc/{pid}")).exists(),
    }
}

impl RunLock {
    /// Takes `<dir>/.layerlab.lock`, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(".layerlab.lock");
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    writeln!(f, "{} {}", std::process::id(), now)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = fs::read_to_string(&path).unwrap_or_default();
                    let mut parts = text.split_whitespace();
                    let pid: Option<u32> = parts.next().and_then(|p| p.parse().ok());
                    let since: Option<u64> = parts.next().and_then(|p| p.parse().ok());
                    match pid {
                        Some(pid) if process_alive(pid) => {
                            let ago = since
                                .map(|s| {
                                    let now =
                                        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(s);
                                    format!(", started {} s ago", now.saturating_sub(s))
                                })
                                .unwrap_or_default();
                            bail!(
                                "another layerlab run (process {pid}{ago}) is using {}; wait for it, or remove {} if it is gone",
                                dir.display(),
                                path.display()
                            );
                        }
                        _ => {
                            // The holder is dead (or the file is garbage): take the lock over.
                            fs::remove_file(&path)
                                .with_context(|| format!("cannot remove stale lock {}", path.display()))?;
                        }
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("cannot create lock {}", path.display())),
            }
        }
        bail!("cannot take the lock {}", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_dead_lock_taken_over() {
        let dir = std::env::temp_dir().join(format!("layerlab-lock-{}", std::process::id()));
        let first = RunLock::acquire(&dir).unwrap();
        let err = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(first);
        // A lock naming a process that cannot exist is stale.
        fs::write(dir.join(".layerlab.lock"), "4294967294 0\n").unwrap();
        let _again = RunLock::acquire(&dir).unwrap();
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_killed_process_not_yet_reaped_is_not_alive() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        assert!(process_alive(child.id()));
        child.kill().unwrap();
        // Not waited for: a zombie until reaped, as a killed stage is while its parent is gone.
        let t0 = std::time::Instant::now();
        while process_alive(child.id()) && t0.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!process_alive(child.id()), "a zombie counts as running");
        child.wait().unwrap();
    }
}
