//! `status`, `clean` and `test`: small commands around the pipeline.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use layerlab_pipeline::cache::{Freshness, Stamp};
use layerlab_pipeline::lock::RunLock;
use layerlab_pipeline::Layout;
use xshell::{cmd, Shell};

use crate::flags;
use crate::plan;
use crate::slurm;

impl flags::Status {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let selection = plan::load(&self.pipeline, sh, self.all)?;
        let layout = Layout::from_pipeline(&selection.pipeline);
        for sweep in &selection.sweeps {
            let axes: Vec<String> = sweep
                .axes
                .iter()
                .map(|(k, v)| format!("{k} = [{}]", v.iter().map(|x| x.label()).collect::<Vec<_>>().join(", ")))
                .collect();
            println!("sweep {}: {} points over {}", sweep.name, sweep.points.len(), axes.join(" × "));
        }
        let jobs = plan::jobs(&selection, None, None)?;
        // Jobs submitted to Slurm, with what Slurm says of them now (only when there are any).
        let records = slurm::Records::load(&layout)?;
        let ids: Vec<u64> = jobs.iter().filter_map(|j| records.current(j)).map(|r| r.job_id).collect();
        let states = if ids.is_empty() {
            Default::default()
        } else {
            slurm::states(&ids).unwrap_or_else(|e| {
                println!("(cannot ask Slurm about our jobs: {e:#})");
                Default::default()
            })
        };
        let width = jobs.iter().map(|j| j.label().len()).max().unwrap_or(0);
        for job in &jobs {
            let mut state = match job.freshness(&layout) {
                Freshness::Fresh => {
                    let when = Stamp::read(&job.output_dir(&layout))
                        .map(|s| format!(" ({:.1} s)", s.seconds))
                        .unwrap_or_default();
                    format!("fresh{when}")
                }
                Freshness::Missing => "missing".to_string(),
                Freshness::Stale(why) => format!("stale: {why}"),
            };
            let mut tail = String::new();
            if let Some(record) = records.current(job) {
                if let Some(slurm_state) = states.get(&record.job_id) {
                    let _ = write!(state, "  [slurm job {}: {}]", record.job_id, slurm_state.describe());
                    if matches!(slurm_state, slurm::JobState::Failed(_)) {
                        tail = slurm::log_tail(&record.log, 5);
                    }
                }
            }
            println!("{:width$}  {state}{tail}", job.label());
        }
        Ok(())
    }
}

impl flags::Clean {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let selection = plan::load(&self.pipeline, sh, false)?;
        let layout = Layout::from_pipeline(&selection.pipeline);
        let _lock = RunLock::acquire(&layout.data_dir)?;
        slurm::refuse_if_active(&layout)?;
        let mut dirs = Vec::new();
        for exp in &selection.experiments {
            dirs.push(layout.experiment_runs_dir(&exp.name));
            dirs.push(layout.results_dir(&exp.name));
        }
        for sweep in &selection.sweeps {
            dirs.push(layout.results_dir(&sweep.name));
        }
        if self.datasets {
            for exp in &selection.experiments {
                dirs.push(layout.dataset_dir(exp.dataset));
            }
        }
        dirs.dedup();
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
        if self.gpu {
            // One test binary, built with CUDA; each test prints why it skips when no GPU is visible.
            // Where nvidia-smi lists a GPU, a test that cannot open it fails instead of skipping.
            let gpu_listed = cmd!(sh, "nvidia-smi -L").quiet().ignore_stderr().read().is_ok_and(|l| l.contains("GPU"));
            let mut test = cmd!(
                sh,
                "cargo test --release -p layerlab --features cuda --test gpu {args...} -- --nocapture --test-threads 1"
            );
            if gpu_listed {
                println!("nvidia-smi lists a GPU: a GPU test that cannot open it fails (LAYERLAB_GPU_REQUIRED)");
                test = test.env("LAYERLAB_GPU_REQUIRED", "1");
            }
            test.run()?;
            return Ok(());
        }
        cmd!(sh, "cargo test --workspace {args...}").run()?;
        Ok(())
    }
}
