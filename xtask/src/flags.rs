//! Every command and option of `cargo xtask`, in one place.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::bins;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Run layerlab's pipeline, its tests and benchmarks")]
pub struct Xtask {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch, train, snapshot, reset-eval and aggregate every chosen experiment; skip what is up to date.
    RunAll(RunAll),
    /// Run one stage by hand, with the same caching.
    Run(Run),
    /// Show every stage of every experiment and seed: fresh, stale (and why), or missing.
    Status(Status),
    /// Remove outputs (never the datasets unless --datasets).
    Clean(Clean),
    /// Cancel the Slurm jobs that `run-all --executor slurm` submitted and that have not ended.
    Cancel(Cancel),
    /// Run the test suite (the README's test command); under CI (`CI` set) also the tests that
    /// need a Slurm cluster, Python packages, apt-get or root, which are ignored elsewhere.
    Test(Test),
    /// Time layerlab against a PyTorch baseline on the same machine; write data/bench/bench.parquet.
    Bench(Bench),
    /// Fuzz the readers of outside input (IDX, CIFAR-10, pipeline.toml) with cargo-fuzz.
    Fuzz(Fuzz),
    /// Get the CUDA 13.0 toolkit pieces a `--features cuda` build needs, from PyPI wheels, with no
    /// GPU and no system CUDA; writes target/cuda-env/env.sh to source before building.
    CudaEnv(CudaEnv),
}

#[derive(Debug, Args)]
pub struct CudaEnv {
    /// Where to put the toolkit, the link stub and env.sh.
    #[arg(long, default_value = "target/cuda-env")]
    pub dir: PathBuf,
    /// GPU compute capability to compile kernels for (90: H100/H200).
    #[arg(long, default_value = "90")]
    pub compute_cap: String,
}

/// Options shared by the commands that read the pipeline.
#[derive(Debug, Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline file.
    #[arg(long, default_value = "pipeline.toml")]
    pub config: PathBuf,
    /// Experiments to work on (repeatable); default: the file's `default_experiments`.
    #[arg(long = "experiment", short = 'e')]
    pub experiments: Vec<String>,
    /// Use the dev-profile stage binaries instead of release ones (for tests).
    #[arg(long, hide = true)]
    pub dev_build: bool,
    /// Build the stage binaries with the `cuda` feature, for `--device cuda` (needs the CUDA
    /// toolkit: `cargo xtask cuda-env` gets one, then `source target/cuda-env/env.sh`).
    #[arg(long)]
    pub cuda: bool,
    /// Run the stage binaries found in DIR instead of building them (a machine with no Rust
    /// toolchain, e.g. a GPU node that was sent binaries built elsewhere).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["dev_build", "cuda"])]
    pub bin_dir: Option<PathBuf>,
}

impl PipelineArgs {
    pub fn build(&self) -> bins::Build {
        bins::Build { dev: self.dev_build, cuda: self.cuda, prebuilt: self.bin_dir.clone() }
    }
}

#[derive(Debug, Args)]
pub struct RunAll {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Rerun every stage even when it is up to date (datasets are kept).
    #[arg(long)]
    pub force: bool,
    /// Say what would run, and why, without running it.
    #[arg(long)]
    pub dry_run: bool,
    /// Seed chains (train → snapshot → reset-eval) run at once; the cores are split among them.
    #[arg(long, short = 'j', default_value_t = default_jobs())]
    pub jobs: usize,
    /// Where the stages run: `local` or `slurm` (one sbatch job per stage); default: the
    /// pipeline file's `[executor] kind`, else local.
    #[arg(long)]
    pub executor: Option<layerlab_pipeline::ExecutorKind>,
    /// Where train, snapshot and reset-eval compute: `auto`, `cpu`, `cuda` or `cuda:N` (passed on
    /// as their `--device`); default: each stage's own default, `auto`.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// With `--executor slurm`: wait until every submitted job has ended, showing their states.
    #[arg(long)]
    pub wait: bool,
}

/// One chain per core.
fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[derive(Debug, Args)]
pub struct Run {
    /// fetch-data, train, snapshot, reset-eval or aggregate (of an experiment, or of a sweep).
    pub stage: String,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Only this seed (per-seed stages); default: every seed of the experiment.
    #[arg(long, short)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub force: bool,
    /// Where the stage computes (train, snapshot, reset-eval): `auto`, `cpu`, `cuda`, `cuda:N`.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Seed chains run at once.
    #[arg(long, short = 'j', default_value_t = default_jobs())]
    pub jobs: usize,
}

#[derive(Debug, Args)]
pub struct Status {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Show every experiment and sweep in the file, not only the default ones.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct Cancel {
    /// The pipeline file.
    #[arg(long, default_value = "pipeline.toml")]
    pub config: PathBuf,
    /// Cancel only the jobs of these experiments or sweeps (repeatable); default: every job
    /// layerlab submitted that is still queued or running.
    #[arg(long = "experiment", short = 'e')]
    pub experiments: Vec<String>,
}

#[derive(Debug, Args)]
pub struct Clean {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Also remove the datasets.
    #[arg(long)]
    pub datasets: bool,
}

#[derive(Debug, Args)]
pub struct Test {
    /// Run the GPU tests instead (`cargo test --features cuda --test gpu`; needs the CUDA toolkit,
    /// see `cargo xtask cuda-env`, and a GPU: a test that cannot open one fails).
    #[arg(long)]
    pub gpu: bool,
    /// Extra arguments for `cargo test`.
    #[arg(trailing_var_arg = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct Fuzz {
    /// Targets to run, one after another (default: all of them: idx, cifar, pipeline_toml).
    pub targets: Vec<String>,
    /// How long to run each target, in seconds.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// libFuzzer processes per target (`-fork=N`); 1 runs in one process.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Sanitizer for cargo-fuzz (`none`, `address`, ...); the readers are safe Rust, so none
    /// runs fastest and still catches every panic and overflow.
    #[arg(long, default_value = "none")]
    pub sanitizer: String,
}

#[derive(Debug, Args)]
pub struct Bench {
    /// Workloads to run (default: all): fcn (training), grid (FCN reset grid), vgg, resnet, run-all
    /// (the default pipeline from the datasets, then again with nothing to do; not with --quick).
    pub workloads: Vec<String>,
    /// A Python with torch, numpy and safetensors; default: bench/.venv, made and filled on first use.
    #[arg(long)]
    pub python: Option<std::path::PathBuf>,
    /// Threads for each side; a list (`--threads 1,2,4`) measures every workload at each count and
    /// adds each side's scaling (throughput at N threads / at 1 thread) to the table.
    #[arg(long, value_delimiter = ',', default_values_t = [2])]
    pub threads: Vec<usize>,
    /// Measure everything this many times, the two sides taking turns and each round going
    /// through every thread count, and report each side's median: on a machine whose speed
    /// drifts, a single pass can favour whichever side (or thread count) ran in a fast minute.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// A short run to check the benchmark itself: 3 epochs, 1 step per repeat, 2 repeats.
    #[arg(long)]
    pub quick: bool,
    /// Where both sides compute: `cpu`, or `cuda` (builds layerlab with the `cuda` feature: source
    /// target/cuda-env/env.sh first; the CPU targets are not printed).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Width multiplier of the benchmarked VGG-11-BN and ResNet-18 (1 is the paper's networks).
    #[arg(long, default_value_t = 0.25)]
    pub width: f64,
}
