//! `aggregate`: combines an experiment's per-seed reset results into `data/results/<experiment>/`
//! (summary and robustness tables, heatmaps, movement figure, `report.md`) and refreshes the
//! cross-experiment `data/results/robustness.parquet`; with `--sweep`, combines a sweep's points
//! into `data/results/<sweep>/` (`sweep.parquet`, `robustness.svg`/`.png`, `report.md`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use layerlab::stages::{self, aggregate::Outcome, aggregate_sweep, cli};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Summarise an experiment over its seeds (which units are robust, which critical), or a sweep
/// over its points.
#[derive(Debug, Parser)]
#[command(version)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["experiment", "sweep"])))]
struct Flags {
    /// The pipeline file.
    #[arg(long, default_value = "pipeline.toml")]
    config: PathBuf,
    /// Which experiment of the pipeline file.
    #[arg(long, short)]
    experiment: Option<String>,
    /// Which sweep of the pipeline file (every point's aggregate must be done).
    #[arg(long)]
    sweep: Option<String>,
    /// Output folder (overrides the pipeline file's `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Redo the work even when the stamp says it is up to date.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    cli::init_logging();
    let flags = Flags::parse();
    cli::finish(run(&flags))
}

fn run(flags: &Flags) -> anyhow::Result<()> {
    if let Some(sweep) = &flags.sweep {
        let (pipeline, layout) = stages::load_pipeline(&flags.config, flags.data_dir.clone())?;
        match aggregate_sweep::run(&pipeline, &layout, sweep, flags.force)? {
            aggregate_sweep::Outcome::UpToDate => println!("aggregate sweep {sweep}: up to date"),
            aggregate_sweep::Outcome::Written { report, points } => {
                println!("aggregate sweep {sweep}: {points} points; report at {}", report.display())
            }
        }
        return Ok(());
    }
    let experiment = flags.experiment.as_deref().unwrap_or_default();
    let ctx = stages::StageContext::load(&flags.config, experiment, flags.data_dir.clone(), flags.force)?;
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
