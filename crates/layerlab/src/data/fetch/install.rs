//! Staging and installing: a dataset is written into a temporary folder beside its own and moved
//! into place only once verified; staging folders of killed runs are removed.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use layerlab_pipeline::cache::{StageKey, Stamp};

use super::verify::Verified;
use super::Manifest;
use crate::data::{manifest_path, split_path, write_split};

/// Writes the splits and the manifest into `staging`, then moves them into the dataset folder:
/// the old stamp and manifest go first (so that a half-replaced folder counts as not done), the
/// manifest comes last, then the stamp.
/// `key` is the stamp's: fetch-data's key of the dataset.
pub(super) fn install(
    dir: &Path,
    key: &StageKey,
    staging: &Path,
    verified: &Verified,
    manifest: &Manifest,
) -> Result<()> {
    let name = manifest.dataset.as_str();
    write_split(&split_path(staging, "train"), &verified.train, name, &verified.source)?;
    write_split(&split_path(staging, "test"), &verified.test, name, &verified.source)?;
    let text = serde_json::to_string_pretty(manifest)? + "\n";
    layerlab_pipeline::fsutil::write_atomic(&manifest_path(staging), text.as_bytes())?;

    fs::create_dir_all(dir).with_context(|| format!("cannot create the dataset folder {}", dir.display()))?;
    Stamp::remove(dir)?;
    remove_if_present(&manifest_path(dir))?;
    for path in [split_path(staging, "train"), split_path(staging, "test"), manifest_path(staging)] {
        let target = dir.join(path.file_name().unwrap_or_default());
        fs::rename(&path, &target).with_context(|| format!("cannot move {} into place", target.display()))?;
    }
    Stamp::write(dir, key, manifest.seconds)
}

pub(super) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes staging folders left by killed runs (their process is gone).
pub(super) fn remove_stale_staging(parent: &Path, name: &str) {
    let prefix = format!(".{name}.fetch-");
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !layerlab_pipeline::lock::process_alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A folder removed with everything in it when dropped.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn create(path: PathBuf) -> Result<TempDir> {
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }
    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
