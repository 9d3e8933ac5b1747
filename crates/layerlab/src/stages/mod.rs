//! One module per stage binary: each combines the library's parts and honours the stage cache.

pub mod aggregate;
pub mod aggregate_sweep;
pub mod cli;
pub mod fetch_data;
pub mod reset_eval;
pub mod snapshot;
pub mod train;

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::device::DeviceChoice;
use layerlab_pipeline::cache::{self, Freshness, Stage, StageKey};
use layerlab_pipeline::{Experiment, Layout, Pipeline};

/// What every per-experiment stage is given: the pipeline, one experiment, and where things go.
pub struct StageContext {
    pub pipeline: Pipeline,
    pub layout: Layout,
    pub experiment: Experiment,
    pub force: bool,
    /// `--device` of the stages that compute (train, snapshot, reset-eval).
    pub device: DeviceChoice,
}

impl StageContext {
    /// Loads the pipeline file and picks the experiment; `data_dir` overrides the file's.
    pub fn load(
        config: &std::path::Path,
        experiment: &str,
        data_dir: Option<PathBuf>,
        force: bool,
    ) -> Result<StageContext> {
        let (pipeline, layout) = load_pipeline(config, data_dir)?;
        let experiment = pipeline.experiment(experiment)?.clone();
        Ok(StageContext { pipeline, layout, experiment, force, device: DeviceChoice::Auto })
    }

    /// The stage's key and output folder, and whether the work is already done.
    pub fn plan(&self, stage: Stage, seed: u64) -> (StageKey, PathBuf, bool) {
        let key = cache::key_for(stage, &self.experiment, seed);
        let dir = cache::output_dir(&self.layout, stage, &self.experiment, seed);
        let fresh = !self.force && cache::check(&self.layout, stage, &self.experiment, seed) == Freshness::Fresh;
        (key, dir, fresh)
    }

    /// The experiment's network for the images of `split` (the one place a stage builds it).
    pub fn architecture(&self, split: &crate::data::Split) -> Result<crate::model::Architecture> {
        let exp = &self.experiment;
        let input = [split.channels, split.height, split.width];
        crate::model::Architecture::build(&exp.model, input, exp.dataset.classes()).with_context(|| {
            format!("experiment '{}': cannot build the model for {} inputs {input:?}", exp.name, exp.dataset)
        })
    }

    /// Refuses a seed the experiment does not list.
    pub fn check_seed(&self, seed: u64) -> Result<()> {
        if !self.experiment.seeds.contains(&seed) {
            anyhow::bail!(
                "experiment '{}' does not list seed {seed} (seeds: {:?}) in {}",
                self.experiment.name,
                self.experiment.seeds,
                self.pipeline.path.display()
            );
        }
        Ok(())
    }
}

/// Loads the pipeline file and its layout; `data_dir` overrides the file's (and the datasets'
/// folder with it, unless the file names that one itself).
pub fn load_pipeline(config: &std::path::Path, data_dir: Option<PathBuf>) -> Result<(Pipeline, Layout)> {
    let pipeline = Pipeline::load(config)?;
    let mut layout = Layout::from_pipeline(&pipeline);
    if let Some(d) = data_dir {
        if layout.datasets_dir == layout.data_dir.join("datasets") {
            layout.datasets_dir = d.join("datasets");
        }
        layout.data_dir = d;
    }
    Ok((pipeline, layout))
}

impl StageContext {
    /// The device `--device` resolves to, and its description for stamps and tables; the
    /// experiment's `train.tf32` applied to it (and said in the description when it acts).
    pub fn compute_device(&self) -> Result<(candle_core::Device, String)> {
        let (device, mut description) = crate::device::select(self.device)?;
        let tf32 = self.experiment.train.tf32;
        crate::device::allow_tf32(tf32);
        if tf32 && device.is_cuda() {
            description.push_str(", TF32 allowed");
        } else if tf32 {
            tracing::warn!("train.tf32 = true has no effect on the CPU: it computes in f32");
        }
        tracing::info!("computing on {description} (--device {})", self.device);
        Ok((device, description))
    }
}
