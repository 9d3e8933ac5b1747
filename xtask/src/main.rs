//! `cargo xtask`: runs the pipeline's stages in order with caching, shows their status, cleans
//! outputs, runs the tests and the benchmarks. It only orders and invokes the stage binaries.

mod bench;
mod bins;
mod cuda_env;
mod flags;
mod fuzz;
mod plan;
mod run_all;
mod slurm;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use xshell::Shell;

fn main() -> ExitCode {
    let flags = flags::Xtask::parse();
    match run(flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: flags::Xtask) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    match flags.command {
        flags::Command::RunAll(cmd) => cmd.run(&sh),
        flags::Command::Run(cmd) => cmd.run(&sh),
        flags::Command::Status(cmd) => cmd.run(&sh),
        flags::Command::Clean(cmd) => cmd.run(&sh),
        flags::Command::Cancel(cmd) => cmd.run(&sh),
        flags::Command::Test(cmd) => cmd.run(&sh),
        flags::Command::Bench(cmd) => cmd.run(&sh),
        flags::Command::Fuzz(cmd) => cmd.run(&sh),
        flags::Command::CudaEnv(cmd) => cmd.run(&sh),
    }
}

/// The workspace root (the folder above `xtask/`).
///
/// A copy of the xtask binary run on another machine (`run-all --bin-dir` on a GPU node without
/// Rust) finds no such folder there and uses the folder it is run from.
pub fn project_root() -> PathBuf {
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace");
    if built_in.join("pipeline.toml").is_file() {
        built_in.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_else(|_| built_in.to_path_buf())
    }
}
