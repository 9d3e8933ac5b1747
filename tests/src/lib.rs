//! Helpers for the end-to-end tests: the workspace's paths, the stage binaries (built once, dev
//! profile), and a shared copy of real MNIST fetched once from the offline source.
//!
//! # Tests that need the machine
//!
//! No test passes by skipping. A test that needs what a developer's machine may lack is marked
//! `#[ignore = "needs …"]`, naming what it needs, so that `cargo test` reports it as ignored:
//!
//! | test target | needs |
//! | --- | --- |
//! | `slurm` | a Slurm cluster (`tests/slurm/start-cluster.sh`) |
//! | `reference` | Python with numpy, safetensors and pyarrow (`tests/python/requirements.txt`) |
//! | `fetch_data` (`fashion_mnist_from_the_debian_package`) | apt-get |
//! | `faults` (`read_only_folders_are_named`, `an_unreadable_checkpoint_is_named`) | root |
//! | `crates/layerlab/tests/gpu.rs` | a GPU: in a build without CUDA they are ignored |
//!
//! Such a test runs when asked for (`--ignored` or `--include-ignored`), and then fails, saying
//! what is missing, where the machine lacks it. `cargo xtask test` asks for them where it knows the
//! machine has what they need: under CI (`CI` set, `.ci/run` installs and starts everything) it
//! runs every target above with `--ignored` after the suite, and elsewhere
//! `LAYERLAB_SLURM_TESTS=1` or `LAYERLAB_PYTHON_TESTS=1` asks for the Slurm or the Python test.
//! `cargo xtask test --gpu` builds with CUDA, where the GPU tests are not ignored. By hand:
//! `cargo test -p layerlab-tests --test slurm -- --ignored`.
//!
//! (`check_tables` is a part of many tests rather than a test: it needs pandas and DuckDB, does
//! without them on a developer's machine, and requires them under CI.)

pub mod corpus;
pub mod npz;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// The cargo target folder (a relative `CARGO_TARGET_DIR` is taken from the workspace root, as
/// cargo takes it there when run from the root).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(|dir| root().join(dir)).unwrap_or_else(|| root().join("target"))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds every stage binary and xtask once (dev profile) and returns the folder holding them.
pub fn bins() -> &'static Path {
    static BINS: OnceLock<PathBuf> = OnceLock::new();
    BINS.get_or_init(|| {
        // The same package set as `cargo xtask run-all --dev-build` builds, so that its own
        // build finds everything up to date; xtask apart, as its features differ.
        let stages = ["-p", "fetch-data", "-p", "train", "-p", "snapshot", "-p", "reset-eval", "-p", "aggregate"];
        for packages in [&stages[..], &["-p", "xtask"]] {
            let status = Command::new(cargo())
                .current_dir(root())
                .args(["build", "-q"])
                .args(packages)
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building {packages:?} failed");
        }
        target_dir().join("debug")
    })
}

/// Runs a stage binary with arguments and returns its output.
pub fn run_bin(name: &str, args: &[&str]) -> Output {
    Command::new(bins().join(name)).args(args).current_dir(root()).output().expect("binary starts")
}

/// Runs `cargo xtask` (the built xtask binary) with arguments.
pub fn xtask(args: &[&str]) -> Output {
    run_bin("xtask", args)
}

/// A folder holding `mnist/` (real MNIST, fetched once into the target folder and reused).
pub fn mnist_datasets() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = target_dir().join("test-cache").join("datasets");
        let d = dir.to_str().expect("utf-8 path").to_string();
        let out = run_bin("fetch-data", &["mnist", "--offline", "--datasets-dir", &d]);
        assert!(out.status.success(), "fetching MNIST for the tests failed:\n{}", text(&out));
        dir
    })
}

/// CIFAR-10's six batch files in its binary layout, `n` records each, by file name; labels cycle
/// through the classes (`corpus::good_cifar_batch`).
pub fn cifar_batches(n: usize) -> Vec<(String, Vec<u8>)> {
    let files = layerlab::data::cifar::batch_files();
    files.enumerate().map(|(i, name)| (name.to_string(), corpus::good_cifar_batch(n, 10 + i as u32))).collect()
}

/// The CIFAR-10 archive of these batches, laid out as the published `cifar-10-binary.tar.gz`
/// (its folder, and a meta file that is not a batch).
pub fn cifar_archive(batches: &[(String, Vec<u8>)]) -> Vec<u8> {
    let dir = layerlab::data::cifar::ARCHIVE_DIR;
    let mut entries = vec![(format!("{dir}/batches.meta.txt"), b"airplane\n".to_vec())];
    entries.extend(batches.iter().map(|(name, bytes)| (format!("{dir}/{name}"), bytes.clone())));
    corpus::tar_gz(&entries)
}

/// Writes each (file name, bytes) into `dir`, which is made first.
pub fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
    }
}

