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

    // The joint study follows each unit's own row: the `robust` set is exactly the units within
    // the tolerance (0.05 by default) at τ = 0, the growth curve adds them least damaging first,
    // and its last step, every unit at τ = 0, is the initial network evaluated as it is.
    let names = table.texts("units").unwrap();
    let own: Vec<(String, f64)> = arch.units.iter().map(|u| (u.name.clone(), row(&u.name, 0))).collect();
    let robust: Vec<&str> = own.iter().filter(|(_, e)| e - baseline <= 0.05 + 1e-12).map(|(n, _)| n.as_str()).collect();
    let find = |mode: &str, unit: &str, epoch: Option<i64>| {
        (0..modes.len())
            .find(|&i| modes[i].as_deref() == Some(mode) && units[i].as_deref() == Some(unit) && epochs[i] == epoch)
    };
    match find("joint", "robust", Some(0)) {
        Some(i) => assert_eq!(names[i].as_deref().unwrap().split(',').collect::<Vec<_>>(), robust),
        None => assert!(robust.is_empty(), "no robust set though {robust:?} are robust alone"),
    }
    let mut order = own.clone();
    order.sort_by(|a, b| a.1.total_cmp(&b.1));
    let order: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    for k in 1..=order.len() {
        let i = find("growth", &format!("first-{k}"), Some(0)).unwrap_or_else(|| panic!("no growth step {k}"));
        assert_eq!(names[i].as_deref().unwrap().split(',').collect::<Vec<_>>(), order[..k]);
    }
    let initial = layerlab::exec::choose(&arch, &Device::Cpu, exp.train.compute, Default::default())
        .evaluate(&ckpt(0), &set)
        .unwrap();
    let last = find("growth", &format!("first-{}", order.len()), Some(0)).unwrap();
    assert_eq!(errors[last].unwrap(), initial.error);
    let draws = (0..modes.len()).filter(|&i| modes[i].as_deref() == Some("joint-rerandomize")).count();
    let sets = 1 + arch.units.len() + usize::from(!robust.is_empty());
    assert_eq!(draws, 2 * sets, "two draws of all-but-first, every suffix and the robust set");
    let report = fs::read_to_string(results.join("report.md")).unwrap();
    assert!(report.contains("## Joint robustness") && report.contains("| k | unit added |"), "{report}");
    assert!(results.join("growth.png").is_file() && results.join("growth.svg").is_file());

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
