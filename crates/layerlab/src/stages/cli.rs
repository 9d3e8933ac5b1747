//! Flags shared by the per-experiment stage binaries, logging set-up, and the error exit.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

/// `--config`, `--experiment`, `--data-dir`, `--force`.
#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// The pipeline file.
    #[arg(long, default_value = "pipeline.toml")]
    pub config: PathBuf,
    /// Which experiment of the pipeline file.
    #[arg(long, short)]
    pub experiment: String,
    /// Output folder (overrides the pipeline file's `data_dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Redo the work even when the stamp says it is up to date.
    #[arg(long)]
    pub force: bool,
}

impl ExperimentArgs {
    pub fn context(&self) -> anyhow::Result<super::StageContext> {
        super::StageContext::load(&self.config, &self.experiment, self.data_dir.clone(), self.force)
    }
}

/// Logs to stderr; `RUST_LOG` overrides the default level (info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).with_target(false).try_init();
}

/// Prints an error with its whole context chain and returns a failing exit code.
pub fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