/// stdout and stderr of a finished command, for messages.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// sha256 of bytes, hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The tiny experiment's sections (an FCN 2×32, 3 epochs on 3,000 MNIST examples, a reset grid
/// of 2 draws), ending inside `[experiment.reset]`.
pub const TINY_SETTINGS: &str = r#"
[experiment.model]
arch = "fcn"
depth = 2
width = 32
[experiment.train]
epochs = 3
lr = 0.05
checkpoints = [0, 1, 3]
train_examples = 3000
test_examples = 1000
[experiment.reset]
draws = 2
train_subset = 500
"#;

/// A tiny pipeline on a slice of real MNIST, with outputs in `data_dir`.
pub fn tiny_pipeline(data_dir: &Path, extra_reset: &str) -> String {
    format!(
        r#"data_dir = "{data}"
datasets_dir = "{datasets}"
[[experiment]]
name = "tiny"
dataset = "mnist"
seeds = [0, 1]{TINY_SETTINGS}{extra_reset}
"#,
        data = data_dir.display(),
        datasets = mnist_datasets().display(),
    )
}

/// Every entry under `dir` (symbolic links not followed) with the sha256 of its content, the
/// target of a link, or `dir` for a folder: a picture of the tree to compare before and after.
pub fn tree(dir: &Path) -> std::collections::BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("link {}", std::fs::read_link(&path).map(|p| p.display().to_string()).unwrap_or_default()),
                );
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, out);
            } else {
                out.insert(rel, sha256_file(&path));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Copies a folder recursively; symbolic links are copied as links.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("cannot create {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display())).flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&src).expect("metadata");
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).expect("link"), &dst).expect("symlink");
        } else if meta.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("cannot copy {}: {e}", src.display()));
        }
    }
}

/// The differences between two trees, one line each.
pub fn tree_diff(
    before: &std::collections::BTreeMap<String, String>,
    after: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => out.push(format!("removed {k}")),
            Some(w) if w != v => out.push(format!("changed {k}")),
            Some(_) => {}
        }
    }
    for k in after.keys().filter(|k| !before.contains_key(*k)) {
        out.push(format!("added {k}"));
    }
    out
}

/// The outputs that must be reproduced exactly: everything under `data/` except stamps (they
/// hold times), run-all's logs and lock, and the Slurm executor's job records. `history.parquet` is compared without its `seconds`
/// and `train_seconds` columns (measured wall times), `report.md` without the test folder's path
/// (it names its inputs); every other file byte for byte.
pub fn outputs(data: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for (path, hash) in tree(data) {
        let name = Path::new(&path).file_name().unwrap().to_string_lossy().into_owned();
        if hash == "dir"
            || name == "stamp.json"
            || path.starts_with("logs")
            || path.starts_with("slurm")
            || name == ".layerlab.lock"
        {
            continue;
        }
        let hash = match name.as_str() {
            "history.parquet" => history_digest(&data.join(&path)),
            // The report names the pipeline file and the tables by path: compare it with the
            // test's folder taken out.
            "report.md" => {
                let text = std::fs::read_to_string(data.join(&path)).unwrap();
                let dir = data.parent().unwrap().display().to_string();
                format!("report without paths {}", sha256_bytes(text.replace(&dir, "<DIR>").as_bytes()))
            }
            _ => hash,
        };
        out.insert(path, hash);
    }
    out
}

/// Every column of a history table but `seconds`, bit for bit.
pub fn history_digest(path: &Path) -> String {
    let t = layerlab::table::ReadTable::read(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let mut parts = Vec::new();
    for field in t.batch.schema().fields() {
        if field.name().ends_with("seconds") {
            continue;
        }
        let name = field.name();
        let values = match field.data_type() {
            arrow_schema::DataType::Int64 => format!("{:?}", t.ints(name).unwrap()),
            arrow_schema::DataType::Float64 => {
                format!("{:?}", t.floats(name).unwrap().iter().map(|v| v.map(f64::to_bits)).collect::<Vec<_>>())
            }
            arrow_schema::DataType::Utf8 => format!("{:?}", t.texts(name).unwrap()),
            arrow_schema::DataType::Boolean => format!("{:?}", t.bools(name).unwrap()),
            other => panic!("{}: column {name} of type {other}", path.display()),
        };
        parts.push(format!("{name}={values}"));
    }
    format!("history without seconds {}", sha256_bytes(parts.join(";").as_bytes()))
}

/// Checks that every table under `data` opens in pandas and DuckDB with the documented columns
/// (`tests/python/check_tables.py`), when they are installed; CI installs them, and there the
/// check is required.
pub fn check_tables(data: &Path) {
    let script = root().join("tests/python/check_tables.py");
    let py = Command::new("python3").arg("-c").arg("import pandas, duckdb").status();
    if py.map(|s| s.success()).unwrap_or(false) {
        let out = Command::new("python3").arg(&script).arg(data).output().expect("python3 runs");
        assert!(out.status.success(), "table check failed:\n{}", text(&out));
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI must have pandas and duckdb installed");
        eprintln!("pandas/duckdb not installed: table check skipped");
    }
}
