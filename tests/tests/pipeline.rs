//! The whole pipeline through `cargo xtask`, on a tiny config over real MNIST: artifacts, caching,
//! exactly-what-changed reruns, and agreement between reset-eval and a hand-assembled network.

use std::fs;
use std::path::Path;

use candle_core::Device;
use layerlab::checkpoint;
use layerlab::data;
use layerlab::model::Architecture;
use layerlab::pipeline::Pipeline;
use layerlab::table::ReadTable;
use layerlab_tests::{check_tables, text, tiny_pipeline, xtask};

fn finished_at(dir: &Path) -> f64 {
    let stamp: serde_json::Value = serde_json::from_str(&fs::read_to_string(dir.join("stamp.json")).unwrap()).unwrap();
    stamp["finished_at"].as_f64().unwrap()
}

fn run_all(config: &Path) -> String {
    let out = xtask(&["run-all", "--config", config.to_str().unwrap(), "--dev-build"]);
    let t = text(&out);
    assert!(out.status.success(), "run-all failed:\n{t}");
    t
}

#[test]
fn run_all_caches_and_reruns_exactly_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = tmp.path().join("pipeline.toml");
    fs::write(&config, tiny_pipeline(&data, "")).unwrap();

    let first = run_all(&config);
    assert!(first.contains("report:"), "{first}");
    let run = |s: u64| data.join(format!("runs/tiny/seed-{s}"));
    for s in [0, 1] {
        for f in [
            "train/checkpoints/epoch-0000.safetensors",
            "train/checkpoints/epoch-0001.safetensors",
            "train/checkpoints/epoch-0003.safetensors",
            "train/history.parquet",
            "snapshot/units.parquet",
            "snapshot/movement.parquet",
            "reset/results.parquet",
        ] {
            assert!(run(s).join(f).exists(), "seed {s}: {f} missing");
        }
        assert!(!run(s).join("train/resume.safetensors").exists(), "resume file left behind");
    }
    let results = data.join("results/tiny");
    for f in ["summary.parquet", "robustness.parquet", "heatmap.svg", "heatmap.png", "movement.svg", "report.md"] {
        assert!(results.join(f).exists(), "{f} missing");
    }

    // Nothing changed: nothing runs.
    let second = run_all(&config);
    assert!(second.contains("up to date"), "{second}");
    assert!(!second.contains("running"), "{second}");

    // A reset setting changed: reset-eval and aggregate rerun, train and snapshot do not.
    let before: Vec<f64> = ["train", "snapshot", "reset"].iter().map(|s| finished_at(&run(0).join(s))).collect();
    let agg_before = finished_at(&results);
    fs::write(&config, tiny_pipeline(&data, "recalibrate_batches = 3")).unwrap();
    let third = run_all(&config);
    assert!(
        third.contains("reset-eval tiny seed 0: running (stale: settings changed (reset.recalibrate_batches))"),
        "{third}"
    );
    assert_eq!(finished_at(&run(0).join("train")), before[0]);
    assert_eq!(finished_at(&run(0).join("snapshot")), before[1]);
    assert!(finished_at(&run(0).join("reset")) > before[2]);
    assert!(finished_at(&results) > agg_before);

    // A deleted stamp reruns that stage and what reads it.
    fs::remove_file(run(1).join("snapshot/stamp.json")).unwrap();
    let reset1 = finished_at(&run(1).join("reset"));
    let fourth = run_all(&config);
    assert!(fourth.contains("snapshot tiny seed 1: running (missing)"), "{fourth}");
    assert!(fourth.contains("aggregate tiny: running (stale: input snapshot/seed-1 was redone)"), "{fourth}");
    assert_eq!(finished_at(&run(1).join("reset")), reset1);

    // Resetting a unit to the final checkpoint gives exactly the baseline; a checkpoint assembled
    // by hand (unit from epoch τ, the rest final) evaluated with a plain forward pass gives
    // exactly reset-eval's row.
    let pipeline = Pipeline::load(&config).unwrap();
    let exp = pipeline.experiment("tiny").unwrap();
    let table = ReadTable::read(&run(0).join("reset/results.parquet")).unwrap();
    let modes = table.texts("mode").unwrap();
    let units = table.texts("unit").unwrap();
    let epochs = table.ints("source_epoch").unwrap();
    let errors = table.floats("test_error").unwrap();
    let baseline = errors[modes.iter().position(|m| m.as_deref() == Some("baseline")).unwrap()].unwrap();
    let row = |unit: &str, epoch: i64| {
        (0..modes.len())
            .find(|&i| {
                modes[i].as_deref() == Some("reinit") && units[i].as_deref() == Some(unit) && epochs[i] == Some(epoch)
            })
            .map(|i| errors[i].unwrap())
            .unwrap()
    };
    for unit in ["fc1", "fc2", "fc3"] {
        assert_eq!(row(unit, 3), baseline, "{unit} reset to the final epoch");
    }
    let (_, test) = data::load(&pipeline.datasets_dir.join("mnist")).unwrap();
    let arch = Architecture::build(&exp.model, [1, 28, 28], 10).unwrap();
    let ckpt = |e: u32| {
        checkpoint::load(&run(0).join(format!("train/checkpoints/epoch-{e:04}.safetensors")), &arch, &Device::Cpu)
            .unwrap()
            .0
    };
    let (fin, early) = (ckpt(3), ckpt(1));
    let unit = arch.unit("fc2").unwrap();
    let mut assembled = fin.clone();
    for t in &unit.tensors {
        assembled.insert(t.name.clone(), early[&t.name].clone());
    }
    let set = layerlab::eval::EvalSet::new(&test, (0..1000).collect(), 1000);
    let m = layerlab::exec::choose(&arch, &Device::Cpu, exp.train.compute, Default::default())
        .evaluate(&assembled, &set)
        .unwrap();
    assert_eq!(m.error, row("fc2", 1));

    // Every table opens in pandas and DuckDB with the documented columns.
    check_tables(&data);
}

#[test]
fn a_bad_pipeline_file_fails_before_any_stage_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = tmp.path().join("pipeline.toml");
    let text_cfg = tiny_pipeline(&data, "").replace("lr = 0.05", "lr = 0.05\nlearning_rate = 1");
    fs::write(&config, text_cfg).unwrap();
    let out = xtask(&["run-all", "--config", config.to_str().unwrap(), "--dev-build"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("pipeline.toml") && t.contains("learning_rate") && t.contains("line 14"), "{t}");
    assert!(!t.contains("running"), "{t}");
    assert!(!data.join("runs").exists());
    assert!(!t.contains("panicked"), "{t}");
}
