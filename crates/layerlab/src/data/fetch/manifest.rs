//! `manifest.json`: what a dataset folder holds, where it came from and how it was checked.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::{manifest_path, Split};

/// How the raw files were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckKind {
    /// Every raw file matched a sha256 pinned in the code.
    #[serde(rename = "sha256-pinned")]
    Sha256Pinned,
    /// No pinned checksums exist: record sizes and labels were checked instead.
    #[serde(rename = "structure-only")]
    StructureOnly,
}

impl CheckKind {
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Sha256Pinned => "sha256-pinned",
            CheckKind::StructureOnly => "structure-only",
        }
    }
}

/// One raw file as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawFileRecord {
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// A downloaded archive as recorded in the manifest (CIFAR-10 over HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    pub name: String,
    pub md5: String,
    pub bytes: u64,
}

/// One split as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRecord {
    pub samples: u64,
    /// [channels, height, width].
    pub shape: [usize; 3],
    /// Examples per class, class 0 first.
    pub class_counts: Vec<u64>,
}

impl SplitRecord {
    pub fn of(split: &Split, classes: usize) -> SplitRecord {
        SplitRecord {
            samples: split.len() as u64,
            shape: [split.channels, split.height, split.width],
            class_counts: split.class_counts(classes),
        }
    }
}

/// `manifest.json`: what a dataset folder holds and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub dataset: String,
    /// The source that verified: `dir:<path>`, a base URL, `npm:<package>`, `apt:<package>=<version>`.
    pub source: String,
    /// `sha256-pinned` or `structure-only`.
    pub check: CheckKind,
    pub files: Vec<RawFileRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveRecord>,
    pub classes: usize,
    pub train: SplitRecord,
    pub test: SplitRecord,
    pub layerlab_version: String,
    /// Seconds since the Unix epoch when the dataset was written.
    pub fetched_at: u64,
    /// How long the fetch took.
    pub seconds: f64,
}

/// Reads a dataset folder's `manifest.json`.
pub fn read_manifest(dataset_dir: &Path) -> Result<Manifest> {
    let path = manifest_path(dataset_dir);
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid manifest", path.display()))
}
