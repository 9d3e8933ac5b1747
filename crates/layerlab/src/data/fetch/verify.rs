//! The checks raw files pass before anything is written: structure first (IDX headers, CIFAR-10
//! record sizes, labels within the classes), then the catalogue's pinned checksums where it has them.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use layerlab_pipeline::settings::IDX_FILES;
use layerlab_pipeline::Dataset;

use super::manifest::{ArchiveRecord, CheckKind, RawFileRecord};
use super::sources::Raw;
use crate::data::{cifar, idx, Split};

/// Raw files that passed every check, decoded.
pub(super) struct Verified {
    pub(super) source: String,
    pub(super) check: CheckKind,
    pub(super) files: Vec<RawFileRecord>,
    pub(super) archive: Option<ArchiveRecord>,
    pub(super) train: Split,
    pub(super) test: Split,
}

impl Verified {
    /// The manifest recording these splits, stored as dataset `name` of `classes` classes;
    /// `seconds` is how long getting them took.
    pub(super) fn manifest(&self, name: &str, classes: usize, seconds: f64) -> super::Manifest {
        super::Manifest {
            dataset: name.to_string(),
            source: self.source.clone(),
            check: self.check,
            files: self.files.clone(),
            archive: self.archive.clone(),
            classes,
            train: super::SplitRecord::of(&self.train, classes),
            test: super::SplitRecord::of(&self.test, classes),
            layerlab_version: layerlab_pipeline::VERSION.to_string(),
            fetched_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            seconds,
        }
    }
}

/// Checks raw files (structure, then pinned checksums where there are some) and decodes them.
pub(super) fn verify(dataset: Dataset, raw: Raw) -> Result<Verified> {
    let get = |name: &str| -> Result<&[u8]> {
        raw.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
            .with_context(|| format!("{name} is missing"))
    };
    let (train, test, check) = match dataset.pinned_sha256() {
        Some(pinned) => {
            let classes = dataset.classes();
            let train = idx::parse_split(IDX_FILES[0], get(IDX_FILES[0])?, IDX_FILES[1], get(IDX_FILES[1])?, classes)?;
            let test = idx::parse_split(IDX_FILES[2], get(IDX_FILES[2])?, IDX_FILES[3], get(IDX_FILES[3])?, classes)?;
            for (name, expected) in IDX_FILES.iter().zip(pinned) {
                let actual = hex::encode(Sha256::digest(get(name)?));
                if actual != *expected {
                    bail!("checksum mismatch: {name} has sha256 {actual}, expected {expected}");
                }
            }
            (train, test, CheckKind::Sha256Pinned)
        }
        None => {
            let (train, test) = cifar::parse_splits(&raw.files)?;
            (train, test, CheckKind::StructureOnly)
        }
    };
    for (split, data) in [("train", &train), ("test", &test)] {
        data.check(dataset.classes()).with_context(|| format!("{split} split"))?;
    }
    let files = raw
        .files
        .iter()
        .map(|(name, bytes)| RawFileRecord {
            name: name.clone(),
            sha256: hex::encode(Sha256::digest(bytes)),
            bytes: bytes.len() as u64,
        })
        .collect();
    Ok(Verified { source: raw.source, check, files, archive: raw.archive, train, test })
}
