//! Bringing a run trained elsewhere (`train.import`): a layerlab run's checkpoints, renamed and
//! stripped of nothing but their names, imported as another experiment, give the same checkpoint
//! tensors, the same history errors and the same `results.parquet` as the run itself.

use std::fs;
use std::path::Path;

use layerlab::table::ReadTable;
use layerlab_tests::{mnist_datasets, run_bin, text};

const SETTINGS: &str = r#"
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

/// One experiment `run` writing under `data`, trained, or imported from `import`. The same name
/// on both sides: re-randomization draws are seeded by the experiment's name.
fn pipeline(data: &Path, import: Option<&Path>) -> String {
    let settings = match import {
        Some(dir) => SETTINGS.replace("epochs = 3", &format!("epochs = 3\nimport = {:?}", dir.display().to_string())),
        None => SETTINGS.to_string(),
    };
    format!(
        "data_dir = {data:?}\ndatasets_dir = {datasets:?}\n\
         [[experiment]]\nname = \"run\"\ndataset = \"mnist\"\nseeds = [0]\n{settings}",
        data = data.display().to_string(),
        datasets = mnist_datasets().display().to_string(),
    )
}

fn stage(stage: &str, config: &Path) -> String {
    let out = run_bin(stage, &["--config", config.to_str().unwrap(), "-e", "run", "--seed", "0"]);
    let t = text(&out);
    assert!(out.status.success(), "{stage} {} failed:\n{t}", config.display());
    t
}

/// Every column of a table (but wall times), as text, for comparing two tables' contents.
fn columns(path: &Path) -> Vec<(String, String)> {
    let t = ReadTable::read(path).unwrap();
    let schema = t.batch.schema();
    schema
        .fields()
        .iter()
        .filter(|f| f.name() != "seconds")
        .map(|f| {
            let c = t.batch.column_by_name(f.name()).unwrap();
            (f.name().clone(), format!("{:?}", c))
        })
        .collect()
}

#[test]
fn an_imported_run_gives_the_results_of_the_run_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let import = tmp.path().join("elsewhere");
    let (trained_config, imported_config) = (tmp.path().join("trained.toml"), tmp.path().join("imported.toml"));
    fs::write(&trained_config, pipeline(&tmp.path().join("a"), None)).unwrap();
    fs::write(&imported_config, pipeline(&tmp.path().join("b"), Some(&import))).unwrap();
    let run = |side: &str| tmp.path().join(format!("{side}/runs/run/seed-0"));

    // Nothing to import yet: a clear error naming the folder, and nothing written.
    let out = run_bin("train", &["--config", imported_config.to_str().unwrap(), "-e", "run", "--seed", "0"]);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("elsewhere"), "{t}");
    assert!(!run("b").exists(), "a failed import wrote something");

    for s in ["train", "snapshot", "reset-eval"] {
        stage(s, &trained_config);
    }
    // The trained run's checkpoints under other names, as another program would save them.
    fs::create_dir_all(&import).unwrap();
    for epoch in [0, 1, 3] {
        let from = run("a").join(format!("train/checkpoints/epoch-{epoch:04}.safetensors"));
        fs::copy(from, import.join(format!("model_{epoch}.safetensors"))).unwrap();
    }
    let said = stage("train", &imported_config);
    assert!(said.contains("imported 3 checkpoints"), "{said}");
    for s in ["snapshot", "reset-eval"] {
        stage(s, &imported_config);
    }

    let trained = columns(&run("a").join("reset/results.parquet"));
    let imported = columns(&run("b").join("reset/results.parquet"));
    assert_eq!(trained.len(), 15);
    assert_eq!(imported, trained, "results.parquet differs");
    // The history's test errors are layerlab's own measurements: the trained run's at each kept
    // epoch (the trained history also has epoch 2).
    let errors = |exp: &str| {
        let t = ReadTable::read(&run(exp).join("train/history.parquet")).unwrap();
        let (epochs, errors) = (t.ints("epoch").unwrap(), t.floats("test_error").unwrap());
        epochs.into_iter().zip(errors).filter(|(e, _)| *e != Some(2)).collect::<Vec<_>>()
    };
    assert_eq!(errors("b"), errors("a"));

    // Nothing changed: up to date. A changed file reruns the import.
    let again = stage("train", &imported_config);
    assert!(again.contains("up to date"), "{again}");
    let first = import.join("model_0.safetensors");
    let mut bytes = fs::read(&first).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&first, &bytes).unwrap();
    let status = run_bin("xtask", &["status", "--config", imported_config.to_str().unwrap(), "-e", "run"]);
    let t = text(&status);
    assert!(t.contains("stale"), "{t}");
}
