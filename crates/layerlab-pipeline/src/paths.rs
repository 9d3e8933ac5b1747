//! The data-folder layout: the only place artifact paths are built.

use std::path::{Path, PathBuf};

/// Where every artifact of a pipeline lives.
#[derive(Debug, Clone)]
pub struct Layout {
    pub data_dir: PathBuf,
    pub datasets_dir: PathBuf,
}

impl Layout {
    pub fn new(data_dir: impl Into<PathBuf>, datasets_dir: impl Into<PathBuf>) -> Layout {
        Layout { data_dir: data_dir.into(), datasets_dir: datasets_dir.into() }
    }

    pub fn from_pipeline(p: &crate::Pipeline) -> Layout {
        Layout::new(&p.data_dir, &p.datasets_dir)
    }

    pub fn dataset_dir(&self, dataset: &crate::DataSource) -> PathBuf {
        self.datasets_dir.join(dataset.name())
    }
    pub fn run_dir(&self, experiment: &str, seed: u64) -> PathBuf {
        self.data_dir.join("runs").join(experiment).join(format!("seed-{seed}"))
    }
    pub fn train_dir(&self, experiment: &str, seed: u64) -> PathBuf {
        self.run_dir(experiment, seed).join("train")
    }
    pub fn checkpoints_dir(&self, experiment: &str, seed: u64) -> PathBuf {
        self.train_dir(experiment, seed).join("checkpoints")
    }
    pub fn checkpoint(&self, experiment: &str, seed: u64, epoch: u32) -> PathBuf {
        checkpoint_in(&self.checkpoints_dir(experiment, seed), epoch)
    }
    pub fn snapshot_dir(&self, experiment: &str, seed: u64) -> PathBuf {
        self.run_dir(experiment, seed).join("snapshot")
    }
    pub fn reset_dir(&self, experiment: &str, seed: u64) -> PathBuf {
        self.run_dir(experiment, seed).join("reset")
    }
    pub fn results_root(&self) -> PathBuf {
        self.data_dir.join("results")
    }
    pub fn results_dir(&self, experiment: &str) -> PathBuf {
        self.results_root().join(experiment)
    }
    pub fn experiment_runs_dir(&self, experiment: &str) -> PathBuf {
        self.data_dir.join("runs").join(experiment)
    }
}

/// `epoch-0007.safetensors` inside `dir`.
pub fn checkpoint_in(dir: &Path, epoch: u32) -> PathBuf {
    dir.join(format!("epoch-{epoch:04}.safetensors"))
}
