//! `train`: trains one experiment's network for one seed, writing checkpoints and `history.parquet`
//! under `data/runs/<experiment>/seed-<s>/train/`.

use std::process::ExitCode;

use layerlab::stages::{cli, train};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::seed_stage_main(
        "train",
        "Train a network, keeping checkpoints at the configured epochs; a killed run resumes",
        train::describe,
    )
}
