//! The Slurm executor: every stage that is not fresh becomes one `sbatch` job that runs the stage
//! binary by its absolute path, with `--dependency=afterok:` on the jobs of its inputs.
//!
//! One job per stage, not per seed chain: Slurm then holds the whole dependency graph, a failed
//! reset-eval never reruns its training, snapshot and reset-eval of a seed run side by side, and
//! each stage asks for what it needs (an aggregate needs no GPU). Datasets are fetched here, on
//! the submitting machine, before anything is submitted: compute nodes often reach no network.
//!
//! What was submitted is recorded in `<data>/slurm/jobs.json` (label → job id, the stage key it
//! was submitted for, its log), so that a stage already queued or running is not submitted again,
//! and `status` and `cancel` know our jobs. The stage binaries keep their own rules (atomic writes,
//! stamps last), which hold on a folder shared by every node; `data/` must be such a folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use layerlab_pipeline::cache::Stage;
use layerlab_pipeline::lock::RunLock;
use layerlab_pipeline::{fsutil, ExecutorConfig, Layout};
use serde::{Deserialize, Serialize};
use xshell::Shell;

use crate::bins;
use crate::flags;
use crate::plan::{self, Job, Subject};

/// One submitted job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub job_id: u64,
    /// The stage key the job was submitted for: a record for another key is history.
    pub key: String,
    /// Unix seconds.
    pub submitted_at: f64,
    pub log: PathBuf,
}

/// `<data>/slurm/jobs.json`: the last job submitted for each stage label.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Records {
    pub jobs: BTreeMap<String, Record>,
}

impl Records {
    fn path(layout: &Layout) -> PathBuf {
        layout.data_dir.join("slurm").join("jobs.json")
    }

    pub fn load(layout: &Layout) -> Result<Records> {
        let path = Records::path(layout);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("{} is not a job record", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Records::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn save(&self, layout: &Layout) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        fsutil::write_atomic(&Records::path(layout), text.as_bytes())
    }

    /// The record of a job for its current key.
    pub fn current(&self, job: &Job) -> Option<&Record> {
        self.jobs.get(&job.label()).filter(|r| r.key == job.key())
    }
}

/// What Slurm says of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Queued or running: `PENDING`, `RUNNING`, `COMPLETING`, … with Slurm's reason when pending.
    Active {
        state: String,
        reason: String,
    },
    Completed,
    /// `FAILED`, `CANCELLED`, `TIMEOUT`, `NODE_FAIL`, `OUT_OF_MEMORY`, …
    Failed(String),
    /// Neither the controller nor the accounting remembers it.
    Unknown,
}

impl JobState {
    fn from_slurm(state: &str, reason: &str) -> JobState {
        // sacct writes "CANCELLED by 0".
        let state = state.split_whitespace().next().unwrap_or("");
        match state {
            "COMPLETED" => JobState::Completed,
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED" | "REQUEUE_HOLD"
            | "REQUEUE_FED" | "RESIZING" | "SIGNALING" | "STAGE_OUT" | "STOPPED" | "RESV_DEL_HOLD" => {
                JobState::Active { state: state.into(), reason: reason.into() }
            }
            "" => JobState::Unknown,
            other => JobState::Failed(other.into()),
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(self, JobState::Active { .. })
    }

    /// `queued (Dependency)`, `running`, `failed (CANCELLED)`, `done`, `unknown to Slurm`.
    pub fn describe(&self) -> String {
        match self {
            JobState::Active { state, reason } if state == "PENDING" => {
                if reason.is_empty() || reason == "None" {
                    "queued".into()
                } else {
                    format!("queued ({reason})")
                }
            }
            JobState::Active { state, .. } if state == "RUNNING" => "running".into(),
            JobState::Active { state, .. } => state.to_lowercase(),
            JobState::Completed => "done".into(),
            JobState::Failed(state) => format!("failed ({state})"),
            JobState::Unknown => "unknown to Slurm".into(),
        }
    }
}

/// Runs a Slurm client command and returns its standard output, or Slurm's own message.
fn slurm_command(program: &str, args: &[String]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("cannot run `{program}`: is Slurm's client installed and on PATH (Debian: slurm-client)?")
    })?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        bail!("{program} refused: {message}");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The states of these jobs: from the controller (`squeue`), else from the accounting (`sacct`).
