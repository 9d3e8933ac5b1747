//! Which stage runs for which experiment and seed, in dependency order, and whether it is fresh.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use layerlab_pipeline::cache::{self, Freshness, Stage};
use layerlab_pipeline::config::Sweep;
use layerlab_pipeline::{DataSource, Experiment, Layout, Pipeline};
use xshell::Shell;

use crate::flags::PipelineArgs;

/// One invocation of a stage binary.
#[derive(Debug, Clone)]
pub struct Job {
    pub stage: Stage,
    pub subject: Subject,
}

/// What a job works on.
#[derive(Debug, Clone)]
pub enum Subject {
    /// fetch-data: one dataset.
    Dataset(DataSource),
    /// train, snapshot, reset-eval: one seed of an experiment.
    Seed(Experiment, u64),
    /// aggregate: one experiment over its seeds.
    Experiment(Experiment),
    /// aggregate --sweep: a sweep over its points.
    Sweep(Sweep, Vec<Experiment>),
}

impl Job {
    pub fn label(&self) -> String {
        let stage = self.stage.name();
        match &self.subject {
            Subject::Dataset(dataset) => format!("{stage} {dataset}"),
            Subject::Seed(exp, seed) => format!("{stage} {} seed {seed}", exp.name),
            Subject::Experiment(exp) => format!("{stage} {}", exp.name),
            Subject::Sweep(sweep, _) => format!("{stage} sweep {}", sweep.name),
        }
    }

    /// The (experiment, seed) of a per-seed stage.
    pub fn chain(&self) -> Option<(&str, u64)> {
        match &self.subject {
            Subject::Seed(exp, seed) => Some((&exp.name, *seed)),
            _ => None,
        }
    }

    pub fn freshness(&self, layout: &Layout) -> Freshness {
        match &self.subject {
            Subject::Dataset(dataset) => cache::freshness(&layout.dataset_dir(dataset), &cache::dataset_key(dataset)),
            Subject::Seed(exp, seed) => cache::check(layout, self.stage, exp, *seed),
            Subject::Experiment(exp) => cache::check(layout, self.stage, exp, 0),
            Subject::Sweep(sweep, points) => cache::check_sweep(layout, sweep, &points.iter().collect::<Vec<_>>()),
        }
    }

    /// Why the job must run, or `None` when it is fresh (`force` reruns every stage but fetch-data).
    pub fn reason(&self, layout: &Layout, force: bool) -> Option<String> {
        match self.freshness(layout) {
            Freshness::Fresh if force && self.stage != Stage::FetchData => Some("forced".into()),
            Freshness::Fresh => None,
            Freshness::Missing => Some("missing".to_string()),
            Freshness::Stale(reason) => Some(format!("stale: {reason}")),
        }
    }

    /// The key the job's stamp will carry.
    pub fn key(&self) -> String {
        match &self.subject {
            Subject::Dataset(dataset) => cache::dataset_key(dataset).key,
            Subject::Seed(exp, seed) => cache::key_for(self.stage, exp, *seed).key,
            Subject::Experiment(exp) => cache::key_for(self.stage, exp, 0).key,
            Subject::Sweep(sweep, points) => cache::sweep_key(sweep, &points.iter().collect::<Vec<_>>()).key,
        }
    }

    pub fn output_dir(&self, layout: &Layout) -> PathBuf {
        match &self.subject {
            Subject::Dataset(dataset) => layout.dataset_dir(dataset),
            Subject::Seed(exp, seed) => cache::output_dir(layout, self.stage, exp, *seed),
            Subject::Experiment(exp) => cache::output_dir(layout, self.stage, exp, 0),
            Subject::Sweep(sweep, _) => layout.results_dir(&sweep.name),
        }
    }

    /// The program and arguments of this job's stage binary.
    /// `device` is passed on as `--device` to the stages that compute.
    pub fn argv(&self, bins: &Path, config: &Path, layout: &Layout, device: Option<&str>) -> Vec<String> {
        let bin = bins.join(self.stage.name()).display().to_string();
        let config = config.display().to_string();
        let mut argv = vec![bin];
        match &self.subject {
            Subject::Dataset(dataset) => {
                argv.extend([
                    dataset.name().to_string(),
                    "--datasets-dir".into(),
                    layout.datasets_dir.display().to_string(),
                ]);
                // An own dataset is declared in the pipeline file.
                if let DataSource::Own(_) = dataset {
                    argv.extend(["--config".into(), config]);
                }
            }
            Subject::Seed(exp, seed) => {
                argv.extend(["--config".into(), config, "--experiment".into(), exp.name.clone()]);
                argv.extend(["--seed".into(), seed.to_string()]);
                if let Some(device) = device {
                    argv.extend(["--device".into(), device.to_string()]);
                }
            }
            Subject::Experiment(exp) => {
                argv.extend(["--config".into(), config, "--experiment".into(), exp.name.clone()])
            }
            Subject::Sweep(sweep, _) => argv.extend(["--config".into(), config, "--sweep".into(), sweep.name.clone()]),
        }
        argv
    }

