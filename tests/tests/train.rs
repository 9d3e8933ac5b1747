//! The `train` binary on real MNIST: identical checkpoints from identical settings, a SIGKILLed run
//! that resumes to bit-identical weights, and clear refusals of bad input.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use layerlab_tests::{bins, history_digest, mnist_datasets, run_bin, sha256_file, text};

/// SGD's settings in the tests' experiment.
const SGD: &str = "lr = 0.05\nnesterov = true";

fn config(dir: &Path, arch_extra: &str) -> std::path::PathBuf {
    config_with(dir, arch_extra, SGD)
}

/// The tests' experiment with `optimizer` lines (the optimizer and its settings) in `[train]`.
fn config_with(dir: &Path, arch_extra: &str, optimizer: &str) -> std::path::PathBuf {
    let cfg = format!(
        r#"data_dir = "{}"
datasets_dir = "{}"
[[experiment]]
name = "det"
dataset = "mnist"
seeds = [4]
[experiment.model]
arch = "fcn"
depth = 2
width = 48
{arch_extra}
[experiment.train]
epochs = 4
{optimizer}
weight_decay = 1e-4
checkpoints = [0, 2]
train_examples = 12000
test_examples = 500
"#,
        dir.join("data").display(),
        mnist_datasets().display()
    );
    let path = dir.join("pipeline.toml");
    fs::write(&path, cfg).unwrap();
    path
}

fn checkpoint_hashes(dir: &Path) -> Vec<(String, String)> {
    let ckpts = dir.join("data/runs/det/seed-4/train/checkpoints");
    let mut out: Vec<_> = fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), sha256_file(&p)))
        .collect();
    out.sort();
    out
}

fn train(config: &Path) -> std::process::Output {
    run_bin("train", &["--config", config.to_str().unwrap(), "-e", "det", "-s", "4"])
}

#[test]
fn same_settings_give_identical_checkpoints_and_a_killed_run_resumes_exactly() {
    identical_runs_and_an_exact_resume(SGD);
}

/// Adam's two buffers per tensor go into the resume file and come back bit for bit, as SGD's
/// momentum does (AdamW: its decoupled weight decay as well).
#[test]
fn an_adam_run_killed_and_resumed_equals_an_unbroken_one() {
    identical_runs_and_an_exact_resume("optimizer = \"adam\"\nlr = 0.002");
    identical_runs_and_an_exact_resume("optimizer = \"adamw\"\nlr = 0.002");
}

fn identical_runs_and_an_exact_resume(optimizer: &str) {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&a, &b] {
        let out = train(&config_with(d.path(), "", optimizer));
        assert!(out.status.success(), "{}", text(&out));
    }
    let reference = checkpoint_hashes(a.path());
    let names: Vec<_> = reference.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["epoch-0000.safetensors", "epoch-0002.safetensors", "epoch-0004.safetensors"]);
    assert_eq!(checkpoint_hashes(b.path()), reference, "two runs of the same settings differ");

    // Kill -9 as soon as the first epoch's resume point exists, then run again to the end.
    let cfg = config_with(c.path(), "", optimizer);
    let resume = c.path().join("data/runs/det/seed-4/train/resume.safetensors");
    let mut child = Command::new(bins().join("train"))
        .args(["--config", cfg.to_str().unwrap(), "-e", "det", "-s", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !resume.exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(resume.exists(), "no resume point appeared");
    assert!(!c.path().join("data/runs/det/seed-4/train/stamp.json").exists(), "a killed run must not look done");
    let status = text(&run_bin("xtask", &["status", "--config", cfg.to_str().unwrap(), "-e", "det"]));
    let train_line = status.lines().find(|l| l.starts_with("train det seed 4 ")).unwrap_or_default();
    assert!(train_line.contains(" missing (resumes after epoch "), "{status}");
    let out = train(&cfg);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("resumed after epoch"), "{t}");
    assert_eq!(checkpoint_hashes(c.path()), reference, "the resumed run differs from an unbroken one");
    // The history too, every column but the wall times, bit for bit.
    let history = |d: &tempfile::TempDir| history_digest(&d.path().join("data/runs/det/seed-4/train/history.parquet"));
    assert_eq!(history(&c), history(&a), "the resumed run's history differs from an unbroken one's");
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let d = tempfile::tempdir().unwrap();
    // An unknown initialization.
    let cfg = config(d.path(), "init = \"xavier\"");
    let out = train(&cfg);
    let t = text(&out);
    assert!(!out.status.success());
    // The file, the line with its key and value, and the names allowed.
    let named = t.contains("pipeline.toml") && t.contains("line ") && t.contains("init = \"xavier\"");
    assert!(named && t.contains("kaiming-normal"), "{t}");
    // A seed the experiment does not list.
    let cfg = config(d.path(), "");
    let out = run_bin("train", &["--config", cfg.to_str().unwrap(), "-e", "det", "-s", "9"]);
    assert!(!out.status.success() && text(&out).contains("seed 9"), "{}", text(&out));
    // A damaged resume file is named, and the checkpoints already written are kept.
    let out = train(&cfg);
    assert!(out.status.success(), "{}", text(&out));
    let before = checkpoint_hashes(d.path());
    let train_dir = d.path().join("data/runs/det/seed-4/train");
    fs::remove_file(train_dir.join("stamp.json")).unwrap();
    fs::write(train_dir.join("resume.safetensors"), b"\x08\0\0\0\0\0\0\0{}garbage").unwrap();
    let out = train(&cfg);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("resume.safetensors"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert_eq!(checkpoint_hashes(d.path()), before);
}

#[test]
fn stages_refuse_checkpoints_of_other_training_settings() {
    let d = tempfile::tempdir().unwrap();
    let out = train(&config(d.path(), ""));
    assert!(out.status.success(), "{}", text(&out));
    // A training setting changed, and the stages are run by hand without training again.
    let changed = config(d.path(), "init = \"kaiming-normal\"");
    for (stage, folder) in [("snapshot", "snapshot"), ("reset-eval", "reset")] {
        let out = run_bin(stage, &["--config", changed.to_str().unwrap(), "-e", "det", "-s", "4"]);
        let t = text(&out);
        assert!(!out.status.success(), "{stage} evaluated stale checkpoints:\n{t}");
        assert!(t.contains("holds a training run of other settings") && t.contains("model.init"), "{stage}: {t}");
        assert!(!d.path().join(format!("data/runs/det/seed-4/{folder}/stamp.json")).exists());
    }
}
