//! `reset-eval`: resets units of a trained run (re-initialization, re-randomization, joint resets)
//! and writes `data/runs/<experiment>/seed-<s>/reset/results.parquet`.

use std::process::ExitCode;

use clap::Parser;
use layerlab::stages::{self, cli, reset_eval::Outcome};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure the test error of a trained network with units put back to other states.
#[derive(Debug, Parser)]
#[command(version)]
struct Flags {
    #[command(flatten)]
    common: cli::ExperimentArgs,
    /// Training seed (one of the experiment's seeds).
    #[arg(long, short)]
    seed: u64,
}

fn main() -> ExitCode {
    cli::init_logging();
    let flags = Flags::parse();
    cli::finish(run(&flags))
}

fn run(flags: &Flags) -> anyhow::Result<()> {
    let ctx = flags.common.context()?;
    let name = &ctx.experiment.name;
    match stages::reset_eval::run(&ctx, flags.seed)? {
        Outcome::UpToDate => println!("reset-eval {name} seed {}: up to date", flags.seed),
        Outcome::Written { rows, seconds } => {
            println!("reset-eval {name} seed {}: {rows} evaluations in {seconds:.1} s", flags.seed)
        }
    }
    Ok(())
}
