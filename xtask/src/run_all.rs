//! `run-all` and `run`: invoke the stage binaries in dependency order, skipping fresh work.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use layerlab_pipeline::cache::Stage;
use layerlab_pipeline::lock::RunLock;
use layerlab_pipeline::{ExecutorKind, Layout};
use xshell::Shell;

use crate::bins;
use crate::flags;
use crate::plan::{self, Job, Subject};
use crate::slurm;

impl flags::RunAll {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let selection = plan::load(&self.pipeline, sh, false)?;
        let jobs = plan::jobs(&selection, None, None)?;
        let layout = Layout::from_pipeline(&selection.pipeline);
        let executor = self.executor.unwrap_or(selection.pipeline.executor.kind);
        if self.dry_run {
            return dry_run_report(&selection, &jobs, &layout, self.force);
        }
        let build = self.pipeline.build();
        match executor {
            ExecutorKind::Local => {
                if self.wait {
                    bail!("--wait belongs to --executor slurm: the local executor always waits");
                }
                execute(sh, &jobs, &layout, &selection.config, self.force, build, self.jobs, self.device.as_deref())?
            }
            ExecutorKind::Slurm => {
                let settings = &selection.pipeline.executor;
                let done = slurm::submit(
                    sh,
                    &jobs,
                    &layout,
                    &selection.config,
                    settings,
                    self.force,
                    build,
                    self.device.as_deref(),
                )?;
                if !self.wait || !done {
                    return Ok(());
                }
                slurm::wait(&jobs, &layout)?;
            }
        }
        // Sweep reports last: they are what a sweep is run for.
        let names = selection.experiments.iter().map(|e| &e.name).chain(selection.sweeps.iter().map(|s| &s.name));
        for name in names {
            let report = layout.results_dir(name).join("report.md");
            if report.exists() {
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
        let selection = plan::load(&self.pipeline, sh, false)?;
        let jobs = plan::jobs(&selection, Some(stage), self.seed)?;
        let layout = Layout::from_pipeline(&selection.pipeline);
        let device = self.device.as_deref();
        execute(sh, &jobs, &layout, &selection.config, self.force, self.pipeline.build(), self.jobs, device)
    }
}

/// Everything a job needs to run, shared by the workers.
struct Runner<'a> {
    layout: &'a Layout,
    force: bool,
    total: usize,
    ran: AtomicUsize,
}

impl Runner<'_> {
    /// Checks freshness just before running, so a job whose input was redone in this run sees it.
    /// With `threads`, the job runs with that many compute threads and its output goes to a log
    /// file (parallel jobs would mix their progress bars); its tail is shown if it fails.
    fn run(&self, number: usize, job: &Job, mut cmd: Command, threads: Option<usize>) -> Result<()> {
        let prefix = format!("[{number}/{}] {}", self.total, job.label());
        let Some(why) = job.reason(self.layout, self.force) else {
            println!("{prefix}: cached");
            return Ok(());
        };
        println!("{prefix}: running ({why})");
        let t0 = Instant::now();
        if self.force && job.stage != Stage::FetchData {
            cmd.arg("--force");
        }
        let failed = || format!("{} failed; earlier results are kept", job.label());
        match threads {
            None => {
                let status = cmd.status().with_context(failed)?;
                anyhow::ensure!(status.success(), "{}: {status}", failed());
            }
            Some(n) => {
                let log = self.layout.data_dir.join("logs").join(format!("{}.log", job.label().replace(' ', "-")));
                std::fs::create_dir_all(log.parent().expect("a folder")).context("cannot create the log folder")?;
                let file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
                let status = cmd
                    .env("RAYON_NUM_THREADS", n.to_string())
                    .stdout(file.try_clone()?)
                    .stderr(file)
                    .status()
                    .with_context(failed)?;
                if !status.success() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    anyhow::bail!("{}: {status}; the end of {}:\n{}", failed(), log.display(), tail.join("\n"));
                }
            }
        }
        println!("{prefix}: done in {:.1} s", t0.elapsed().as_secs_f64());
        self.ran.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A job with its 1-based place in the plan and its command line.
