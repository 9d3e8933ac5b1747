//! `run-all` and `run`: invoke the stage binaries in dependency order, skipping fresh work.

use std::time::Instant;

use anyhow::{Context, Result};
use layerlab_pipeline::cache::{Freshness, Stage};
use layerlab_pipeline::lock::RunLock;
use layerlab_pipeline::Layout;
use xshell::Shell;

use crate::flags;
use crate::plan::{self, Job};

impl flags::RunAll {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let (pipeline, experiments, config) = plan::load(&self.pipeline, sh)?;
        let jobs = plan::jobs(&experiments, None, None)?;
        let layout = Layout::from_pipeline(&pipeline);
        execute(sh, &jobs, &layout, &config, self.force, self.dry_run, self.pipeline.dev_build)?;
        for exp in &experiments {
            let report = layout.results_dir(&exp.name).join("report.md");
            if report.exists() && !self.dry_run {
                println!("report: {}", report.display());
            }
        }
        Ok(())
    }
}

impl flags::Run {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let stage = Stage::from_name(&self.stage).with_context(|| {
            let names: Vec<_> = Stage::ALL.iter().map(|s| s.name()).collect();
            format!("unknown stage '{}' (stages: {})", self.stage, names.join(", "))
        })?;
        let (pipeline, experiments, config) = plan::load(&self.pipeline, sh)?;
        let jobs = plan::jobs(&experiments, Some(stage), self.seed)?;
        let layout = Layout::from_pipeline(&pipeline);
        execute(sh, &jobs, &layout, &config, self.force, false, self.pipeline.dev_build)
    }
}

/// Runs every job that is not fresh. Freshness is checked just before each job, so a job whose
/// input was redone in this run sees it and runs too.
fn execute(
    sh: &Shell,
    jobs: &[Job],
    layout: &Layout,
    config: &std::path::Path,
    force: bool,
    dry_run: bool,
    dev: bool,
) -> Result<()> {
    let started = Instant::now();
    let _lock = if dry_run { None } else { Some(RunLock::acquire(&layout.data_dir)?) };
    let mut bins = None;
    let mut ran = 0;
    // In a dry run nothing changes on disk, so what would rerun is followed by hand.
    let mut would_run: Vec<&Job> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let mut why = match job.freshness(layout) {
            Freshness::Fresh => None,
            Freshness::Missing => Some("missing".to_string()),
            Freshness::Stale(reason) => Some(format!("stale: {reason}")),
        };
        if force && job.stage != Stage::FetchData && why.is_none() {
            why = Some("forced".into());
        }
        if dry_run && why.is_none() {
            if let Some(up) = would_run.iter().find(|u| job.depends_on(u)) {
                why = Some(format!("input {} would rerun", up.label()));
            }
        }
        let prefix = format!("[{}/{}] {}", i + 1, jobs.len(), job.label());
        let Some(why) = why else {
            println!("{prefix}: cached");
            continue;
        };
        if dry_run {
            println!("{prefix}: would run ({why})");
            would_run.push(job);
            continue;
        }
        println!("{prefix}: running ({why})");
        let bins = match &bins {
            Some(b) => b,
            None => bins.insert(plan::build_binaries(sh, dev)?),
        };
        let t0 = Instant::now();
        let mut cmd = job.command(sh, bins, config, layout);
        if force && job.stage != Stage::FetchData {
            cmd = cmd.arg("--force");
        }
        cmd.run().with_context(|| format!("{} failed; earlier results are kept", job.label()))?;
        println!("{prefix}: done in {:.1} s", t0.elapsed().as_secs_f64());
        ran += 1;
    }
    if ran == 0 && !dry_run {
        println!(
            "up to date: nothing to do ({} stages checked in {:.2} s)",
            jobs.len(),
            started.elapsed().as_secs_f64()
        );
    } else if !dry_run {
        println!("ran {ran} of {} stages in {:.1} s", jobs.len(), started.elapsed().as_secs_f64());
    }
    Ok(())
}
