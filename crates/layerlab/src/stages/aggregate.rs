//! The `aggregate` stage: every seed's reset results of one experiment → `results/<experiment>/`
//! (`summary.parquet`, `robustness.parquet`, heatmaps, movement figure, `report.md`), then the
//! cross-experiment `results/robustness.parquet`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::aggregate::inputs::{self, Inputs};
use crate::aggregate::report::{self, ReportInput};
use crate::aggregate::summary::{self, RobustnessRow, SummaryRow};
use crate::aggregate::tables::{self, Identity};
use crate::aggregate::{chance_error, growth_lines, heatmap, movement_lines, plot};

use crate::stages::StageContext;
use crate::table::provenance;
use layerlab_pipeline::cache::{Stage, Stamp};
use layerlab_pipeline::{fsutil, Experiment, StageKey};

pub enum Outcome {
    UpToDate,
    Written { report: PathBuf, seeds: Vec<u64> },
}

/// A rendered figure: its file stem and both formats.
struct Rendered {
    stem: String,
    svg: String,
    png: Vec<u8>,
}

fn render<F: plot::Figure>(stem: String, figure: &F) -> Result<Rendered> {
    let svg = plot::svg(figure).with_context(|| format!("cannot draw {stem}.svg"))?;
    let png = plot::png(figure).with_context(|| format!("cannot draw {stem}.png"))?;
    Ok(Rendered { stem, svg, png })
}

/// A BatchNorm setting as it may appear in a file name.
fn file_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

