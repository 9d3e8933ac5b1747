//! The malformed-input corpus (`tests/corpus/`, made by `layerlab_tests::corpus`): the committed
//! files are exactly what the generator makes, and every file, given to the binary that reads it,
//! is refused with an exit code other than 0, a message naming the file and the fault, no panic,
//! and nothing changed on disk. Crashing inputs kept from fuzzing are replayed through the readers.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use layerlab::pipeline::settings::IDX_FILES;
use layerlab_tests::corpus::{self, Case, Reader};
use layerlab_tests::{copy_tree, mnist_datasets, root, run_bin, text, tree, tree_diff};

fn corpus_dir() -> PathBuf {
    root().join("tests/corpus")
}

/// Committed files under `tests/corpus/`, fuzz regressions apart.
fn committed() -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).expect("inside").display().to_string();
            if rel == "fuzz-regressions" {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(rel, fs::read(&path).expect("readable"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&corpus_dir(), &corpus_dir(), &mut out);
    out
}

#[test]
fn corpus_files_are_exactly_what_the_generator_makes() {
    let cases = corpus::cases();
    let mut expected: BTreeMap<String, Vec<u8>> = cases.iter().map(|c| (c.path.clone(), c.bytes.clone())).collect();
    assert_eq!(expected.len(), cases.len(), "two cases share a path");
    expected.insert("README.md".into(), corpus::readme(&cases).into_bytes());
    let have = committed();
    if std::env::var_os("LAYERLAB_BLESS_CORPUS").is_some() {
        for path in have.keys().filter(|p| !expected.contains_key(*p)) {
            fs::remove_file(corpus_dir().join(path)).unwrap();
        }
        for (path, bytes) in &expected {
            let p = corpus_dir().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, bytes).unwrap();
        }
        return;
    }
    let mut diff = Vec::new();
    for (path, bytes) in &expected {
        match have.get(path) {
            None => diff.push(format!("missing {path}")),
            Some(b) if b != bytes => diff.push(format!("differs {path}")),
            Some(_) => {}
        }
    }
    diff.extend(have.keys().filter(|p| !expected.contains_key(*p)).map(|p| format!("not generated {p}")));
    assert!(
        diff.is_empty(),
        "tests/corpus is out of date (regenerate with LAYERLAB_BLESS_CORPUS=1 cargo test -p layerlab-tests \
         --test corpus, never by hand):\n{}",
        diff.join("\n")
    );
}

/// A finished tiny run (train, snapshot, reset-eval for seed 0) of `corpus::PIPELINE_BASE`, made
/// once; each case works on a copy.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            layerlab_tests::target_dir().join("test-cache").join(format!("corpus-fixture-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data/datasets")).unwrap();
        std::os::unix::fs::symlink(mnist_datasets().join("mnist"), dir.join("data/datasets/mnist")).unwrap();
        let config = dir.join("pipeline.toml");
        fs::write(&config, corpus::PIPELINE_BASE).unwrap();
        for stage in ["train", "snapshot", "reset-eval"] {
            let out = run_bin(stage, &["--config", config.to_str().unwrap(), "-e", "tiny", "-s", "0"]);
            assert!(out.status.success(), "{stage} of the corpus fixture failed:\n{}", text(&out));
        }
        dir
    })
}

