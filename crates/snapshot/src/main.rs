//! `snapshot`: reads one training run's checkpoints and writes `units.parquet` and
//! `movement.parquet` under `data/runs/<experiment>/seed-<s>/snapshot/`.

use std::process::ExitCode;

use layerlab::stages::{cli, snapshot};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::seed_stage_main(
        "snapshot",
        "List a run's units and measure how far each moved from its initial value",
        snapshot::describe,
    )
}
