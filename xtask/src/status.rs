//! `status`, `clean` and `test`: small commands around the pipeline.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use layerlab_pipeline::cache::{Freshness, Stage, Stamp};
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
            if let Some(point) = resume_point(job, &layout) {
                let _ = write!(state, " ({point})");
            }
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

/// What a killed stage left to continue from under the job's current key: training's last
/// finished epoch (`train/resume.safetensors`), a reset grid's finished groups
/// (`reset/resume.json`). A resume point of other settings is not continued, so not shown.
fn resume_point(job: &plan::Job, layout: &Layout) -> Option<String> {
    let dir = job.output_dir(layout);
    let key = job.key();
    match job.stage {
        Stage::Train => {
            let meta = safetensors_metadata(&dir.join("resume.safetensors"))?;
            let epoch = meta.get("epoch")?.as_str()?;
            (meta.get("key")?.as_str()? == key).then(|| format!("resumes after epoch {epoch}"))
        }
        Stage::ResetEval => {
            let text = std::fs::read_to_string(dir.join("resume.json")).ok()?;
            let point: serde_json::Value = serde_json::from_str(&text).ok()?;
            let groups = point.get("groups")?.as_array()?.len();
            (point.get("key")?.as_str()? == key).then(|| format!("resumes after {groups} groups of its grid"))
        }
        _ => None,
    }
}

/// The `__metadata__` of a safetensors file's header (read without the tensors).
fn safetensors_metadata(path: &std::path::Path) -> Option<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    let len = usize::try_from(u64::from_le_bytes(len)).ok().filter(|&n| n <= 100 << 20)?;
    let mut header = vec![0u8; len];
    file.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    header.get("__metadata__")?.as_object().cloned()
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
                dirs.push(layout.dataset_dir(&exp.dataset));
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

/// The test targets of `tests/` whose `#[ignore = "needs …"]` tests need what a developer's machine
/// may lack (a Slurm cluster, Python packages, apt-get, root), and the variable that asks for a
/// target's outside CI. Under CI (`CI` set) `cargo xtask test` runs them all, with `--ignored`, and
/// there a test that finds what it needs missing fails.
const NEEDS_THE_MACHINE: [(&str, Option<&str>); 4] = [
    ("slurm", Some("LAYERLAB_SLURM_TESTS")),
    ("reference", Some("LAYERLAB_PYTHON_TESTS")),
    ("fetch_data", None),
    ("faults", None),
];

/// The targets of [`NEEDS_THE_MACHINE`] whose ignored tests this run is asked to run.
fn machine_tests(ci: bool, asked: impl Fn(&str) -> bool) -> Vec<&'static str> {
    NEEDS_THE_MACHINE.iter().filter(|(_, var)| ci || var.is_some_and(&asked)).map(|(target, _)| *target).collect()
}

/// `args` for `cargo test`, split at `--` into cargo's own and the test binaries'.
fn split_at_dashes(args: &[String]) -> (&[String], &[String]) {
    match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[]),
    }
}

impl flags::Test {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let args = &self.args;
        if self.gpu {
            // One test binary, built with CUDA, where no test is ignored: a test that cannot open
            // the GPU fails, saying why.
            let gpu_listed = cmd!(sh, "nvidia-smi -L").quiet().ignore_stderr().read().is_ok_and(|l| l.contains("GPU"));
            if !gpu_listed {
                println!("nvidia-smi lists no GPU: every GPU test but the three that need none will fail");
            }
            cmd!(
                sh,
                "cargo test --release -p layerlab --features cuda --test gpu {args...} -- --nocapture --test-threads 1"
            )
            .run()?;
            return Ok(());
        }
        cmd!(sh, "cargo test --workspace {args...}").run()?;
        let ci = std::env::var_os("CI").is_some();
        let targets = machine_tests(ci, |var| std::env::var(var).is_ok_and(|v| v == "1"));
        if !targets.is_empty() {
            // The same build (the whole workspace's features), only these targets' ignored tests.
            let why = if ci { "CI is set" } else { "asked for by LAYERLAB_*_TESTS=1" };
            println!("the tests that need the machine's services, ignored above, in {} ({why}):", targets.join(", "));
            let selected: Vec<&str> = targets.iter().flat_map(|t| ["--test", t]).collect();
            let (cargo_args, test_args) = split_at_dashes(args);
            cmd!(sh, "cargo test --workspace {selected...} {cargo_args...} -- --ignored {test_args...}").run()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_runs_every_test_that_needs_the_machine_and_a_variable_asks_for_one() {
        assert_eq!(machine_tests(true, |_| false), ["slurm", "reference", "fetch_data", "faults"]);
        assert_eq!(machine_tests(false, |_| false), Vec::<&str>::new());
        assert_eq!(machine_tests(false, |var| var == "LAYERLAB_PYTHON_TESTS"), ["reference"]);
    }

    #[test]
    fn extra_arguments_are_split_between_cargo_and_the_tests() {
        let args: Vec<String> = ["-q", "--", "--nocapture"].map(String::from).into();
        assert_eq!(split_at_dashes(&args), (&args[..1], &args[2..]));
        assert_eq!(split_at_dashes(&args[..1]), (&args[..1], &[][..]));
    }

    /// Each target named here exists, and holds the tests that it is named for.
    #[test]
    fn the_named_targets_have_ignored_tests_that_need_the_machine() {
        for (target, _) in NEEDS_THE_MACHINE {
            let path = crate::project_root().join("tests/tests").join(format!("{target}.rs"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(text.contains("#[ignore = \"needs "), "{}: no `#[ignore = \"needs …\"]` test", path.display());
        }
    }
}
