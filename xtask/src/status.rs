//! `status`, `clean` and `test`: small commands around the pipeline.

use anyhow::{Context, Result};
use layerlab_pipeline::cache::{Freshness, Stamp};
use layerlab_pipeline::lock::RunLock;
use layerlab_pipeline::Layout;
use xshell::{cmd, Shell};

use crate::flags;
use crate::plan;

impl flags::Status {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let mut args = self.pipeline.clone();
        let (pipeline, _, _) = plan::load(&args, sh)?;
        if self.all && args.experiments.is_empty() {
            args.experiments = pipeline.experiments.iter().map(|e| e.name.clone()).collect();
        }
        let (pipeline, experiments, _) = plan::load(&args, sh)?;
        let layout = Layout::from_pipeline(&pipeline);
        let jobs = plan::jobs(&experiments, None, None)?;
        let width = jobs.iter().map(|j| j.label().len()).max().unwrap_or(0);
        for job in &jobs {
            let state = match job.freshness(&layout) {
                Freshness::Fresh => {
                    let when = Stamp::read(&job.output_dir(&layout))
                        .map(|s| format!(" ({:.1} s)", s.seconds))
                        .unwrap_or_default();
                    format!("fresh{when}")
                }
                Freshness::Missing => "missing".to_string(),
                Freshness::Stale(why) => format!("stale: {why}"),
            };
            println!("{:width$}  {state}", job.label());
        }
        Ok(())
    }
}

impl flags::Clean {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let (pipeline, experiments, _) = plan::load(&self.pipeline, sh)?;
        let layout = Layout::from_pipeline(&pipeline);
        let _lock = RunLock::acquire(&layout.data_dir)?;
        let mut dirs = Vec::new();
        for exp in &experiments {
            dirs.push(layout.experiment_runs_dir(&exp.name));
            dirs.push(layout.results_dir(&exp.name));
        }
        if self.datasets {
            for exp in &experiments {
                dirs.push(layout.dataset_dir(&exp.dataset));
            }
        }
        for dir in dirs {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
                println!("removed {}", dir.display());
            }
        }
        Ok(())
    }
}

impl flags::Test {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let args = &self.args;
        cmd!(sh, "cargo test --workspace {args...}").run()?;
        Ok(())
    }
}
