//! The `reset-eval` stage: a trained run → `reset/results.parquet`, one row per evaluation of a
//! reset network (baseline, re-initialization to each kept epoch, re-randomization draws, joint
//! resets), each on the whole test set and on a fixed, seeded training subset. The grid keeps a
//! resume point (`resume.json`) after every group of variants, so a killed grid continues where it
//! stopped and ends with the rows of an unbroken one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
    /// `reused`: rows that repeat another variant's network, given its metrics (not computed);
    /// `resumed`: groups whose metrics came from the resume point of a killed run.
    Written {
        rows: usize,
        reused: usize,
        resumed: usize,
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
    let mut progress = GridProgress::load(&out_dir, &key.key)?;
    // From here on a resume point is written beside the old results: they must not look done, so
    // that a run killed from here on is continued by the next one.
    Stamp::remove(&out_dir)?;
    if progress.resumable() > 0 {
        tracing::info!(
            "resuming reset-eval {} seed {seed}: {} groups already evaluated ({})",
            exp.name,
            progress.resumable(),
            progress.path.display()
        );
    }

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
    // Groups, as the resume point counts them: each known group once, each follower per setting.
    let groups_total = known.len() + followers * bn_settings.len();
    let mut evaluator = GroupEvaluator {
        exp,
        seed,
        dev: &dev,
        trained,
        checkpoints: &checkpoints,
        bn_settings: &bn_settings,
        grid: &mut grid,
        progress: &mut progress,
        bar: &bar,
        groups_total,
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
                    None => {
                        tracing::info!("{}: no unit is robust alone", reset::bn_label(bn));
                        evaluator.groups_total -= 1;
                    }
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
    write_results(&out_dir.join("results.parquet"), &rows, exp, &arch, seed, &key, &device_name)?;
    let resumed = progress.replayed;
    progress.finish()?;
    let seconds = t0.elapsed().as_secs_f64();
    Stamp::write_on(&out_dir, &key, seconds, Some(&device_name))?;
    Ok(Outcome::Written { rows: rows.len(), reused: grid.reused, resumed, seconds })
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
    progress: &'a mut GridProgress,
    bar: &'a indicatif::ProgressBar,
    /// How many groups the grid has, for the log: a grid can run for hours.
    groups_total: usize,
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
        let started = std::time::Instant::now();
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
        let replayed = self.progress.replay(name, settings);
        let was_replayed = replayed.is_some();
        let metrics = match replayed {
            Some(metrics) => {
                let counts = |m: &[Vec<Vec<Metrics>>]| m.iter().map(Vec::len).collect::<Vec<_>>();
                if counts(&metrics) != labels.iter().map(Vec::len).collect::<Vec<_>>() {
                    anyhow::bail!(
                        "resume file {} holds {:?} rows of {name}, this grid {:?}: it is damaged; delete it to \
                         evaluate the grid from the start",
                        self.progress.path.display(),
                        counts(&metrics),
                        labels.iter().map(Vec::len).collect::<Vec<_>>()
                    );
                }
                metrics
            }
            None => {
                let metrics = self
                    .grid
                    .evaluate(group, variants_by_setting)
                    .map_err(|e| name_memory_settings(exp, self.bn_settings, e))
                    .with_context(|| format!("evaluating resets of {name}"))?;
                self.progress.record(name, settings, &metrics)?;
                metrics
            }
        };
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
            let (done, total) = (self.progress.groups_done(), self.groups_total);
            if was_replayed {
                tracing::info!("{name}: {evaluations} results taken from the resume point (group {done} of {total})");
            } else {
                let reused = self.grid.reused - reused_before;
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(
                    "{name}: {evaluations} evaluations, {reused} of them repeats of another, in {seconds:.1} s \
                     (group {done} of {total})"
                );
            }
        }
        Ok(())
    }
}

/// The grid's resume point: the metrics of every group evaluated so far, in the order the grid
/// evaluates them, rewritten (atomically) after each group. A rerun with the same stage key replays
/// them instead of evaluating again; they are the bits the evaluation gave (serde_json writes the
/// shortest decimal that reads back as the same f64 and reads it back exactly with its
/// `float_roundtrip` feature), so the rows equal an unbroken run's. Re-randomizations are drawn
/// from seeds of (unit, draw) alone, so the groups after the resume point draw what an unbroken
/// run draws.
pub struct GridProgress {
    pub path: PathBuf,
    file: ResumeFile,
    /// Where the grid stands in `file.groups`: the groups before it are this run's.
    next: usize,
    /// How many of `file.groups` may be replayed: up to the first that differs from the grid.
    replayable: usize,
    /// Groups taken from the file rather than evaluated.
    pub replayed: usize,
}

pub const RESUME_FILE: &str = "resume.json";
const RESUME_FORMAT: &str = "layerlab-reset-resume-1";

#[derive(serde::Serialize, serde::Deserialize)]
pub struct ResumeFile {
    pub format: String,
    /// The stage key it was written under: a file of another key is not ours to continue.
    pub key: String,
    pub groups: Vec<EvaluatedGroup>,
}

/// One group's metrics: per BatchNorm setting (indices into the experiment's `reset.bn_stats`),
/// per variant, one per evaluation set (test, train subset).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct EvaluatedGroup {
    pub group: String,
    pub settings: Vec<usize>,
    pub metrics: Vec<Vec<Vec<Metrics>>>,
}

impl ResumeFile {
    /// Reads a resume file, refusing one that is not whole.
    pub fn read(path: &Path) -> Result<ResumeFile> {
        let damaged =
            || format!("resume file {} is damaged; delete it to evaluate the grid from the start", path.display());
        let text = std::fs::read_to_string(path).with_context(damaged)?;
        let file: ResumeFile = serde_json::from_str(&text).with_context(damaged)?;
        anyhow::ensure!(file.format == RESUME_FORMAT, "{}: format {:?}, not {RESUME_FORMAT:?}", damaged(), file.format);
        Ok(file)
    }
}