type Numbered<'a> = (usize, &'a Job, Command);

/// Runs every job that is not fresh: datasets first, then each (experiment, seed) chain of train →
/// snapshot → reset-eval, up to `parallel` chains at once, then the aggregates (a sweep's after
/// its points').
#[allow(clippy::too_many_arguments)]
fn execute(
    sh: &Shell,
    jobs: &[Job],
    layout: &Layout,
    config: &Path,
    force: bool,
    build: bins::Build,
    parallel: usize,
    device: Option<&str>,
) -> Result<()> {
    let started = Instant::now();
    let _lock = RunLock::acquire(&layout.data_dir)?;
    slurm::refuse_if_active(layout)?;
    if jobs.iter().all(|j| j.reason(layout, force).is_none()) {
        println!(
            "up to date: nothing to do ({} stages checked in {:.2} s)",
            jobs.len(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let bins = bins::build(sh, &build)?;
    let runner = Runner { layout, force, total: jobs.len(), ran: AtomicUsize::new(0) };
    // Command lines are made here, as the shell cannot be shared with the workers.
    let mut fetches = Vec::new();
    // Each experiment and seed's chain: train, snapshot, reset-eval, run in order.
    let mut chains: BTreeMap<(String, u64), Vec<Numbered<'_>>> = BTreeMap::new();
    let mut aggregates = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let argv = job.argv(&bins, config, layout, device);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).current_dir(sh.current_dir());
        let item = (i + 1, job, cmd);
        match (&job.subject, job.chain()) {
            (Subject::Dataset(_), _) => fetches.push(item),
            (_, Some((name, seed))) => chains.entry((name.to_string(), seed)).or_default().push(item),
            (_, None) => aggregates.push(item),
        }
    }
    for (n, job, cmd) in fetches {
        runner.run(n, job, cmd, None)?;
    }
    let workers = parallel.clamp(1, chains.len().max(1));
    if workers == 1 {
        for chain in chains.into_values() {
            for (n, job, cmd) in chain {
                runner.run(n, job, cmd, None)?;
            }
        }
    } else {
        // Split the cores among the chains: one small network per core runs faster than one
        // network on every core (the measurement is in docs/performance.md, step 1).
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = (cores / workers).max(1);
        println!("running {} seed chains, {workers} at a time, {threads} thread(s) each", chains.len());
        let queue = Mutex::new(chains.into_values().collect::<VecDeque<_>>());
        let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let Some(chain) = queue.lock().ok().and_then(|mut q| q.pop_front()) else { return };
                    for (n, job, cmd) in chain {
                        if let Err(e) = runner.run(n, job, cmd, Some(threads)) {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().ok().flatten() {
            return Err(e);
        }
    }
    for (n, job, cmd) in aggregates {
        runner.run(n, job, cmd, None)?;
    }
    let ran = runner.ran.load(Ordering::Relaxed);
    println!("ran {ran} of {} stages in {:.1} s", jobs.len(), started.elapsed().as_secs_f64());
    Ok(())
}

/// What would run and why, following reruns downstream by hand (nothing changes on disk); sweeps
/// are shown expanded first.
fn dry_run_report(selection: &plan::Selection, jobs: &[Job], layout: &Layout, force: bool) -> Result<()> {
    for sweep in &selection.sweeps {
        println!("sweep {}: {} points", sweep.name, sweep.points.len());
        for point in &sweep.points {
            println!("  {point}");
        }
    }
    let mut would_run: Vec<&Job> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let mut why = job.reason(layout, force);
        if why.is_none() {
            if let Some(up) = would_run.iter().find(|u| job.depends_on(u)) {
                why = Some(format!("input {} would rerun", up.label()));
            }
        }
        let prefix = format!("[{}/{}] {}", i + 1, jobs.len(), job.label());
        match why {
            None => println!("{prefix}: cached"),
            Some(why) => {
                println!("{prefix}: would run ({why})");
                would_run.push(job);
            }
        }
    }
    Ok(())
}
