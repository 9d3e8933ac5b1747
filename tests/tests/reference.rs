//! An independent numpy reference of the forward passes (issue 12): the stage binaries train,
//! snapshot and reset the small pipeline of `tests/python/reference.toml` (an FCN, VGG-11 with
//! and without BatchNorm, ResNet-18, ResNet-50, one short run each, on a slice of real MNIST), then
//! `tests/python/reference_forward.py` recomputes every network in numpy from the checkpoints and
//! the test split, and must agree with the test errors and losses in `history.parquet` and
//! reset-eval's `results.parquet` (baseline and units re-initialized to epoch 0). A perturbed
//! checkpoint must make the same script fail, so that a reference that cannot fail does not
//! pass for one that works.
//!
//! The check needs Python with numpy, safetensors and pyarrow (tests/python/requirements.txt),
//! and its stages take minutes with the dev-profile binaries, so the test is ignored unless asked
//! for (`--ignored`): `cargo xtask test` asks under CI (`CI` set) or with
//! `LAYERLAB_PYTHON_TESTS=1`. Asked for, it fails at once where a package is missing.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use layerlab_tests::{mnist_datasets, root, run_bin, text};

/// The experiments of tests/python/reference.toml and the units each re-initializes to epoch 0
/// in the reference: every unit where a forward pass is cheap, and for ResNet the first unit, a
/// strided 1×1 shortcut projection and the classifier (each unit costs a full forward pass in
/// numpy, a couple of seconds for this ResNet).
const EXPERIMENTS: [(&str, &str); 5] = [
    ("ref-fcn", "all"),
    ("ref-vgg11-bn", "all"),
    ("ref-vgg11-plain", "all"),
    ("ref-resnet18", "conv1,layer2.0.shortcut,fc"),
    // A bottleneck's three convolutions (the 1×1s at stride 1, the strided 3×3) and a stage's
    // projection.
    ("ref-resnet50", "layer1.0.conv1,layer2.0.conv2,layer2.0.conv3,layer3.0.shortcut,fc"),
];

/// The shipped pipeline with its data_dir in `dir` and datasets_dir at the tests' shared MNIST.
fn config(dir: &Path) -> std::path::PathBuf {
    let shipped = fs::read_to_string(root().join("tests/python/reference.toml")).expect("reference.toml is readable");
    let data = dir.join("data");
    let datasets = mnist_datasets();
    let mut replaced = 0;
    let lines: Vec<String> = shipped
        .lines()
        .map(|l| {
            if l.starts_with("data_dir =") {
                replaced += 1;
                format!("data_dir = {:?}", data.display().to_string())
            } else if l.starts_with("datasets_dir =") {
                replaced += 1;
                format!("datasets_dir = {:?}", datasets.display().to_string())
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_eq!(replaced, 2, "reference.toml must set data_dir and datasets_dir at the top, one line each");
    let path = dir.join("reference.toml");
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn reference(data: &Path, experiment: &str, extra: &[&str]) -> Output {
    Command::new("python3")
        .arg(root().join("tests/python/reference_forward.py"))
        .arg("--data-dir")
        .arg(data)
        .arg("--datasets-dir")
        .arg(mnist_datasets())
        .args(["--experiment", experiment])
        .args(extra)
        .current_dir(root())
        .output()
        .expect("python3 starts")
}

#[test]
#[ignore = "needs Python with numpy, safetensors and pyarrow; cargo xtask test runs it under CI"]
fn numpy_reference_agrees_with_every_forward_pass() {
    let imports = Command::new("python3").args(["-c", "import numpy, safetensors, pyarrow"]).output();
    assert!(
        imports.as_ref().is_ok_and(|o| o.status.success()),
        "the numpy reference needs python3 with numpy, safetensors and pyarrow \
         (pip install -r tests/python/requirements.txt): {}",
        imports.as_ref().map(text).unwrap_or_else(|e| e.to_string())
    );
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path());
    let cfg = config.to_str().unwrap();
    let data = tmp.path().join("data");

    for (experiment, _) in EXPERIMENTS {
        for stage in ["train", "snapshot", "reset-eval"] {
            let t0 = Instant::now();
            let out = run_bin(stage, &["--config", cfg, "--experiment", experiment, "--seed", "0"]);
            assert!(out.status.success(), "{stage} {experiment} failed:\n{}", text(&out));
            eprintln!("{stage} {experiment}: {:.1} s", t0.elapsed().as_secs_f64());
        }
    }

    let mut failures = Vec::new();
    for (experiment, units) in EXPERIMENTS {
        let out = reference(&data, experiment, &["--units", units]);
        eprintln!("{}", text(&out));
        if out.status.code() != Some(0) {
            failures.push(format!("{experiment} (exit {:?})", out.status.code()));
        }
    }
    assert!(failures.is_empty(), "the numpy reference disagrees with layerlab for: {}", failures.join(", "));

    // The negative control: with one bias shifted in every checkpoint, the same comparison must
    // fail on the numbers (exit 1 and its message), not pass and not stop on a missing input.
    let out = reference(&data, "ref-fcn", &["--perturb", "fc1.bias"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "a perturbed checkpoint must fail the reference:\n{t}");
    assert!(t.contains("FAILED: the numpy reference disagrees with layerlab"), "{t}");
}