/// Sets up the case in `dir` and returns the command line to run and the file name the message
/// must carry.
fn stage_case(case: &Case, dir: &Path) -> (&'static str, Vec<String>, String) {
    let file_name = Path::new(&case.path).file_name().unwrap().to_string_lossy().into_owned();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let raw = dir.join("raw");
    let datasets = dir.join("datasets");
    let fetch_args = |dataset: &str, from: &Path| {
        let mut a = vec![dataset.to_string(), "--from".into(), s(from), "--offline".into(), "--no-registry".into()];
        a.extend(["--datasets-dir".into(), s(&datasets)]);
        a
    };
    let run = dir.join("data/runs/tiny/seed-0");
    let config = s(&dir.join("pipeline.toml"));
    let seed_args = |force: bool| {
        let mut a: Vec<String> = ["--config", &config, "-e", "tiny", "-s", "0"].map(String::from).to_vec();
        if force {
            a.push("--force".into());
        }
        a
    };
    match case.reader {
        Reader::Idx(k) => {
            fs::create_dir_all(&raw).unwrap();
            fs::create_dir_all(&datasets).unwrap();
            for (i, good) in corpus::good_idx_files().iter().enumerate() {
                fs::write(raw.join(IDX_FILES[i]), if i == k { &case.bytes } else { good }).unwrap();
            }
            ("fetch-data", fetch_args("mnist", &raw), IDX_FILES[k].to_string())
        }
        Reader::CifarBatch(name) => {
            fs::create_dir_all(&raw).unwrap();
            fs::create_dir_all(&datasets).unwrap();
            for (n, good) in layerlab_tests::cifar_batches(2) {
                fs::write(raw.join(&n), if n == name { &case.bytes } else { &good }).unwrap();
            }
            ("fetch-data", fetch_args("cifar10", &raw), name.to_string())
        }
        Reader::CifarArchive => {
            fs::create_dir_all(&raw).unwrap();
            fs::create_dir_all(&datasets).unwrap();
            fs::write(raw.join(&file_name), &case.bytes).unwrap();
            ("fetch-data", fetch_args("cifar10", &raw.join(&file_name)), file_name)
        }
        Reader::Checkpoint => {
            copy_tree(fixture(), dir);
            fs::write(run.join("train/checkpoints/epoch-0001.safetensors"), &case.bytes).unwrap();
            ("snapshot", seed_args(true), "epoch-0001.safetensors".into())
        }
        Reader::DatasetSplit => {
            copy_tree(fixture(), dir);
            let mnist = dir.join("data/datasets/mnist");
            fs::remove_file(&mnist).unwrap();
            fs::create_dir_all(&mnist).unwrap();
            fs::write(mnist.join("test.safetensors"), &case.bytes).unwrap();
            ("snapshot", seed_args(true), "test.safetensors".into())
        }
        Reader::ResultsTable => {
            copy_tree(fixture(), dir);
            fs::write(run.join("reset/results.parquet"), &case.bytes).unwrap();
            ("aggregate", ["--config", &config, "-e", "tiny"].map(String::from).to_vec(), "results.parquet".into())
        }
        Reader::MovementTable => {
            copy_tree(fixture(), dir);
            fs::write(run.join("snapshot/movement.parquet"), &case.bytes).unwrap();
            ("aggregate", ["--config", &config, "-e", "tiny"].map(String::from).to_vec(), "movement.parquet".into())
        }
        Reader::Import => {
            copy_tree(fixture(), dir);
            // Epochs 0 and 2 good (the fixture's own checkpoints), epoch 1 the case.
            let import = dir.join("imported");
            fs::create_dir_all(&import).unwrap();
            for epoch in [0, 2] {
                let name = format!("epoch-{epoch:04}.safetensors");
                fs::copy(run.join("train/checkpoints").join(&name), import.join(&name)).unwrap();
            }
            fs::write(import.join("epoch-0001.safetensors"), &case.bytes).unwrap();
            let text =
                corpus::PIPELINE_BASE.replace("[experiment.train]\n", "[experiment.train]\nimport = \"imported\"\n");
            assert_ne!(text, corpus::PIPELINE_BASE);
            let path = dir.join("import.toml");
            fs::write(&path, text).unwrap();
            let args = ["--config", path.to_str().unwrap(), "-e", "tiny", "-s", "0"].map(String::from).to_vec();
            ("train", args, "epoch-0001.safetensors".into())
        }
        Reader::OwnDataset => {
            // Nothing stored yet: the datasets folder holds only what the case must not change.
            let own = dir.join("own");
            fs::create_dir_all(&own).unwrap();
            fs::create_dir_all(&datasets).unwrap();
            fs::write(own.join("train.npz"), corpus::own_dataset_train_npz()).unwrap();
            fs::write(own.join("test.npz"), &case.bytes).unwrap();
            let path = dir.join("own.toml");
            let declared =
                "[[dataset]]\nname = \"mine\"\nclasses = 10\ntrain = \"own/train.npz\"\ntest = \"own/test.npz\"\n";
            fs::write(&path, format!("{}\n{declared}", corpus::PIPELINE_BASE)).unwrap();
            let args = ["mine", "--config", &s(&path), "--datasets-dir", &s(&datasets)].map(String::from).to_vec();
            ("fetch-data", args, "test.npz".into())
        }
        Reader::Pipeline => {
            copy_tree(fixture(), dir);
            let path = dir.join(&file_name);
            fs::write(&path, &case.bytes).unwrap();
            let args = ["--config", path.to_str().unwrap(), "-e", "tiny", "-s", "0"].map(String::from).to_vec();
            ("train", args, file_name)
        }
    }
}

