//! `train`: trains one experiment's network for one seed, writing checkpoints and `history.parquet`
//! under `data/runs/<experiment>/seed-<s>/train/`.

use std::process::ExitCode;

use clap::Parser;
use layerlab::stages::{self, cli};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Train a network, keeping checkpoints at the configured epochs; a killed run resumes.
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
    match stages::train::run(&ctx, flags.seed)? {
        stages::train::Outcome::UpToDate => println!("train {} seed {}: up to date", ctx.experiment.name, flags.seed),
        stages::train::Outcome::Trained(s) => {
            let last = s.history.last().map(|r| r.test_error).unwrap_or(f64::NAN);
            println!(
                "train {} seed {}: final test error {:.4}, {:.0} examples/s{}",
                ctx.experiment.name,
                flags.seed,
                last,
                s.examples_per_second,
                s.resumed_from.map(|e| format!(" (resumed after epoch {e})")).unwrap_or_default()
            );
        }
    }
    Ok(())
}
