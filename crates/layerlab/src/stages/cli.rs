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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// mimalloc's option number for its purge delay (`mi_option_purge_delay` in mimalloc.h, the same
/// in its v2 and v3); the Rust bindings name only some options.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc (the stage binaries' allocator) keep the pages it frees instead of handing
/// them back to the OS after a delay.
///
/// Why: a training step or a reset evaluation frees megabytes of activations and allocates them
/// again moments later. Handed back, every page is faulted in and zeroed by the kernel anew: a
/// ResNet-18 w0.25 bench run took 25,686 page faults and 9.9 s of CPU time, against 469 and
/// 7.8 s with the pages kept (`docs/performance.md`, "Step 5"). The cost is that the process
/// keeps its peak memory until it exits.
pub fn keep_freed_memory() {
    // SAFETY: sets one integer option; mimalloc reads its options at every purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
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

/// The flags of a per-seed stage: the experiment flags and `--seed`.
#[derive(Debug, clap::Parser)]
pub struct SeedFlags {
    #[command(flatten)]
    pub common: ExperimentArgs,
    /// Training seed (one of the experiment's seeds).
    #[arg(long, short)]
    pub seed: u64,
    /// Where to compute: `auto` (the GPU when this binary has CUDA and one is visible, else the
    /// CPU), `cpu`, `cuda` or `cuda:N`. Not part of any key: results record it instead.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: crate::device::DeviceChoice,
}

/// The whole `main` of a per-seed stage binary: parse flags, run the stage, print its one-line
/// summary, or print the error and fail.
pub fn seed_stage_main(
    name: &'static str,
    about: &'static str,
    stage: fn(&super::StageContext, u64) -> anyhow::Result<String>,
) -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    keep_freed_memory();
    init_logging();
    let matches = SeedFlags::command().name(name).about(about).version(layerlab_pipeline::VERSION).get_matches();
    let result = SeedFlags::from_arg_matches(&matches)
        .map_err(anyhow::Error::from)
        .and_then(|flags| {
            let mut ctx = flags.common.context()?;
            ctx.device = flags.device;
            stage(&ctx, flags.seed)
        })
        .map(|line| println!("{line}"));
    finish(result)
}
