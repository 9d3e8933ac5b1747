//! The `reset-eval` stage: a trained run → `reset/results.parquet`, one row per evaluation of a
//! reset network (baseline, re-initialization to each kept epoch, re-randomization draws, joint
//! resets), each on the whole test set and on a fixed, seeded training subset.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::device;
use crate::eval::{EvalSet, Metrics};
use crate::exec;
use crate::kernels::KernelOptions;
use crate::model::{Architecture, State};
use crate::progress;
use crate::random;
use crate::reset::{self, VariantLabel};
use crate::stages::StageContext;
use crate::table::{provenance, with_device, Column, Table};
use layerlab_pipeline::cache::{Stage, Stamp};
use layerlab_pipeline::{BnStats, Experiment, ResetMode, RowMode};

pub enum Outcome {
    UpToDate,
    /// `reused`: rows that repeat another variant's network, given its metrics (not computed).
    Written {
        rows: usize,
        reused: usize,
        seconds: f64,
    },
}

/// One row of `results.parquet`.
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub mode: RowMode,
    pub unit: Option<String>,
    pub unit_index: Option<i64>,
    pub units: String,
    pub source_epoch: Option<i64>,
    pub draw: Option<i64>,
    pub bn_stats: &'static str,
    pub test: Metrics,
    pub train: Metrics,
}

pub fn run(ctx: &StageContext, seed: u64) -> Result<Outcome> {
    ctx.check_seed(seed)?;
    let exp = &ctx.experiment;
    let (key, out_dir, fresh) = ctx.plan(Stage::ResetEval, seed);
    if fresh {
        return Ok(Outcome::UpToDate);
    }
    let t0 = Instant::now();
    let (dev, device_name) = ctx.compute_device()?;
    let (train_split, test_split) = ctx.datasets(seed)?;
    let arch = ctx.architecture(&test_split)?;
    let sets = reset::joint_sets(exp, &arch)?;
    let bn_settings: Vec<Option<BnStats>> =
        if arch.has_batch_norm() { exp.reset.bn_stats.iter().copied().map(Some).collect() } else { vec![None] };
    let checkpoints: BTreeMap<u32, State> =
        crate::checkpoint::load_run(&ctx.layout, exp, seed, &arch, &dev)?.into_iter().collect();
    let (&final_epoch, trained) = checkpoints.iter().next_back().context("no checkpoints")?;
    tracing::info!("reset-eval {} seed {seed}: final epoch {final_epoch}, {} units", exp.name, arch.units.len());

    let n_test = test_split.limited_len(exp.train.test_examples);
    let eval_batch = exp.train.eval_batch_size as usize;
    let test_set = EvalSet::new(&test_split, (0..n_test).collect(), eval_batch);
    // The train error is measured on examples the network was trained on (the first
    // `train.train_examples` when set), with the labels it was trained on (`train.label_noise`).
    let trained_examples = train_split.limited_len(exp.train.train_examples);
    let subset = random::train_subset(trained_examples, seed, exp.reset.train_subset as usize);
    let train_set = EvalSet::new(&train_split, subset, eval_batch);
    // The first `recalibrate_batches` training batches of the calibration order.
    let batch_size = exp.train.batch_size as usize;
    let cal_order = random::calibration_order(train_split.len(), seed);
    let cal_examples = cal_order.into_iter().take(exp.reset.recalibrate_batches as usize * batch_size).collect();
    let calibration = EvalSet::new(&train_split, cal_examples, batch_size);

    let named = |e| name_memory_settings(exp, &bn_settings, e);

    let eval_sets = [&test_set, &train_set];
    let executor = exec::choose(&arch, &dev, exp.train.compute, KernelOptions::with_tf32(exp.train.tf32));
    let mut grid =
        reset::GridEvaluator::new(&arch, trained, &eval_sets, &calibration, &*executor, exp.reset.prefix_reuse);

    // Baseline: the trained network itself.
    let base = grid.baseline().map_err(named)?;
    let mut rows = vec![ResultRow {
        mode: RowMode::Baseline,
        unit: None,
        unit_index: None,
        units: String::new(),
        source_epoch: None,
        draw: None,
        bn_stats: if arch.has_batch_norm() { "trained" } else { "none" },
        test: base[0],
        train: base[1],
    }];
    tracing::info!("baseline test error {:.4}", base[0].error);

    // Group by group, every BatchNorm setting at once (so that a variant repeated across settings
    // is computed once, and a draw made once); the rows come setting by setting. The robust set and
    // the growth curve follow from the single units' rows, so they come after them, one BatchNorm
    // setting at a time (each setting has its own robust units).
    let known = reset::groups(&arch, &sets, &exp.reset.modes)?;
    let all_settings: Vec<usize> = (0..bn_settings.len()).collect();
    let mut rows_by_setting: Vec<Vec<ResultRow>> = vec![Vec::new(); bn_settings.len()];
    let finds_robust = exp.reset.finds_robust_set();
    let grows = exp.reset.modes.contains(&ResetMode::Growth);
    let followers = usize::from(finds_robust) + if grows { arch.units.len() } else { 0 };
    let bar = progress::bar(((known.len() + followers) * bn_settings.len()) as u64, "reset-eval");
    let mut evaluator = GroupEvaluator {
        exp,
        seed,
        dev: &dev,
        trained,
        checkpoints: &checkpoints,
        bn_settings: &bn_settings,
        grid: &mut grid,
        bar: &bar,
    };
    for group in &known {
        evaluator.evaluate(group, &all_settings, &mut rows_by_setting)?;
    }
    if finds_robust || grows {
        for (setting, &bn) in bn_settings.iter().enumerate() {
            // Each unit's own test error when re-initialized to τ = 0 under this setting.
            let own_error: BTreeMap<usize, f64> = rows_by_setting[setting]
                .iter()
                .filter(|r| r.mode == RowMode::Reset(ResetMode::Reinit) && r.source_epoch == Some(0))
                .filter_map(|r| Some((r.unit_index? as usize, r.test.error)))
                .collect();
            if own_error.is_empty() {
                tracing::warn!(
                    "no re-initialization to epoch 0 (train.checkpoints leaves out 0): no robust set, no growth curve"
                );
                break;
            }
            let mut followers = Vec::new();
            if finds_robust {
                match reset::robust_set(&arch, &own_error, base[0].error, exp.aggregate.tolerance) {
                    Some(set) => followers.push(set),
                    None => tracing::info!("{}: no unit is robust alone", reset::bn_label(bn)),
                }
            }
            if grows {
                followers.extend(reset::growth(&arch, &own_error));
            }
            for group in &followers {
                evaluator.evaluate(group, &[setting], &mut rows_by_setting)?;
            }
        }
    }
    rows.extend(rows_by_setting.into_iter().flatten());
    bar.finish_and_clear();
    Stamp::remove(&out_dir)?;
    write_results(&out_dir.join("results.parquet"), &rows, exp, &arch, seed, &key, &device_name)?;
    let seconds = t0.elapsed().as_secs_f64();
    Stamp::write_on(&out_dir, &key, seconds, Some(&device_name))?;
    Ok(Outcome::Written { rows: rows.len(), reused: grid.reused, seconds })
}