    /// Whether `self` reads the output of `other` directly.
    pub fn depends_on(&self, other: &Job) -> bool {
        match (&self.subject, &other.subject) {
            (Subject::Seed(exp, _) | Subject::Experiment(exp), Subject::Dataset(dataset)) => exp.dataset == *dataset,
            (Subject::Seed(a, s), Subject::Seed(b, t)) => {
                a.name == b.name
                    && s == t
                    && matches!((self.stage, other.stage), (Stage::Snapshot | Stage::ResetEval, Stage::Train))
            }
            (Subject::Experiment(a), Subject::Seed(b, _)) => {
                a.name == b.name && matches!(other.stage, Stage::Snapshot | Stage::ResetEval)
            }
            (Subject::Sweep(_, points), Subject::Experiment(b)) => points.iter().any(|p| p.name == b.name),
            _ => false,
        }
    }
}

/// What the command line chose: experiments (a sweep's points among them) and sweeps.
pub struct Selection {
    pub pipeline: Pipeline,
    pub experiments: Vec<Experiment>,
    pub sweeps: Vec<Sweep>,
    /// The pipeline file, absolute.
    pub config: PathBuf,
}

/// The pipeline file and the experiments and sweeps chosen on the command line (`-e` names
/// either; none: the file's `default_experiments`; `all`: everything in the file).
pub fn load(args: &PipelineArgs, sh: &Shell, all: bool) -> Result<Selection> {
    let config = sh.current_dir().join(&args.config);
    let pipeline = Pipeline::load(&config)?;
    let names: Vec<String> = if !args.experiments.is_empty() {
        args.experiments.clone()
    } else if all {
        let mut names: Vec<String> =
            pipeline.experiments.iter().filter(|e| e.sweep.is_none()).map(|e| e.name.clone()).collect();
        names.extend(pipeline.sweeps.iter().map(|s| s.name.clone()));
        names
    } else {
        pipeline.default_experiments.clone()
    };
    let mut experiments: Vec<Experiment> = Vec::new();
    let mut sweeps = Vec::new();
    for name in &names {
        for exp in pipeline.select(name)? {
            if !experiments.iter().any(|e| e.name == exp.name) {
                experiments.push(exp.clone());
            }
        }
        if let Ok(sweep) = pipeline.sweep(name) {
            sweeps.push(sweep.clone());
        }
    }
    Ok(Selection { pipeline, experiments, sweeps, config })
}

/// Every job of the selection, in dependency order; `only` keeps one stage.
pub fn jobs(selection: &Selection, only: Option<Stage>, seed: Option<u64>) -> Result<Vec<Job>> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut push = |stage: Stage, subject: Subject| {
        if only.is_none_or(|o| o == stage) {
            jobs.push(Job { stage, subject });
        }
    };
    let mut datasets: Vec<&DataSource> = Vec::new();
    for exp in &selection.experiments {
        if !datasets.contains(&&exp.dataset) {
            datasets.push(&exp.dataset);
            push(Stage::FetchData, Subject::Dataset(exp.dataset.clone()));
        }
    }
    for exp in &selection.experiments {
        if let Some(s) = seed {
            if !exp.seeds.contains(&s) {
                bail!("experiment '{}' has no seed {s} (seeds: {:?})", exp.name, exp.seeds);
            }
        }
        for &s in exp.seeds.iter().filter(|s| seed.is_none_or(|x| x == **s)) {
            push(Stage::Train, Subject::Seed(exp.clone(), s));
            push(Stage::Snapshot, Subject::Seed(exp.clone(), s));
            push(Stage::ResetEval, Subject::Seed(exp.clone(), s));
        }
        push(Stage::Aggregate, Subject::Experiment(exp.clone()));
    }
    for sweep in &selection.sweeps {
        let points =
            sweep.points.iter().map(|p| selection.pipeline.experiment(p).cloned()).collect::<Result<Vec<_>>>()?;
        push(Stage::Aggregate, Subject::Sweep(sweep.clone(), points));
    }
    Ok(jobs)
}
