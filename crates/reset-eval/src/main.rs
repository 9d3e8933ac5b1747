//! `reset-eval`: resets units of a trained run (re-initialization, re-randomization, joint resets)
//! and writes `data/runs/<experiment>/seed-<s>/reset/results.parquet`.

use std::process::ExitCode;

use layerlab::stages::{cli, reset_eval};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::seed_stage_main(
        "reset-eval",
        "Measure the test error of a trained network with units put back to other states",
        reset_eval::describe,
    )
}