/// Evaluates groups of variants into rows, drawing each re-randomization once per group.
struct GroupEvaluator<'a, 'g> {
    exp: &'a Experiment,
    seed: u64,
    dev: &'a candle_core::Device,
    trained: &'a State,
    checkpoints: &'a BTreeMap<u32, State>,
    bn_settings: &'a [Option<BnStats>],
    grid: &'a mut reset::GridEvaluator<'g>,
    bar: &'a indicatif::ProgressBar,
}

impl GroupEvaluator<'_, '_> {
    /// `group`'s variants under the BatchNorm settings at `settings` (indices into
    /// `bn_settings`), their rows appended to each setting's rows.
    fn evaluate(
        &mut self,
        group: &reset::Group<'_>,
        settings: &[usize],
        rows_by_setting: &mut [Vec<ResultRow>],
    ) -> Result<()> {
        let (exp, seed, dev) = (self.exp, self.seed, self.dev);
        let name = &group.name;
        let mut drawn: BTreeMap<(usize, u32), State> = BTreeMap::new();
        let mut variants_by_setting = Vec::with_capacity(settings.len());
        let mut labels = Vec::with_capacity(settings.len());
        for &setting in settings {
            let bn = self.bn_settings[setting];
            let (variants, setting_labels) =
                reset::variants(group, bn, self.trained, self.checkpoints, &exp.reset, |unit, draw| {
                    if let Some(state) = drawn.get(&(unit.index, draw)) {
                        return Ok(state.clone());
                    }
                    let state = unit.draw(random::rerandomize_seed(&exp.name, seed, &unit.name, draw), dev)?;
                    drawn.insert((unit.index, draw), state.clone());
                    Ok(state)
                })?;
            variants_by_setting.push((bn, variants));
            labels.push(setting_labels);
        }
        let reused_before = self.grid.reused;
        let metrics = self
            .grid
            .evaluate(group, variants_by_setting)
            .map_err(|e| name_memory_settings(exp, self.bn_settings, e))
            .with_context(|| format!("evaluating resets of {name}"))?;
        let unit_names = group.units.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(",");
        let mut evaluations = 0;
        for (&setting, (labels, metrics)) in settings.iter().zip(labels.into_iter().zip(metrics)) {
            evaluations += labels.len();
            for (VariantLabel { mode, source_epoch, draw }, m) in labels.into_iter().zip(metrics) {
                rows_by_setting[setting].push(ResultRow {
                    mode: RowMode::Reset(mode),
                    unit: Some(name.clone()),
                    unit_index: group.single().map(|u| u.index as i64),
                    units: unit_names.clone(),
                    source_epoch,
                    draw,
                    bn_stats: reset::bn_label(self.bn_settings[setting]),
                    test: m[0],
                    train: m[1],
                });
            }
        }
        self.bar.inc(settings.len() as u64);
        if !progress::interactive() {
            let reused = self.grid.reused - reused_before;
            tracing::info!("{name}: {evaluations} evaluations, {reused} of them repeats of another");
        }
        Ok(())
    }
}

