//! Which stage runs for which experiment and seed, in dependency order, and whether it is fresh.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use layerlab_pipeline::cache::{self, Freshness, Stage};
use layerlab_pipeline::{Experiment, Layout, Pipeline};
use xshell::{cmd, Shell};

use crate::flags::PipelineArgs;

/// One invocation of a stage binary.
#[derive(Debug, Clone)]
pub struct Job {
    pub stage: Stage,
    pub experiment: Experiment,
    /// The seed, for per-seed stages.
    pub seed: Option<u64>,
}

impl Job {
    pub fn label(&self) -> String {
        match (self.stage, self.seed) {
            (Stage::FetchData, _) => format!("fetch-data {}", self.experiment.dataset),
            (s, Some(seed)) => format!("{} {} seed {seed}", s.name(), self.experiment.name),
            (s, None) => format!("{} {}", s.name(), self.experiment.name),
        }
    }

    pub fn freshness(&self, layout: &Layout) -> Freshness {
        cache::check(layout, self.stage, &self.experiment, self.seed.unwrap_or(0))
    }

    pub fn output_dir(&self, layout: &Layout) -> PathBuf {
        cache::output_dir(layout, self.stage, &self.experiment, self.seed.unwrap_or(0))
    }

    /// The command line of this job's stage binary.
    pub fn command<'a>(&self, sh: &'a Shell, bins: &Path, config: &Path, layout: &Layout) -> xshell::Cmd<'a> {
        let bin = bins.join(self.stage.name());
        let name = &self.experiment.name;
        match (self.stage, self.seed) {
            (Stage::FetchData, _) => {
                let dataset = &self.experiment.dataset;
                let datasets = &layout.datasets_dir;
                cmd!(sh, "{bin} {dataset} --datasets-dir {datasets}")
            }
            (_, Some(seed)) => {
                let seed = seed.to_string();
                cmd!(sh, "{bin} --config {config} --experiment {name} --seed {seed}")
            }
            (_, None) => cmd!(sh, "{bin} --config {config} --experiment {name}"),
        }
    }

    /// Whether `self` reads the output of `other` directly.
    pub fn depends_on(&self, other: &Job) -> bool {
        if other.stage == Stage::FetchData {
            return self.stage != Stage::FetchData && self.experiment.dataset == other.experiment.dataset;
        }
        if self.experiment.name != other.experiment.name {
            return false;
        }
        match (self.stage, other.stage) {
            (Stage::Snapshot | Stage::ResetEval, Stage::Train) => self.seed == other.seed,
            (Stage::Aggregate, Stage::Snapshot | Stage::ResetEval) => true,
            _ => false,
        }
    }
}

/// The pipeline file and the experiments chosen on the command line.
pub fn load(args: &PipelineArgs, sh: &Shell) -> Result<(Pipeline, Vec<Experiment>, PathBuf)> {
    let config = sh.current_dir().join(&args.config);
    let pipeline = Pipeline::load(&config)?;
    let names =
        if args.experiments.is_empty() { pipeline.default_experiments.clone() } else { args.experiments.clone() };
    let experiments = names.iter().map(|n| pipeline.experiment(n).cloned()).collect::<Result<Vec<_>>>()?;
    Ok((pipeline, experiments, config))
}

/// Every job of the chosen experiments, in dependency order; `only` keeps one stage.
pub fn jobs(experiments: &[Experiment], only: Option<Stage>, seed: Option<u64>) -> Result<Vec<Job>> {
    let mut jobs: Vec<Job> = Vec::new();
    for exp in experiments {
        if let Some(s) = seed {
            if !exp.seeds.contains(&s) {
                bail!("experiment '{}' has no seed {s} (seeds: {:?})", exp.name, exp.seeds);
            }
        }
        let seeds: Vec<u64> = exp.seeds.iter().copied().filter(|s| seed.is_none_or(|x| x == *s)).collect();
        let mut push = |stage: Stage, seed: Option<u64>| {
            if only.is_none_or(|o| o == stage) {
                jobs.push(Job { stage, experiment: exp.clone(), seed });
            }
        };
        push(Stage::FetchData, None);
        for &s in &seeds {
            push(Stage::Train, Some(s));
            push(Stage::Snapshot, Some(s));
            push(Stage::ResetEval, Some(s));
        }
        push(Stage::Aggregate, None);
    }
    // One fetch per dataset.
    let mut seen = Vec::new();
    jobs.retain(|j| {
        j.stage != Stage::FetchData || {
            let new = !seen.contains(&j.experiment.dataset);
            seen.push(j.experiment.dataset.clone());
            new
        }
    });
    Ok(jobs)
}

/// Builds the stage binaries once and returns the folder that holds them.
pub fn build_binaries(sh: &Shell, dev: bool) -> Result<PathBuf> {
    let profile: &[&str] = if dev { &[] } else { &["--release"] };
    cmd!(sh, "cargo build --quiet {profile...} -p fetch-data -p train -p snapshot -p reset-eval -p aggregate").run()?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| sh.current_dir().join("target"));
    Ok(target.join(if dev { "debug" } else { "release" }))
}