fn list(seeds: &[u64]) -> String {
    seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Key-value metadata of the experiment's tables: provenance plus which seeds went in.
fn metadata(exp: &Experiment, key: &StageKey, inputs: &Inputs, chance: f64) -> Vec<(String, String)> {
    let mut meta = provenance(&exp.name, &key.config.to_string(), &key.config_hash());
    let hashes: serde_json::Map<String, serde_json::Value> =
        inputs.results.iter().map(|r| (r.seed.to_string(), r.config_hash.clone().into())).collect();
    meta.extend([
        ("seeds".to_string(), list(&inputs.seeds)),
        ("seeds_expected".to_string(), list(&exp.seeds)),
        ("reset_config_hashes".to_string(), serde_json::Value::Object(hashes).to_string()),
        ("aggregate_key".to_string(), key.key.clone()),
        ("tolerance".to_string(), exp.aggregate.tolerance.to_string()),
        ("chance_error".to_string(), chance.to_string()),
    ]);
    meta
}

/// The drawn figures: heatmaps by BatchNorm setting, and the movement curves when there are any.
struct Figures {
    heatmaps: Vec<(String, Rendered)>,
    movement: Option<Rendered>,
    growth: Option<Rendered>,
}

/// Draws every heatmap (one per BatchNorm setting, the first under the plain name) and the
/// movement figure.
fn figures(exp: &Experiment, inputs: &Inputs, summary: &[SummaryRow], chance: f64) -> Result<Figures> {
    let seeds = inputs.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let base =
        summary::baseline(summary).map_or(String::new(), |b| format!("  ·  baseline {:.2}%", 100.0 * b.test.mean));
    let mut heatmaps = Vec::new();
    for (i, bn) in summary::bn_settings(summary).into_iter().enumerate() {
        let stem = if i == 0 { "heatmap".to_string() } else { format!("heatmap-{}", file_safe(&bn)) };
        let bn_text = if bn == "none" { String::new() } else { format!("  ·  BatchNorm statistics: {bn}") };
        let title = format!("{}: test error (%) after resetting one unit", exp.name);
        let subtitle =
            format!("mean over seed{} {seeds}{base}{bn_text}", if inputs.seeds.len() == 1 { "" } else { "s" });
        if let Some(h) = heatmap(summary, &bn, title, subtitle, chance) {
            heatmaps.push((bn, render(stem, &h)?));
        }
    }
    let curves = summary::movement_curves(&inputs.movement);
    let movement = if curves.is_empty() {
        None
    } else {
        let title = format!("{}: how far each unit moved from its initialization", exp.name);
        Some(render("movement".into(), &movement_lines(&curves, title))?)
    };
    let title = format!("{}: where the network breaks", exp.name);
    let growth = match growth_lines(summary, exp.aggregate.tolerance, title) {
        Some(lines) => Some(render("growth".into(), &lines)?),
        None => None,
    };
    Ok(Figures { heatmaps, movement, growth })
}

fn write_figure(dir: &Path, f: &Rendered) -> Result<()> {
    fsutil::write_atomic(&dir.join(format!("{}.svg", f.stem)), f.svg.as_bytes())?;
    fsutil::write_atomic(&dir.join(format!("{}.png", f.stem)), &f.png)
}

/// Removes figures of an earlier run that this run did not draw (a BatchNorm setting dropped from
/// the pipeline, or movement results that are gone), so the folder never mixes runs.
fn remove_stale_figures(dir: &Path, written: &[&str]) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((stem, ext)) = name.rsplit_once('.') else { continue };
        let ours = stem == "heatmap" || stem.starts_with("heatmap-") || stem == "movement" || stem == "growth";
        if ours && (ext == "svg" || ext == "png") && !written.contains(&stem) {
            std::fs::remove_file(entry.path()).with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

pub fn run(ctx: &StageContext) -> Result<Outcome> {
    let exp = &ctx.experiment;
    // Aggregation spans every seed, so the seed argument of `plan` is ignored.
    let (key, out_dir, fresh) = ctx.plan(Stage::Aggregate, 0);
    if fresh {
        return Ok(Outcome::UpToDate);
    }
    let t0 = Instant::now();
    let inputs = inputs::load(&ctx.layout, exp)?;
    let classes = exp.dataset.classes();
    let chance = chance_error(classes);
    let summary = summary::summarise(inputs.records()).with_context(|| format!("experiment '{}'", exp.name))?;
    let curves = summary::movement_curves(&inputs.movement);
    let robustness: Vec<RobustnessRow> = summary::classify(
        &summary,
        exp.aggregate.tolerance,
        chance,
        &summary::final_movement(&curves),
        &inputs.unit_params,
    );
    tracing::info!(
        "aggregate {}: seeds {:?}, {} summary rows, {} units",
        exp.name,
        inputs.seeds,
        summary.len(),
        robustness.len()
    );
    // Everything is computed and drawn before the folder is touched, so a failure here leaves the
    // previous results whole.
    let Figures { heatmaps, movement, growth } = figures(exp, &inputs, &summary, chance)?;
    let first = &inputs.results[0];
    let id = Identity { experiment: &exp.name, dataset: &first.dataset, arch: &first.arch };
    let meta = metadata(exp, &key, &inputs, chance);

    Stamp::remove(&out_dir)?;
    tables::write_summary(&out_dir.join("summary.parquet"), &id, &summary, &meta)?;
    let robustness_path = out_dir.join("robustness.parquet");
    tables::write_robustness(&robustness_path, &id, &robustness, &meta)?;
    for (_, f) in &heatmaps {
        write_figure(&out_dir, f)?;
    }
    for f in movement.iter().chain(&growth) {
        write_figure(&out_dir, f)?;
    }
    let mut written: Vec<&str> = heatmaps.iter().map(|(_, f)| f.stem.as_str()).collect();
    written.extend(movement.iter().chain(&growth).map(|f| f.stem.as_str()));
    remove_stale_figures(&out_dir, &written)?;

    let heatmap_files: Vec<(String, String)> =
        heatmaps.iter().map(|(bn, f)| (bn.clone(), format!("{}.png", f.stem))).collect();
    let movement_file = movement.as_ref().map(|f| format!("{}.png", f.stem));
    let growth_file = growth.as_ref().map(|f| format!("{}.png", f.stem));
    let text = report::render(&ReportInput {
        experiment: exp,
        pipeline_path: &ctx.pipeline.path,
        inputs: &inputs,
        summary: &summary,
        robustness: &robustness,
        heatmaps: &heatmap_files,
        movement_figure: movement_file.as_deref(),
        growth_figure: growth_file.as_deref(),
        chance,
        classes,
        aggregate_key: &key.key,
        config_hash: &key.config_hash(),
    });
    let report_path = out_dir.join("report.md");
    fsutil::write_atomic(&report_path, text.as_bytes())?;

    let (combined, experiments) = tables::combine_robustness(&ctx.layout.results_root(), &robustness_path)?;
    tracing::info!(
        "{}: robustness of {} experiment(s): {}",
        combined.display(),
        experiments.len(),
        experiments.join(", ")
    );

    // A run that lacks some seeds is complete as far as it goes but not done: without a stamp, the
    // next run picks up the seeds that have finished since.
    if inputs.skipped.is_empty() {
        Stamp::write(&out_dir, &key, t0.elapsed().as_secs_f64())?;
    } else {
        let missing: Vec<u64> = inputs.skipped.iter().map(|s| s.0).collect();
        tracing::warn!(
            "aggregate {}: seeds {missing:?} are missing; results written but not stamped as done",
            exp.name
        );
    }
    Ok(Outcome::Written { report: report_path, seeds: inputs.seeds.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tables::columns_of;
    use crate::eval::Metrics;
    use crate::model::Architecture;
    use crate::stages::reset_eval::{write_results, ResultRow};
    use crate::stages::snapshot::{write_movement, write_units, MovementRow};
    use crate::table::{Column, ReadTable, Table};
    use layerlab_pipeline::cache::{reset_key, snapshot_key};
    use layerlab_pipeline::{Layout, Pipeline};

    const UNITS: [&str; 4] = ["fc1", "fc2", "fc3", "fc4"];

    fn context(dir: &Path) -> StageContext {
        let text = format!(
            "data_dir = {:?}\n\
             [[experiment]]\nname = \"fake-fcn\"\ndataset = \"mnist\"\nseeds = [0, 1, 2]\n\
             [experiment.train]\nepochs = 3\ncheckpoints = [0, 1]\n[experiment.reset]\ndraws = 2\n\
             [[experiment]]\nname = \"fake-fcn-b\"\ndataset = \"mnist\"\nseeds = [0]\n\
             [experiment.train]\nepochs = 3\ncheckpoints = [0, 1]\n[experiment.reset]\ndraws = 2\n",
            dir.display().to_string()
        );
        let pipeline = Pipeline::parse(&text, &dir.join("pipeline.toml"), dir).unwrap();
        let experiment = pipeline.experiments[0].clone();
        StageContext {
            layout: Layout::from_pipeline(&pipeline),
            pipeline,
            experiment,
            force: false,
            device: Default::default(),
        }
    }

    fn other(ctx: &StageContext) -> StageContext {
        let experiment = ctx.pipeline.experiments[1].clone();
        StageContext {
            pipeline: ctx.pipeline.clone(),
            layout: ctx.layout.clone(),
            experiment,
            force: false,
            device: Default::default(),
        }
    }

    /// Test error of each fake evaluation: fc1 is critical to re-initialization at epoch 0, every
    /// unit is destroyed by re-randomization, and the rest stay near the baseline.
    fn fake_error(seed: u64, mode: &str, unit: usize, epoch: Option<i64>, draw: Option<i64>) -> f64 {
        let base = 0.02 + 0.005 * seed as f64;
        match (mode, unit, epoch) {
            ("baseline", _, _) => base,
            ("reinit", 0, Some(0)) => 0.85,
            ("reinit", 0, Some(1)) => 0.30,
            ("reinit", u, Some(0)) => base + 0.01 * u as f64,
            ("rerandomize", _, _) => 0.88 - 0.01 * draw.unwrap_or(0) as f64,
            ("joint", u, Some(e)) => {
                if e == 3 {
                    base
                } else {
                    0.5 - 0.1 * u as f64
                }
            }
            _ => base,
        }
    }

    /// Writes a finished reset-eval result (and snapshot movement) for one seed with the stages' own
    /// writers; `drop_column` then removes one column of the results, as an older or damaged file.
    fn write_seed(ctx: &StageContext, seed: u64, drop_column: Option<&str>) {
        write_seed_bn(ctx, seed, drop_column, &["none"]);
    }

    /// Like [`write_seed`], for a network with BatchNorm evaluated under each of `bns`.
    fn write_seed_bn(ctx: &StageContext, seed: u64, drop_column: Option<&str>, bns: &[&'static str]) {
        let exp = &ctx.experiment;
        let layerlab_pipeline::DataSource::Catalogue(dataset) = &exp.dataset else { panic!("a catalogue dataset") };
        let arch = Architecture::build(&exp.model, dataset.image_shape(), dataset.classes()).unwrap();
        let names: Vec<&str> = arch.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, UNITS, "the fake errors are made for these units");
        let row = |mode: &'static str, unit: Option<String>, index: Option<usize>, units: String| {
            move |epoch: Option<i64>, draw: Option<i64>, error: f64, bn_stats: &'static str| ResultRow {
                mode: mode.parse().unwrap(),
                unit: unit.clone(),
                unit_index: index.map(|i| i as i64),
                units: units.clone(),
                source_epoch: epoch,
                draw,
                bn_stats,
                test: Metrics { loss: 2.0 * error, error, examples: 1000 },
                train: Metrics { loss: error, error: error / 2.0, examples: 500 },
            }
        };
        let trained = if bns == ["none"] { "none" } else { "trained" };
        let mut rows = vec![row("baseline", None, None, String::new())(
            None,
            None,
            fake_error(seed, "baseline", 0, None, None),
            trained,
        )];
        for (k, &bn) in bns.iter().enumerate() {
            // Each later BatchNorm setting does a little better, so the heatmaps differ.
            let shift = -0.1 * k as f64;
            for (u, name) in UNITS.iter().enumerate() {
                let reinit = row("reinit", Some(name.to_string()), Some(u), name.to_string());
                for e in exp.checkpoint_epochs() {
                    let err = fake_error(seed, "reinit", u, Some(e as i64), None);
                    let err = if e == 0 && u == 0 { err + shift } else { err };
                    rows.push(reinit(Some(e as i64), None, err, bn));
                }
                let rerandomize = row("rerandomize", Some(name.to_string()), Some(u), name.to_string());
                for d in 0..exp.reset.draws as i64 {
                    rows.push(rerandomize(
                        None,
                        Some(d),
                        fake_error(seed, "rerandomize", u, None, Some(d)) + shift,
                        bn,
                    ));
                }
            }
            // The growth curve adds the units last first; it breaks at k = 3 (6 points over).
            let base = fake_error(seed, "baseline", 0, None, None);
            for k in 1..=UNITS.len() {
                let units: Vec<&str> = UNITS.iter().rev().take(k).copied().collect();
                let error = if k == UNITS.len() { 0.9 } else { base + 0.02 * k as f64 };
                rows.push(row("growth", Some(format!("first-{k}")), None, units.join(","))(Some(0), None, error, bn));
            }
            for u in 0..UNITS.len() {
                let joint = row("joint", Some(format!("from-{}", UNITS[u])), None, UNITS[u..].join(","));
                for e in exp.checkpoint_epochs() {
                    rows.push(joint(Some(e as i64), None, fake_error(seed, "joint", u, Some(e as i64), None), bn));
                }
            }
        }
        let key = reset_key(exp, seed);
        let dir = ctx.layout.reset_dir(&exp.name, seed);
        let results = dir.join("results.parquet");
        write_results(&results, &rows, exp, &arch, seed, &key, "cpu: test").unwrap();
        if let Some(drop) = drop_column {
            let table = ReadTable::read(&results).unwrap();
            let mut columns = columns_of(&table).unwrap();
            columns.retain(|c| c.0 != drop);
            let meta: Vec<(String, String)> = table.metadata.into_iter().collect();
            Table { columns }.write(&results, &meta).unwrap();
        }
        Stamp::write(&dir, &key, 1.0).unwrap();

        let mut movement = Vec::new();
        for (u, name) in
            UNITS.iter().enumerate().map(|(u, n)| (Some(u as i64), n.to_string())).chain([(None, "all".to_string())])
        {
            for e in exp.checkpoint_epochs() {
                let d = e as f64 * (0.1 + 0.05 * u.unwrap_or(1) as f64) + 0.01 * seed as f64;
                movement.push(MovementRow {
                    unit_index: u,
                    unit: name.clone(),
                    epoch: e as i64,
                    l2_to_init: d,
                    l2_to_init_rel: Some(d),
                    linf_to_init: d,
                    l2_to_final: d,
                    l2_norm: d,
                });
            }
        }
        let skey = snapshot_key(exp, seed);
        let sdir = ctx.layout.snapshot_dir(&exp.name, seed);
        let meta = provenance(&exp.name, &skey.config.to_string(), &skey.config_hash());
        write_movement(&sdir.join("movement.parquet"), &exp.name, seed, &movement, &meta).unwrap();
        write_units(&sdir.join("units.parquet"), &exp.name, seed, &arch, &meta).unwrap();
        Stamp::write(&sdir, &skey, 1.0).unwrap();
    }

    fn err_text(r: Result<Outcome>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn end_to_end_on_a_fake_fcn() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path());
        for seed in [0, 1, 2] {
            write_seed(&ctx, seed, None);
        }
        let Outcome::Written { report, seeds } = run(&ctx).unwrap() else { panic!("expected a run") };
        assert_eq!(seeds, vec![0, 1, 2]);
        let out = ctx.layout.results_dir("fake-fcn");
        assert_eq!(report, out.join("report.md"));
        for f in [
            "summary.parquet",
            "robustness.parquet",
            "heatmap.svg",
            "heatmap.png",
            "movement.svg",
            "movement.png",
            "growth.svg",
            "growth.png",
            "report.md",
            "stamp.json",
        ] {
            assert!(out.join(f).is_file(), "{f} missing");
        }

        // Summary: the baseline is 0.02, 0.025, 0.03 over seeds; fc1 re-initialized to epoch 0 is 0.85.
        let s = ReadTable::read(&out.join("summary.parquet")).unwrap();
        let modes = s.texts("mode").unwrap();
        let units = s.texts("unit").unwrap();
        let epochs = s.ints("source_epoch").unwrap();
        let mean = s.floats("test_error_mean").unwrap();
        let delta = s.floats("test_error_delta").unwrap();
        let n_rows = s.ints("n_rows").unwrap();
        let lo = s.floats("test_error_ci95_low").unwrap();
        let b = modes.iter().position(|m| m.as_deref() == Some("baseline")).unwrap();
        assert!((mean[b].unwrap() - 0.025).abs() < 1e-12);
        assert!(lo[b].unwrap() < 0.025);
        let i = (0..s.rows())
            .find(|&i| {
                modes[i].as_deref() == Some("reinit") && units[i].as_deref() == Some("fc1") && epochs[i] == Some(0)
            })
            .unwrap();
        assert!((delta[i].unwrap() - (0.85 - 0.025)).abs() < 1e-12);
        let r = (0..s.rows())
            .find(|&i| modes[i].as_deref() == Some("rerandomize") && units[i].as_deref() == Some("fc2"))
            .unwrap();
        assert!((mean[r].unwrap() - 0.875).abs() < 1e-12);
        assert_eq!(n_rows[r], Some(6));
        assert_eq!(s.metadata.get("seeds").map(String::as_str), Some("0,1,2"));
        assert!(s.metadata.contains_key("config_hash"));

        // Robustness: fc1 critical to re-initialization, the others robust; all critical to re-randomization.
        let t = ReadTable::read(&out.join("robustness.parquet")).unwrap();
        let classes: Vec<Option<String>> = t.texts("reinit_class").unwrap();
        assert_eq!(
            classes,
            vec![Some("critical".into()), Some("robust".into()), Some("robust".into()), Some("robust".into())]
        );
        assert!(t.texts("rerandomize_class").unwrap().iter().all(|c| c.as_deref() == Some("critical")));
        assert!(t.floats("tolerance").unwrap().iter().all(|v| *v == Some(0.05)));
        assert!(t.floats("l2_to_init_rel_final").unwrap().iter().all(Option::is_some));
        // fc1 784·256 + 256, fc2 and fc3 256·256 + 256, fc4 256·10 + 10.
        assert_eq!(t.ints("params").unwrap(), [Some(200_960), Some(65_792), Some(65_792), Some(2_570)]);

        let md = std::fs::read_to_string(&report).unwrap();
        for needle in [
            "# fake-fcn",
            "**Computed on** (the reset grids): cpu: test (seeds 0, 1, 2)",
            "![Reset heatmap](heatmap.png)",
            "movement.png",
            "Critical to re-initialization: fc1.",
            "from-fc2",
            "config hash",
            "2.50%",
            // The critical unit holds 200,960 of the 335,114 parameters.
            "| none | re-init τ=0 | 1 | 200,960 (60.0%) | 3 | 134,154 (40.0%) |",
            "| none | re-randomized | 4 | 335,114 (100.0%) | 0 | 0 (0.0%) |",
            "| 2 | fc3 | 6.50% | +4.00 pp | robust |",
            "The network breaks at k = 3, when fc2 joins",
            "![Growth curve](growth.png)",
        ] {
            assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
        }
        let model = md.lines().find(|l| l.starts_with("- **Model**")).unwrap();
        assert!(model.contains("arch = fcn") && model.contains("depth = "), "{model}");
        assert!(!model.contains("batch_norm") && !model.contains("width_mult"), "an FCN's report lists {model}");
        roxmltree::Document::parse(&std::fs::read_to_string(out.join("heatmap.svg")).unwrap()).unwrap();

        // A second run with nothing changed does nothing.
        assert!(matches!(run(&ctx).unwrap(), Outcome::UpToDate));

        // The cross-experiment table holds every experiment with results.
        let b = other(&ctx);
        write_seed(&b, 0, None);
        run(&b).unwrap();
        let all = ReadTable::read(&ctx.layout.results_root().join("robustness.parquet")).unwrap();
        assert_eq!(all.rows(), 8);
        let names: std::collections::BTreeSet<Option<String>> = all.texts("experiment").unwrap().into_iter().collect();
        assert_eq!(names.len(), 2);
        // With one seed there is a mean but no interval.
        let one = ReadTable::read(&b.layout.results_dir("fake-fcn-b").join("summary.parquet")).unwrap();
        assert!(one.floats("test_error_ci95_low").unwrap().iter().all(Option::is_none));
        assert!(one.floats("test_error_std").unwrap().iter().all(Option::is_none));
    }

    #[test]
    fn one_heatmap_per_batch_norm_setting() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path());
        let out = ctx.layout.results_dir("fake-fcn");
        // A figure of a setting no longer run must not survive the next aggregation.
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("heatmap-old.png"), b"stale").unwrap();
        for seed in [0, 1, 2] {
            write_seed_bn(&ctx, seed, None, &["with-layer", "keep", "recalibrate"]);
        }
        run(&ctx).unwrap();
        for f in ["heatmap.png", "heatmap.svg", "heatmap-keep.png", "heatmap-keep.svg", "heatmap-recalibrate.png"] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        assert!(!out.join("heatmap-old.png").exists());
        assert!(!out.join("heatmap-with-layer.png").exists());
        let t = ReadTable::read(&out.join("robustness.parquet")).unwrap();
        assert_eq!(t.rows(), 12);
        let bn = t.texts("bn_stats").unwrap();
        assert_eq!(bn[0].as_deref(), Some("with-layer"));
        assert_eq!(bn[11].as_deref(), Some("recalibrate"));
        let s = ReadTable::read(&out.join("summary.parquet")).unwrap();
        assert_eq!(s.texts("bn_stats").unwrap()[0].as_deref(), Some("trained"));
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(md.contains("### BatchNorm statistics: `keep`") && md.contains("](heatmap-keep.png)"), "{md}");
    }

    #[test]
    fn a_missing_seed_is_skipped_and_the_result_not_stamped() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path());
        write_seed(&ctx, 0, None);
        write_seed(&ctx, 2, None);
        let Outcome::Written { seeds, report } = run(&ctx).unwrap() else { panic!("expected a run") };
        assert_eq!(seeds, vec![0, 2]);
        assert!(std::fs::read_to_string(report).unwrap().contains("Seed 1 is missing"));
        assert!(Stamp::read(&ctx.layout.results_dir("fake-fcn")).is_none());
    }

    #[test]
    fn no_results_at_all_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let e = err_text(run(&context(tmp.path())));
        assert!(e.contains("no reset results") && e.contains("fake-fcn"), "{e}");
    }

    #[test]
    fn a_missing_column_names_file_and_column() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path());
        write_seed(&ctx, 0, None);
        write_seed(&ctx, 1, Some("train_error"));
        let e = err_text(run(&ctx));
        assert!(e.contains("seed-1/reset/results.parquet") && e.contains("train_error"), "{e}");
        assert!(!ctx.layout.results_dir("fake-fcn").join("summary.parquet").exists());
    }

    #[test]
    fn seeds_with_different_settings_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path());
        write_seed(&ctx, 0, None);
        write_seed(&ctx, 1, None);
        // Rewrite seed 1's results as if made with three draws (its stamp still says current).
        let path = ctx.layout.reset_dir("fake-fcn", 1).join("results.parquet");
        let t = ReadTable::read(&path).unwrap();
        let mut changed = ctx.experiment.clone();
        changed.reset.draws = 3;
        let key = reset_key(&changed, 1);
        let cols = t.batch.schema().fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>();
        let mut table = Table::new();
        for name in cols {
            let c = match t.batch.column_by_name(&name).unwrap().data_type() {
                arrow_schema::DataType::Int64 => Column::Int(t.ints(&name).unwrap()),
                arrow_schema::DataType::Float64 => Column::Float(t.floats(&name).unwrap()),
                _ => Column::Text(t.texts(&name).unwrap()),
            };
            table = table.nullable(&name, c);
        }
        table.write(&path, &provenance("fake-fcn", &key.config.to_string(), &key.config_hash())).unwrap();
        let e = err_text(run(&ctx));
        assert!(e.contains("different settings") && e.contains("reset.draws"), "{e}");
        assert!(e.contains("seed-0/reset/results.parquet") && e.contains("seed-1/reset/results.parquet"), "{e}");
    }

    #[test]
    fn stale_results_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path());
        write_seed(&ctx, 0, None);
        let mut changed = ctx.experiment.clone();
        changed.train.lr = 0.5;
        Stamp::write(&ctx.layout.reset_dir("fake-fcn", 0), &reset_key(&changed, 0), 1.0).unwrap();
        let e = err_text(run(&ctx));
        assert!(e.contains("stale") && e.contains("seed 0"), "{e}");
    }
}