/// What sizes the grid's memory on a GPU, said when it runs out: the evaluation batches and, when
/// recalibrating, the calibration batches' prefixes (all kept at once).
fn name_memory_settings(exp: &Experiment, bn_settings: &[Option<BnStats>], e: anyhow::Error) -> anyhow::Error {
    let mut memory_settings = vec![("train.eval_batch_size", exp.train.eval_batch_size)];
    if bn_settings.contains(&Some(BnStats::Recalibrate)) {
        memory_settings.push(("reset.recalibrate_batches", exp.reset.recalibrate_batches));
        memory_settings.push(("train.batch_size", exp.train.batch_size));
    }
    device::name_memory_settings(e, &memory_settings)
}

/// Writes `results.parquet`.
pub fn write_results(
    path: &std::path::Path,
    rows: &[ResultRow],
    exp: &Experiment,
    arch: &Architecture,
    seed: u64,
    key: &layerlab_pipeline::StageKey,
    device: &str,
) -> Result<()> {
    let n = rows.len();
    let text = |f: &dyn Fn(&ResultRow) -> Option<String>| Column::Text(rows.iter().map(f).collect());
    let int = |f: &dyn Fn(&ResultRow) -> Option<i64>| Column::Int(rows.iter().map(f).collect());
    let float = |f: &dyn Fn(&ResultRow) -> f64| Column::Float(rows.iter().map(|r| Some(f(r))).collect());
    let mut meta = with_device(provenance(&exp.name, &key.config.to_string(), &key.config_hash()), device);
    meta.push(("architecture".into(), arch.name.clone()));
    Table::new()
        .col("experiment", Column::Text(vec![Some(exp.name.clone()); n]))
        .col("dataset", Column::Text(vec![Some(exp.dataset.name().to_string()); n]))
        .col("arch", Column::Text(vec![Some(arch.name.clone()); n]))
        .col("seed", Column::Int(vec![Some(seed as i64); n]))
        .col("mode", text(&|r| Some(r.mode.name().to_string())))
        .nullable("unit", text(&|r| r.unit.clone()))
        .nullable("unit_index", int(&|r| r.unit_index))
        .col("units", text(&|r| Some(r.units.clone())))
        .nullable("source_epoch", int(&|r| r.source_epoch))
        .nullable("draw", int(&|r| r.draw))
        .col("bn_stats", text(&|r| Some(r.bn_stats.to_string())))
        .col("test_error", float(&|r| r.test.error))
        .col("test_loss", float(&|r| r.test.loss))
        .col("train_error", float(&|r| r.train.error))
        .col("train_loss", float(&|r| r.train.loss))
        .write(path, &meta)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs the stage and says in one line what it did.
pub fn describe(ctx: &StageContext, seed: u64) -> Result<String> {
    let name = &ctx.experiment.name;
    Ok(match run(ctx, seed)? {
        Outcome::UpToDate => format!("reset-eval {name} seed {seed}: up to date"),
        Outcome::Written { rows, reused, seconds } => {
            format!("reset-eval {name} seed {seed}: {rows} evaluations in {seconds:.1} s ({reused} of them repeats, computed once)")
        }
    })
}