#[test]
fn every_malformed_file_is_refused_clearly_without_a_panic_or_a_change() {
    let cases = corpus::cases();
    let mut failures = Vec::new();
    let t0 = std::time::Instant::now();
    let mut slowest = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let started = std::time::Instant::now();
        let tmp = tempfile::tempdir().unwrap();
        let (bin, args, file_name) = stage_case(case, tmp.path());
        let before = tree(tmp.path());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_bin(bin, &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut wrong = Vec::new();
        if out.status.success() {
            wrong.push("exited 0".to_string());
        }
        if stderr.contains("panicked") {
            wrong.push("panicked".into());
        }
        if !stderr.contains(&file_name) {
            wrong.push(format!("message does not name {file_name}"));
        }
        for word in &case.fault {
            if !stderr.contains(word.as_str()) {
                wrong.push(format!("message lacks {word:?}"));
            }
        }
        let changed = tree_diff(&before, &tree(tmp.path()));
        if !changed.is_empty() {
            wrong.push(format!("changed on disk: {}", changed.join(", ")));
        }
        slowest.push((started.elapsed().as_secs_f64(), case.path.clone()));
        if !wrong.is_empty() {
            failures.push(format!(
                "[{i}] {} ({bin}): {}\n    stderr: {}",
                case.path,
                wrong.join("; "),
                text(&out).trim().replace('\n', "\n    ")
            ));
        }
    }
    eprintln!("{} malformed files checked in {:.1} s", cases.len(), t0.elapsed().as_secs_f64());
    slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!("slowest: {:?}", &slowest[..5.min(slowest.len())]);
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn crashing_inputs_found_by_fuzzing_are_refused_without_a_panic() {
    use layerlab::data::{cifar, idx};
    let dir = corpus_dir().join("fuzz-regressions");
    let mut n = 0;
    for target in ["idx", "cifar", "pipeline_toml"] {
        let folder = dir.join(target);
        let entries = fs::read_dir(&folder).unwrap_or_else(|e| panic!("{}: {e} (it is committed)", folder.display()));
        for entry in entries.flatten() {
            let bytes = fs::read(entry.path()).unwrap();
            n += 1;
            match target {
                "idx" => {
                    let _ = idx::parse_images(&bytes);
                    let _ = idx::parse_labels(&bytes);
                    if let Some((&cut, rest)) = bytes.split_first() {
                        let (a, b) = rest.split_at((cut as usize * rest.len() / 255).min(rest.len()));
                        let _ = idx::parse_split("images", a, "labels", b, 10);
                    }
                }
                "cifar" => {
                    let _ = cifar::parse_batch(&bytes);
                    let _ = cifar::read_archive(&bytes[..]);
                }
                _ => {
                    if let Ok(text) = std::str::from_utf8(&bytes) {
                        if let Err(e) = layerlab::pipeline::Pipeline::parse(text, Path::new("f.toml"), Path::new("/b"))
                        {
                            assert!(format!("{e:#}").contains("f.toml"), "{}: {e:#}", entry.path().display());
                        }
                    }
                }
            }
        }
    }
    assert!(n >= 3, "only {n} fuzz regression inputs under {}: every target keeps at least one", dir.display());
    eprintln!("{n} fuzz regression inputs replayed");
}
