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

    /// The experiment's dataset as training sees it for `seed`: the training split with
    /// `train.label_noise` applied (the labels the network is trained on, and on which reset-eval
    /// measures its train error), and the test split as it is.
    pub fn datasets(&self, seed: u64) -> Result<(crate::data::Split, crate::data::Split)> {
        let exp = &self.experiment;
        let (mut train, test) = crate::data::load(&self.layout.dataset_dir(&exp.dataset))
            .with_context(|| format!("dataset '{}'", exp.dataset))?;
        let noise = exp.train.label_noise;
        if noise > 0.0 {
            let mut rng = crate::random::label_noise_rng(seed);
            let changed = train.with_label_noise(noise, exp.dataset.classes(), &mut rng);
            tracing::info!(
                "train.label_noise = {noise}: {changed} of {} training labels replaced by random classes (seed {seed})",
                train.len()
            );
        }
        Ok((train, test))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{self, Split};
    use crate::test_support::random_split;

    /// The stages read the training labels through `StageContext::datasets`: with
    /// `train.label_noise` they are the noisy labels of the seed (the same on every call, another
    /// set for another seed), and the test split is never touched.
    #[test]
    fn the_stages_see_the_seeds_noisy_training_labels_and_clean_test_labels() {
        let dir = tempfile::tempdir().unwrap();
        let dataset = dir.path().join("datasets/mnist");
        std::fs::create_dir_all(&dataset).unwrap();
        let (train, test) = (random_split(500, [1, 2, 2], 1), random_split(100, [1, 2, 2], 2));
        data::write_split(&data::split_path(&dataset, "train"), &train, "mnist", "test").unwrap();
        data::write_split(&data::split_path(&dataset, "test"), &test, "mnist", "test").unwrap();
        std::fs::write(data::manifest_path(&dataset), "{}").unwrap();
        let context = |noise: f64| {
            let config = dir.path().join(format!("pipeline-{noise}.toml"));
            let text = format!(
                "data_dir = \"data\"\ndatasets_dir = \"datasets\"\n[[experiment]]\nname = \"e\"\ndataset = \"mnist\"\n\
                 seeds = [0, 1]\n[experiment.train]\nlabel_noise = {noise:?}\n"
            );
            std::fs::write(&config, text).unwrap();
            StageContext::load(&config, "e", None, false).unwrap()
        };
        let labels = |ctx: &StageContext, seed: u64| -> (Split, Split) { ctx.datasets(seed).unwrap() };
        let (clean_train, clean_test) = labels(&context(0.0), 0);
        assert_eq!((&clean_train, &clean_test), (&train, &test));
        let noisy = context(1.0);
        let (noisy_train, noisy_test) = labels(&noisy, 0);
        assert_eq!(noisy_test, test);
        assert_eq!(noisy_train.images, train.images);
        let changed = noisy_train.labels.iter().zip(&train.labels).filter(|(a, b)| a != b).count();
        assert!(changed > 400, "{changed} of 500 labels changed at label_noise = 1");
        assert_eq!(labels(&noisy, 0).0, noisy_train, "the same seed gives the same labels");
        assert_ne!(labels(&noisy, 1).0.labels, noisy_train.labels, "another seed gives other labels");
    }
}
