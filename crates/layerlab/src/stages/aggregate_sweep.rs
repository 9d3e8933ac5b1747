//! The sweep half of the `aggregate` stage (`aggregate --sweep NAME`): every point's aggregate →
//! `results/<sweep>/` (`sweep.parquet`, `robustness.svg`/`.png`, `report.md`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::aggregate::{plot, sweep};
use crate::table::provenance;
use layerlab_pipeline::cache::{self, Freshness, Stamp};
use layerlab_pipeline::{fsutil, Experiment, Layout, Pipeline, Stage};

pub enum Outcome {
    UpToDate,
    Written { report: PathBuf, points: usize },
}

/// Combines the sweep's points; each point's own aggregate must be done (stamped, current key).
pub fn run(pipeline: &Pipeline, layout: &Layout, name: &str, force: bool) -> Result<Outcome> {
    let sweep = pipeline.sweep(name)?;
    let points: Vec<&Experiment> = sweep.points.iter().map(|p| pipeline.experiment(p)).collect::<Result<_>>()?;
    let key = cache::sweep_key(sweep, &points);
    let out_dir = layout.results_dir(&sweep.name);
    if !force && cache::check_sweep(layout, sweep, &points) == Freshness::Fresh {
        return Ok(Outcome::UpToDate);
    }
    let t0 = Instant::now();
    let mut results = Vec::new();
    for point in &points {
        let dir = layout.results_dir(&point.name);
        let why = match cache::check(layout, Stage::Aggregate, point, 0) {
            Freshness::Fresh => None,
            Freshness::Missing => Some("missing".to_string()),
            Freshness::Stale(why) => Some(format!("stale: {why}")),
        };
        if let Some(why) = why {
            bail!(
                "sweep '{}': point '{}' has no current aggregate in {} ({why}); run `cargo xtask run-all -e {}` first",
                sweep.name,
                point.name,
                dir.display(),
                sweep.name
            );
        }
        results.push(sweep::read_point(&dir, point).with_context(|| format!("sweep '{}'", sweep.name))?);
    }
    // Drawn before the folder is touched, so that a failure leaves the previous results whole.
    let figure = sweep::figure(sweep, &results);
    let svg = plot::svg(&figure).context("cannot draw robustness.svg")?;
    let png = plot::png(&figure).context("cannot draw robustness.png")?;
    let mut meta = provenance(&sweep.name, &key.config.to_string(), &key.config_hash());
    meta.push(("sweep_key".into(), key.key.clone()));
    meta.push(("points".into(), sweep.points.join(",")));

    Stamp::remove(&out_dir)?;
    sweep::write_table(&out_dir.join("sweep.parquet"), sweep, &results, &meta)?;
    fsutil::write_atomic(&out_dir.join("robustness.svg"), svg.as_bytes())?;
    fsutil::write_atomic(&out_dir.join("robustness.png"), &png)?;
    let text = sweep::report(sweep, &results, "robustness.png", &pipeline.path, &key.key);
    let report = out_dir.join("report.md");
    fsutil::write_atomic(&report, text.as_bytes())?;
    Stamp::write(&out_dir, &key, t0.elapsed().as_secs_f64())?;
    Ok(Outcome::Written { report, points: results.len() })
}
