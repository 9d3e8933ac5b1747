//! `fuzz`: runs each cargo-fuzz target of `fuzz/` for a given time, installing cargo-fuzz if it is
//! missing, and reports libFuzzer's execution count and any crash.
//!
//! cargo-fuzz needs nightly compiler flags; on a stable toolchain `RUSTC_BOOTSTRAP=1` lets it use
//! them. Each target starts from its own working corpus (`fuzz/corpus/<target>`, not committed)
//! plus the committed malformed-input corpus of its reader (`tests/corpus/<reader>`) and the
//! crashing inputs kept as regressions (`tests/corpus/fuzz-regressions/<target>`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::flags;

/// Every target, with the committed corpus folder that seeds it.
pub const TARGETS: [(&str, &str); 3] = [("idx", "idx"), ("cifar", "cifar"), ("pipeline_toml", "pipeline-toml")];

/// What one target's run gave.
struct Outcome {
    target: String,
    executions: Option<u64>,
    seconds: f64,
    crashed: Vec<PathBuf>,
    status: std::process::ExitStatus,
}

impl flags::Fuzz {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        let root = sh.current_dir();
        let targets: Vec<(&str, &str)> = if self.targets.is_empty() {
            TARGETS.to_vec()
        } else {
            self.targets
                .iter()
                .map(|t| {
                    TARGETS.iter().copied().find(|(name, _)| name == t).with_context(|| {
                        let names: Vec<_> = TARGETS.iter().map(|(n, _)| *n).collect();
                        format!("unknown fuzz target '{t}' (targets: {})", names.join(", "))
                    })
                })
                .collect::<Result<_>>()?
        };
        ensure_cargo_fuzz(sh)?;
        let mut outcomes = Vec::new();
        for (target, reader) in targets {
            outcomes.push(self.run_target(&root, target, reader)?);
        }
        println!("\nfuzzing summary:");
        let mut failed = Vec::new();
        for o in &outcomes {
            let execs = o.executions.map_or("unknown".to_string(), |n| n.to_string());
            println!("  {}: {execs} executions in {:.0} s, {}", o.target, o.seconds, o.status);
            for c in &o.crashed {
                println!("    crashing input: {}", c.display());
            }
            if o.executions.is_none() && o.crashed.is_empty() {
                println!("    it did not run (a build failure?): see fuzz/logs/{}.log", o.target);
                failed.push(format!("{} (did not run)", o.target));
            } else if !o.status.success() || !o.crashed.is_empty() {
                failed.push(o.target.clone());
            }
        }
        if !failed.is_empty() {
            bail!(
                "fuzzing failed: {}; fix each fault in the library and copy its crashing input into \
                 tests/corpus/fuzz-regressions/<target>/ so that the tests replay it",
                failed.join(", ")
            );
        }
        Ok(())
    }

    fn run_target(&self, root: &Path, target: &str, reader: &str) -> Result<Outcome> {
        let fuzz_dir = root.join("fuzz");
        let work = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
        let artifacts = fuzz_dir.join("artifacts").join(target);
        let before = list(&artifacts);
        let mut corpora = vec![work];
        for seed in [root.join("tests/corpus").join(reader), root.join("tests/corpus/fuzz-regressions").join(target)] {
            if seed.is_dir() {
                corpora.push(seed);
            }
        }
        let log_path = fuzz_dir.join("logs").join(format!("{target}.log"));
        std::fs::create_dir_all(log_path.parent().expect("a folder")).context("cannot create fuzz/logs")?;
        let mut log =
            std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;

        println!("== fuzz {target}: {} s (log: {})", self.seconds, log_path.display());
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(root)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target, "--sanitizer", &self.sanitizer])
            .args(&corpora)
            .arg("--")
            .arg(format!("-max_total_time={}", self.seconds))
            .arg("-print_final_stats=1");
        if self.jobs > 1 {
            cmd.arg(format!("-fork={}", self.jobs));
        }
        let t0 = Instant::now();
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("cannot start cargo fuzz")?;
        // libFuzzer reports on stderr; both streams go to the terminal and the log.
        let stdout = child.stdout.take().expect("piped");
        let echo = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("{line}");
                lines.push(line);
            }
            lines
        });
        let mut executions = None;
        for line in BufReader::new(child.stderr.take().expect("piped")).lines().map_while(Result::ok) {
            eprintln!("{line}");
            writeln!(log, "{line}").ok();
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                executions = n.trim().parse().ok();
            }
        }
        for line in echo.join().unwrap_or_default() {
            writeln!(log, "{line}").ok();
        }
        let status = child.wait().context("cargo fuzz did not finish")?;
        let crashed = list(&artifacts).into_iter().filter(|p| !before.contains(p)).collect();
        Ok(Outcome { target: target.to_string(), executions, seconds: t0.elapsed().as_secs_f64(), crashed, status })
    }
}

/// The files in a folder (none when it does not exist).
fn list(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    out.sort();
    out
}

/// Installs cargo-fuzz from the package registry when `cargo fuzz` is not there.
fn ensure_cargo_fuzz(sh: &Shell) -> Result<()> {
    if cmd!(sh, "cargo fuzz --version").quiet().ignore_stdout().ignore_stderr().run().is_ok() {
        return Ok(());
    }
    println!("cargo-fuzz is missing: installing it with `cargo install cargo-fuzz --locked`");
    cmd!(sh, "cargo install cargo-fuzz --locked").run().context("cannot install cargo-fuzz")?;
    Ok(())
}