pub fn states(ids: &[u64]) -> Result<HashMap<u64, JobState>> {
    let mut found = HashMap::new();
    if ids.is_empty() {
        return Ok(found);
    }
    // This user's jobs in every state the controller still remembers (`-j` would fail on an id it
    // has forgotten).
    let args = ["-h", "--me", "-t", "all", "-o", "%i|%T|%r"].map(String::from);
    let queue = slurm_command("squeue", &args)?;
    for line in queue.lines() {
        let mut parts = line.trim().splitn(3, '|');
        let (Some(id), Some(state)) = (parts.next(), parts.next()) else { continue };
        if let Ok(id) = id.parse::<u64>() {
            if ids.contains(&id) {
                found.insert(id, JobState::from_slurm(state, parts.next().unwrap_or("")));
            }
        }
    }
    let missing: Vec<String> = ids.iter().filter(|id| !found.contains_key(id)).map(u64::to_string).collect();
    if !missing.is_empty() {
        let args = ["-n", "-P", "-X", "-o", "JobID,State", "-j"].map(String::from);
        let mut args = args.to_vec();
        args.push(missing.join(","));
        // Without accounting, sacct refuses; the jobs the controller forgot are then unknown.
        if let Ok(text) = slurm_command("sacct", &args) {
            for line in text.lines() {
                let Some((id, state)) = line.trim().split_once('|') else { continue };
                if let Ok(id) = id.parse::<u64>() {
                    found.insert(id, JobState::from_slurm(state, ""));
                }
            }
        }
    }
    for &id in ids {
        found.entry(id).or_insert(JobState::Unknown);
    }
    Ok(found)
}

/// Refuses to run stages here while jobs we submitted are queued or running: both would write
/// the same folders.
pub fn refuse_if_active(layout: &Layout) -> Result<()> {
    let records = Records::load(layout)?;
    if records.jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<u64> = records.jobs.values().map(|r| r.job_id).collect();
    let Ok(states) = states(&ids) else { return Ok(()) };
    let active: Vec<String> = records
        .jobs
        .iter()
        .filter(|(_, r)| states.get(&r.job_id).is_some_and(JobState::is_active))
        .map(|(label, r)| format!("{label} (job {})", r.job_id))
        .collect();
    if !active.is_empty() {
        bail!(
            "Slurm jobs of an earlier `run-all --executor slurm` are still queued or running: {}; wait for them, \
             or `cargo xtask cancel`",
            active.join(", ")
        );
    }
    Ok(())
}

