//! `aggregate`: combines an experiment's per-seed reset results into `data/results/<experiment>/`
//! (summary and robustness tables, heatmaps, movement figure, `report.md`) and refreshes the
//! cross-experiment `data/results/robustness.parquet`.

use std::process::ExitCode;

use clap::Parser;
use layerlab::stages::{self, aggregate::Outcome, cli};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Summarise an experiment over its seeds: which units are robust, which critical.
#[derive(Debug, Parser)]
#[command(version)]
struct Flags {
    #[command(flatten)]
    common: cli::ExperimentArgs,
}

fn main() -> ExitCode {
    cli::init_logging();
    let flags = Flags::parse();
    cli::finish(run(&flags))
}

fn run(flags: &Flags) -> anyhow::Result<()> {
    let ctx = flags.common.context()?;
    let name = &ctx.experiment.name;
    match stages::aggregate::run(&ctx)? {
        Outcome::UpToDate => println!("aggregate {name}: up to date"),
        Outcome::Written { report, seeds } => {
            let seeds = seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
            println!("aggregate {name}: seeds {seeds}; report at {}", report.display())
        }
    }
    Ok(())
}
