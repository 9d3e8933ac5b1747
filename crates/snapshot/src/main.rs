//! `snapshot`: reads one training run's checkpoints and writes `units.parquet` and
//! `movement.parquet` under `data/runs/<experiment>/seed-<s>/snapshot/`.

use std::process::ExitCode;

use clap::Parser;
use layerlab::stages::{self, cli, snapshot::Outcome};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// List a run's units and measure how far each moved from its initial value.
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
    match stages::snapshot::run(&ctx, flags.seed)? {
        Outcome::UpToDate => println!("snapshot {name} seed {}: up to date", flags.seed),
        Outcome::Written { units, epochs } => {
            println!("snapshot {name} seed {}: {units} units × {epochs} checkpoints", flags.seed)
        }
    }
    Ok(())
}