/// Quotes a word for the shell that `sbatch --wrap` starts.
fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The `sbatch` arguments every job shares, from the pipeline's `[executor]`.
fn common_args(settings: &ExecutorConfig, root: &Path) -> Vec<String> {
    let mut args = vec!["--parsable".to_string(), format!("--chdir={}", root.display())];
    args.push(format!("--cpus-per-task={}", settings.cpus_per_task));
    if let Some(p) = &settings.partition {
        args.push(format!("--partition={p}"));
    }
    if let Some(a) = &settings.account {
        args.push(format!("--account={a}"));
    }
    if let Some(t) = &settings.time {
        args.push(format!("--time={t}"));
    }
    if let Some(m) = &settings.mem {
        args.push(format!("--mem={m}"));
    }
    if settings.gpus_per_task > 0 {
        args.push(format!("--gpus-per-task={}", settings.gpus_per_task));
    }
    // The stage's compute threads follow the CPUs Slurm gives it.
    args.push(format!("--export=ALL,RAYON_NUM_THREADS={}", settings.cpus_per_task));
    args.extend(settings.sbatch_flags.iter().cloned());
    args
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Submits every stage that is neither fresh nor already queued, each after the jobs of its
/// inputs. Returns whether any job of the selection is queued or running now.
#[allow(clippy::too_many_arguments)]
pub fn submit(
    sh: &Shell,
    jobs: &[Job],
    layout: &Layout,
    config: &Path,
    settings: &ExecutorConfig,
    force: bool,
    build: bins::Build,
    device: Option<&str>,
) -> Result<bool> {
    let _lock = RunLock::acquire(&layout.data_dir)?;
    let root = sh.current_dir();
    let common = common_args(settings, &root);
    // A bad setting (an unknown partition, account or time) is refused before anything is
    // submitted, in Slurm's own words.
    let mut probe = common.clone();
    probe.extend(["--test-only".to_string(), "--job-name=layerlab-check".into(), "--wrap=true".into()]);
    slurm_command("sbatch", &probe).context("the pipeline's [executor] settings; nothing was submitted")?;

    let bins = bins::build(sh, &build)?;
    let bins = if bins.is_absolute() { bins } else { root.join(bins) };
    let mut records = Records::load(layout)?;
    let earlier: Vec<u64> = jobs.iter().filter_map(|j| records.current(j)).map(|r| r.job_id).collect();
    let earlier_states = states(&earlier)?;
    let logs = layout.data_dir.join("logs").join("slurm");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    // Job ids of the stages that will run (submitted now or queued before), by label.
    let mut pending: HashMap<String, u64> = HashMap::new();
    let mut last_aggregate: Option<u64> = None;
    let (mut submitted, mut queued, mut cached) = (0, 0, 0);
    let total = jobs.len();
    for (i, job) in jobs.iter().enumerate() {
        let label = job.label();
        let prefix = format!("[{}/{total}] {label}", i + 1);
        let argv = job.argv(&bins, config, layout, device);
        if let Subject::Dataset(_) = job.subject {
            match job.reason(layout, false) {
                None => println!("{prefix}: cached"),
                Some(why) => {
                    println!("{prefix}: running here ({why})");
                    let status = Command::new(&argv[0]).args(&argv[1..]).status().context("fetch-data")?;
                    anyhow::ensure!(status.success(), "{label} failed: {status}");
                }
            }
            continue;
        }
        let after: Vec<u64> =
            jobs.iter().filter(|up| job.depends_on(up)).filter_map(|up| pending.get(&up.label()).copied()).collect();
        let why = job.reason(layout, force);
        if why.is_none() && after.is_empty() {
            println!("{prefix}: cached");
            cached += 1;
            continue;
        }
        if let Some(record) = records.current(job) {
            if earlier_states.get(&record.job_id).is_some_and(JobState::is_active) {
                println!("{prefix}: already queued as job {} (submitted earlier)", record.job_id);
                pending.insert(label, record.job_id);
                queued += 1;
                if job.stage == Stage::Aggregate {
                    last_aggregate = Some(record.job_id);
                }
                continue;
            }
        }
        let why = why.unwrap_or_else(|| "an input reruns".into());
        let mut args = common.clone();
        let log_name = label.replace(' ', "-");
        args.push(format!("--job-name=layerlab:{log_name}"));
        args.push(format!("--output={}", logs.join(format!("{log_name}-%j.log")).display()));
        let mut dependency = Vec::new();
        if !after.is_empty() {
            dependency.push(format!("afterok:{}", after.iter().map(u64::to_string).collect::<Vec<_>>().join(":")));
        }
        // Aggregates each rewrite the shared `results/robustness.parquet`: one at a time, in order.
        if job.stage == Stage::Aggregate {
            if let Some(prev) = last_aggregate {
                dependency.push(format!("afterany:{prev}"));
            }
        }
        if !dependency.is_empty() {
            args.push(format!("--dependency={}", dependency.join(",")));
            args.push("--kill-on-invalid-dep=yes".into());
        }
        let mut line: Vec<String> = argv.iter().map(|w| shell_quote(w)).collect();
        if force {
            line.push("--force".into());
        }
        args.push(format!("--wrap=exec {}", line.join(" ")));
        let out = slurm_command("sbatch", &args).with_context(|| format!("submitting {label}"))?;
        let id_text = out.trim().split(';').next().unwrap_or("").to_string();
        let job_id: u64 = id_text.parse().with_context(|| format!("sbatch printed '{}', not a job id", out.trim()))?;
        let log = logs.join(format!("{log_name}-{job_id}.log"));
        records.jobs.insert(label.clone(), Record { job_id, key: job.key(), submitted_at: now(), log });
        // Saved after every submission, so that a run stopped half-way still knows its jobs.
        records.save(layout)?;
        let after_text = if after.is_empty() {
            String::new()
        } else {
            format!(", after {}", after.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
        };
        println!("{prefix}: submitted as job {job_id} ({why}{after_text})");
        pending.insert(label, job_id);
        if job.stage == Stage::Aggregate {
            last_aggregate = Some(job_id);
        }
        submitted += 1;
    }
    if submitted == 0 && queued == 0 {
        println!("up to date: nothing to submit ({cached} stages cached)");
        return Ok(false);
    }
    println!(
        "submitted {submitted} job(s); {queued} already queued; {cached} cached. `cargo xtask status` follows them."
    );
    Ok(true)
}

/// Waits until no job of the selection is queued or running, printing each change of state;
/// fails naming every job that did not complete, with the end of its log.
pub fn wait(jobs: &[Job], layout: &Layout) -> Result<()> {
    let records = Records::load(layout)?;
    let ours: Vec<(String, &Record)> = jobs.iter().filter_map(|j| records.current(j).map(|r| (j.label(), r))).collect();
    let ids: Vec<u64> = ours.iter().map(|(_, r)| r.job_id).collect();
    let mut seen: HashMap<u64, JobState> = HashMap::new();
    let started = Instant::now();
    loop {
        let now = states(&ids)?;
        for (label, record) in &ours {
            let state = &now[&record.job_id];
            if seen.get(&record.job_id) != Some(state) {
                println!(
                    "{:7.1} s  job {} {label}: {}",
                    started.elapsed().as_secs_f64(),
                    record.job_id,
                    state.describe()
                );
                seen.insert(record.job_id, state.clone());
            }
        }
        if !now.values().any(JobState::is_active) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let failed: Vec<String> = ours
        .iter()
        .filter(|(_, r)| !matches!(seen.get(&r.job_id), Some(JobState::Completed)))
        .map(|(label, r)| {
            let state = seen.get(&r.job_id).map(JobState::describe).unwrap_or_default();
            format!("{label} (job {}): {state}{}", r.job_id, log_tail(&r.log, 10))
        })
        .collect();
    if !failed.is_empty() {
        bail!("{} job(s) did not complete:\n{}", failed.len(), failed.join("\n"));
    }
    println!("all {} job(s) completed in {:.1} s", ours.len(), started.elapsed().as_secs_f64());
    Ok(())
}

/// The last lines of a job's log, indented, or nothing when there is no log.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(log) else { return String::new() };
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    let tail: Vec<String> = tail.into_iter().rev().map(|l| format!("    | {l}")).collect();
    format!("\n    the end of {}:\n{}", log.display(), tail.join("\n"))
}

impl flags::Cancel {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let args = flags::PipelineArgs {
            config: self.config.clone(),
            experiments: self.experiments.clone(),
            dev_build: false,
            cuda: false,
            bin_dir: None,
        };
        let selection = plan::load(&args, sh, false)?;
        let layout = Layout::from_pipeline(&selection.pipeline);
        let records = Records::load(&layout)?;
        let chosen: Vec<(&String, &Record)> = if self.experiments.is_empty() {
            records.jobs.iter().collect()
        } else {
            let labels: Vec<String> = plan::jobs(&selection, None, None)?.iter().map(Job::label).collect();
            records.jobs.iter().filter(|(label, _)| labels.contains(label)).collect()
        };
        let ids: Vec<u64> = chosen.iter().map(|(_, r)| r.job_id).collect();
        let states = states(&ids)?;
        let active: Vec<(&String, &Record)> =
            chosen.into_iter().filter(|(_, r)| states.get(&r.job_id).is_some_and(JobState::is_active)).collect();
        if active.is_empty() {
            println!("nothing to cancel: no job of ours is queued or running");
            return Ok(());
        }
        let mut scancel: Vec<String> = active.iter().map(|(_, r)| r.job_id.to_string()).collect();
        scancel.sort();
        slurm_command("scancel", &scancel)?;
        for (label, r) in active {
            println!("cancelled job {} ({label})", r.job_id);
        }
        Ok(())
    }
}
