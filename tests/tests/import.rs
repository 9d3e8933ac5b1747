//! Bringing a run trained elsewhere (`train.import`): a layerlab run's checkpoints, renamed and
//! stripped of nothing but their names, imported as another experiment, give the same checkpoint
//! tensors, the same history errors and the same `results.parquet` as the run itself.

use std::fs;
use std::path::Path;

use layerlab::table::ReadTable;
use layerlab_tests::{mnist_datasets, run_bin, text, TINY_SETTINGS as SETTINGS};

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

/// A dataset of one's own (`[[dataset]]`, hand-written `.npz` files holding the first 3,000 MNIST
/// training and 1,000 test examples) with a run imported onto it gives, through `cargo xtask
/// run-all`, the `results.parquet` of the run trained by layerlab on MNIST limited to the same
/// examples; a faulty file is refused naming it and its fault, nothing written; a changed file
/// makes the dataset stale.
#[test]
fn an_own_dataset_with_an_imported_run_gives_the_results_of_the_run_itself() {
    use layerlab_tests::npz::split_npz;
    let tmp = tempfile::tempdir().unwrap();
    let trained_config = tmp.path().join("trained.toml");
    fs::write(&trained_config, pipeline(&tmp.path().join("a"), None)).unwrap();
    for s in ["train", "snapshot", "reset-eval"] {
        stage(s, &trained_config);
    }
    let import = tmp.path().join("elsewhere");
    fs::create_dir_all(&import).unwrap();
    for epoch in [0, 1, 3] {
        let from = tmp.path().join(format!("a/runs/run/seed-0/train/checkpoints/epoch-{epoch:04}.safetensors"));
        fs::copy(from, import.join(format!("epoch_{epoch}.safetensors"))).unwrap();
    }

    let (train, test) = layerlab::data::load(&mnist_datasets().join("mnist")).unwrap();
    let first = |s: &layerlab::data::Split, n: usize| {
        split_npz(&s.images[..n * s.image_size()], [n, s.channels, s.height, s.width], &s.labels[..n])
    };
    let digits = tmp.path().join("digits");
    fs::create_dir_all(&digits).unwrap();
    let own =
        pipeline(&tmp.path().join("c"), Some(&import)).replace("dataset = \"mnist\"", "dataset = \"digits\"").replace(
            &format!("datasets_dir = {:?}\n", mnist_datasets().display().to_string()),
            "datasets_dir = \"c-datasets\"\n[[dataset]]\nname = \"digits\"\nclasses = 10\n\
             train = \"digits/train.npz\"\ntest = \"digits/test.npz\"\n",
        );
    assert!(own.contains("[[dataset]]") && own.contains("dataset = \"digits\""), "{own}");
    let own_config = tmp.path().join("own.toml");
    fs::write(&own_config, own).unwrap();

    // A label that is not a class: refused, naming the file and the label, nothing written.
    let mut bad_labels = train.labels[..3000].to_vec();
    bad_labels[17] = 12;
    let bad = split_npz(&train.images[..3000 * 784], [3000, 1, 28, 28], &bad_labels);
    fs::write(digits.join("train.npz"), bad).unwrap();
    fs::write(digits.join("test.npz"), first(&test, 1000)).unwrap();
    let out = run_bin("fetch-data", &["digits", "--config", own_config.to_str().unwrap()]);
    let t = text(&out);
    assert!(!out.status.success() && t.contains("train.npz") && t.contains("label 12 at index 17"), "{t}");
    assert!(!tmp.path().join("c-datasets/digits").exists(), "a refused dataset was written");

    fs::write(digits.join("train.npz"), first(&train, 3000)).unwrap();
    let out = run_bin("xtask", &["run-all", "--config", own_config.to_str().unwrap(), "-e", "run"]);
    assert!(out.status.success(), "run-all failed:\n{}", text(&out));

    let without_dataset =
        |cols: Vec<(String, String)>| cols.into_iter().filter(|(n, _)| n != "dataset").collect::<Vec<_>>();
    let results = |side: &str| columns(&tmp.path().join(format!("{side}/runs/run/seed-0/reset/results.parquet")));
    let (trained, own) = (results("a"), results("c"));
    assert!(own.iter().any(|(n, c)| n == "dataset" && c.contains("\"digits\"")), "{own:?}");
    assert_eq!(without_dataset(own), without_dataset(trained), "results.parquet differs");

    // A changed test file: fetch-data (and so everything after it) is stale.
    fs::write(digits.join("test.npz"), first(&test, 999)).unwrap();
    let status = run_bin("xtask", &["status", "--config", own_config.to_str().unwrap(), "-e", "run"]);
    let t = text(&status);
    assert!(t.contains("stale"), "{t}");
}
