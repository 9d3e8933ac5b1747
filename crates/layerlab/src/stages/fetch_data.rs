//! The `fetch-data` stage: one dataset fetched, verified and stored, or found already there.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::data::fetch::{self, FetchOptions, FetchReport};
use layerlab_pipeline::DataSource;

/// What the command line asks for.
#[derive(Debug, Clone)]
pub struct Request {
    /// A catalogue dataset, fetched from its sources; or the user's own, read from its files
    /// (the source flags do not apply).
    pub dataset: DataSource,
    /// A local folder (or the CIFAR-10 archive) tried first.
    pub from: Option<PathBuf>,
    /// The datasets folder; the dataset goes to `<datasets_dir>/<name>`.
    pub datasets_dir: PathBuf,
    /// Base URLs replacing the catalogue's; empty: the catalogue's.
    pub urls: Vec<String>,
    /// No download locations at all (registry sources are separate: `registry`).
    pub offline: bool,
    pub registry: bool,
    pub timeout: Duration,
    pub force: bool,
}

/// Fetches the dataset and returns the line that says what was done.
pub fn run(req: &Request) -> Result<String> {
    let dir = req.datasets_dir.join(req.dataset.name());
    let dataset = match &req.dataset {
        DataSource::Catalogue(d) => *d,
        DataSource::Own(own) => return Ok(describe(&fetch::import_own(own, &dir, req.force)?)),
    };
    let urls = match (req.offline, req.urls.is_empty()) {
        (true, _) => Vec::new(),
        (false, true) => dataset.default_urls().iter().map(|u| u.to_string()).collect(),
        (false, false) => req.urls.clone(),
    };
    let opts = FetchOptions {
        from: req.from.clone(),
        urls,
        registry: req.registry,
        timeout: req.timeout.max(Duration::from_secs(1)),
        force: req.force,
        ..FetchOptions::new(dataset, dir)
    };
    Ok(describe(&fetch::fetch(&opts)?))
}

fn describe(report: &FetchReport) -> String {
    if report.already_present {
        format!(
            "fetch-data {}: already present in {} ({} + {} examples, from {}), {:.1} s",
            report.dataset,
            report.dir.display(),
            report.train,
            report.test,
            report.source,
            report.seconds
        )
    } else {
        format!(
            "fetch-data {}: wrote {}/{{train,test}}.safetensors ({} + {} examples, {}) from {} in {:.1} s",
            report.dataset,
            report.dir.display(),
            report.train,
            report.test,
            report.check.name(),
            report.source,
            report.seconds
        )
    }
}