impl GridProgress {
    /// The resume point in `dir` for the stage key `key`: its groups when it was written under
    /// that key, none otherwise.
    pub fn load(dir: &Path, key: &str) -> Result<GridProgress> {
        let path = dir.join(RESUME_FILE);
        let fresh = ResumeFile { format: RESUME_FORMAT.into(), key: key.into(), groups: Vec::new() };
        let file = match path.exists() {
            true => Some(ResumeFile::read(&path)?).filter(|f| f.key == key).unwrap_or(fresh),
            false => fresh,
        };
        let replayable = file.groups.len();
        Ok(GridProgress { path, file, next: 0, replayable, replayed: 0 })
    }

    /// Groups of this run so far, replayed or evaluated.
    pub fn groups_done(&self) -> usize {
        self.next
    }

    /// Groups the resume point holds for this grid.
    pub fn resumable(&self) -> usize {
        self.replayable
    }

    /// The metrics of the next group, if the resume point holds them: the group the grid asks for
    /// must be the one recorded at this place (with the same settings). From the first that is
    /// not, everything is evaluated again.
    fn replay(&mut self, group: &str, settings: &[usize]) -> Option<Vec<Vec<Vec<Metrics>>>> {
        if self.next < self.replayable {
            let recorded = &self.file.groups[self.next];
            if recorded.group == group && recorded.settings == settings {
                self.next += 1;
                self.replayed += 1;
                return Some(recorded.metrics.clone());
            }
            tracing::warn!(
                "{}: group {} is {:?}, this grid's is {group:?}: evaluating from there",
                self.path.display(),
                self.next,
                recorded.group
            );
            self.replayable = self.next;
        }
        None
    }

    /// Adds a group just evaluated and writes the resume point.
    fn record(&mut self, group: &str, settings: &[usize], metrics: &[Vec<Vec<Metrics>>]) -> Result<()> {
        self.file.groups.truncate(self.next);
        self.file.groups.push(EvaluatedGroup {
            group: group.to_string(),
            settings: settings.to_vec(),
            metrics: metrics.to_vec(),
        });
        self.next += 1;
        self.replayable = self.next;
        layerlab_pipeline::fsutil::write_atomic(&self.path, serde_json::to_string(&self.file)?.as_bytes())
    }

    /// Removes the resume point once the results are written.
    fn finish(self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.path.display())),
        }
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
        Outcome::Written { rows, reused, resumed, seconds } => {
            let resumed =
                if resumed > 0 { format!("; {resumed} groups taken from the resume point") } else { String::new() };
            format!(
                "reset-eval {name} seed {seed}: {rows} evaluations in {seconds:.1} s ({reused} of them repeats, computed once{resumed})"
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One group's metrics: one setting, one variant, test and train values that do not print
    /// short (so the round trip through JSON is tested on every bit).
    fn metrics(x: f64) -> Vec<Vec<Vec<Metrics>>> {
        let m = |y: f64| Metrics { loss: y.sqrt() / 3.0, error: y / 7.0, examples: 300 };
        vec![vec![vec![m(x), m(x + 0.1)]]]
    }

    #[test]
    fn a_resume_point_is_replayed_up_to_the_first_group_that_differs() {
        let dir = tempfile::tempdir().unwrap();
        let mut progress = GridProgress::load(dir.path(), "k").unwrap();
        assert_eq!(progress.resumable(), 0);
        assert_eq!(progress.replay("fc1", &[0, 1]), None);
        for (i, group) in ["fc1", "fc2", "fc3"].into_iter().enumerate() {
            progress.record(group, &[0, 1], &metrics(i as f64 + 0.3)).unwrap();
        }
        // Another stage key: nothing to continue.
        assert_eq!(GridProgress::load(dir.path(), "other").unwrap().resumable(), 0);

        let mut progress = GridProgress::load(dir.path(), "k").unwrap();
        assert_eq!(progress.resumable(), 3);
        assert_eq!(progress.replay("fc1", &[0, 1]), Some(metrics(0.3)), "not the bits recorded");
        // Other settings at the second place: from there, everything is evaluated again.
        assert_eq!(progress.replay("fc2", &[0]), None);
        assert_eq!(progress.replay("fc3", &[0, 1]), None);
        assert_eq!(progress.replayed, 1);
        progress.record("fc2", &[0], &metrics(5.0)).unwrap();
        assert_eq!(progress.replayed, 1);
        let file = ResumeFile::read(&dir.path().join(RESUME_FILE)).unwrap();
        let groups: Vec<_> = file.groups.iter().map(|g| (g.group.as_str(), g.settings.clone())).collect();
        assert_eq!(groups, [("fc1", vec![0, 1]), ("fc2", vec![0])]);
        assert_eq!(file.groups[1].metrics, metrics(5.0));
        progress.finish().unwrap();
        assert!(!dir.path().join(RESUME_FILE).exists());
    }

    #[test]
    fn a_damaged_resume_point_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESUME_FILE);
        for bytes in [
            &b"{\"format\": \"layerlab-reset-resume-1\", \"key\": "[..],
            b"{\"format\": \"x\", \"key\": \"k\", \"groups\": []}",
        ] {
            std::fs::write(&path, bytes).unwrap();
            let e = format!("{:#}", GridProgress::load(dir.path(), "k").err().unwrap());
            assert!(e.contains("resume.json") && e.contains("damaged"), "{e}");
        }
    }
}
