//! External clients (npm, apt-get, dpkg-deb) run with their output in files and a time limit.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The first file in `dir` whose name ends with `suffix`.
pub(super) fn find_file(dir: &Path, suffix: &str) -> Result<Option<PathBuf>> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    Ok(entries.flatten().map(|e| e.path()).find(|p| p.is_file() && p.to_string_lossy().ends_with(suffix)))
}

/// Runs an external tool with its output in files under `dir`, killing it after `limit`; an error
/// carries the last lines of its error output.
pub(super) fn run_tool(mut cmd: Command, what: &str, limit: Duration, dir: &Path) -> Result<()> {
    let out_path = dir.join(".tool-stdout");
    let err_path = dir.join(".tool-stderr");
    let out = File::create(&out_path).with_context(|| format!("cannot create {}", out_path.display()))?;
    let err = File::create(&err_path).with_context(|| format!("cannot create {}", err_path.display()))?;
    let mut child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{what}: {} is not installed", cmd.get_program().to_string_lossy()),
        _ => anyhow!(e).context(format!("cannot run {what}")),
    })?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("cannot wait for {what}"))? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    if !status.success() {
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
        bail!("{what} failed ({status}): {tail}");
    }
    Ok(())
}
