//! Reading an experiment's per-seed tables (`reset/results.parquet`, `snapshot/movement.parquet`,
//! `snapshot/units.parquet`) and refusing runs that cannot be combined: missing columns, other
//! settings, stale results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::table::ReadTable;
use layerlab_pipeline::cache::{self, Freshness};
use layerlab_pipeline::{Experiment, Layout, RowMode};

/// One row of a seed's `results.parquet`, reduced to what aggregation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRecord {
    pub seed: u64,
    pub mode: RowMode,
    pub unit: Option<String>,
    pub unit_index: Option<i64>,
    pub units: String,
    pub source_epoch: Option<i64>,
    pub draw: Option<i64>,
    pub bn_stats: String,
    pub test_error: f64,
    pub train_error: f64,
}

/// One seed's reset results with the provenance they were written with.
#[derive(Debug, Clone)]
pub struct SeedResults {
    pub seed: u64,
    pub path: PathBuf,
    pub dataset: String,
    pub arch: String,
    pub config_hash: String,
    /// The settings the results were made with, without the seed (which differs by design).
    pub settings: Value,
    pub layerlab_version: String,
    /// What reset-eval computed on (the table's `device` metadata; empty in tables from before it).
    pub device: String,
    pub records: Vec<ResultRecord>,
}

/// One row of a seed's `movement.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct MovementRecord {
    pub seed: u64,
    pub unit_index: Option<i64>,
    pub unit: String,
    pub epoch: i64,
    pub l2_to_init_rel: Option<f64>,
}

/// Everything aggregation reads for one experiment.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Seeds whose results are combined, in the experiment's order.
    pub seeds: Vec<u64>,
    pub results: Vec<SeedResults>,
    pub movement: Vec<MovementRecord>,
    /// Seeds of the experiment left out, with the reason.
    pub skipped: Vec<(u64, String)>,
    /// Seeds whose movement table was missing (their reset results are still used).
    pub movement_missing: Vec<u64>,
    /// Trainable values per unit, from the first finished snapshot's `units.parquet` (every seed
    /// has the same architecture); empty when no snapshot has finished.
    pub unit_params: BTreeMap<String, i64>,
}

impl Inputs {
    pub fn records(&self) -> impl Iterator<Item = &ResultRecord> {
        self.results.iter().flat_map(|r| r.records.iter())
    }
}

fn required<T>(values: Vec<Option<T>>, table: &ReadTable, column: &str) -> Result<Vec<T>> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.with_context(|| format!("{}: column '{column}' is null in row {i}", table.path)))
        .collect()
}

/// Reads one seed's `results.parquet`, checking its columns and that it is the seed it claims.
pub fn read_results(path: &Path, seed: u64) -> Result<SeedResults> {
    let t = ReadTable::read(path)?;
    let seeds = required(t.ints("seed")?, &t, "seed")?;
    if let Some(other) = seeds.iter().find(|&&s| s != seed as i64) {
        bail!("{}: holds rows of seed {other}, but lies in the folder of seed {seed}", t.path);
    }
    let modes = required(t.texts("mode")?, &t, "mode")?;
    let units = t.texts("unit")?;
    let unit_index = t.ints("unit_index")?;
    let unit_sets = required(t.texts("units")?, &t, "units")?;
    let source_epoch = t.ints("source_epoch")?;
    let draw = t.ints("draw")?;
    let bn = required(t.texts("bn_stats")?, &t, "bn_stats")?;
    let test = required(t.floats("test_error")?, &t, "test_error")?;
    let train = required(t.floats("train_error")?, &t, "train_error")?;
    let dataset = required(t.texts("dataset")?, &t, "dataset")?;
    let arch = required(t.texts("arch")?, &t, "arch")?;
    let mut records = Vec::with_capacity(t.rows());
    for i in 0..t.rows() {
        records.push(ResultRecord {
            seed,
            mode: modes[i].parse().map_err(|e| anyhow::anyhow!("{}: row {i}: {e}", t.path))?,
            unit: units[i].clone(),
            unit_index: unit_index[i],
            units: unit_sets[i].clone(),
            source_epoch: source_epoch[i],
            draw: draw[i],
            bn_stats: bn[i].clone(),
            test_error: test[i],
            train_error: train[i],
        });
    }
    if !records.iter().any(|r| r.mode == RowMode::Baseline) {
        bail!("{}: has no baseline row (mode = 'baseline'): not a complete reset-eval result", t.path);
    }
    let config_hash = t
        .metadata
        .get("config_hash")
        .with_context(|| format!("{}: no 'config_hash' in the key-value metadata: not written by reset-eval", t.path))?
        .clone();
    let mut settings = match t.metadata.get("config") {
        Some(text) => {
            serde_json::from_str(text).with_context(|| format!("{}: metadata 'config' is not JSON", t.path))?
        }
        None => Value::Null,
    };
    if let Value::Object(map) = &mut settings {
        map.remove("seed");
    }
    Ok(SeedResults {
        seed,
        path: path.to_path_buf(),
        dataset: dataset.first().cloned().unwrap_or_default(),
        arch: arch.first().cloned().unwrap_or_default(),
        config_hash,
        settings,
        layerlab_version: t.metadata.get("layerlab_version").cloned().unwrap_or_default(),
        device: t.metadata.get("device").cloned().unwrap_or_default(),
        records,
    })
}

/// Reads one seed's `movement.parquet`.
pub fn read_movement(path: &Path, seed: u64) -> Result<Vec<MovementRecord>> {
    let t = ReadTable::read(path)?;
    let unit_index = t.ints("unit_index")?;
    let unit = required(t.texts("unit")?, &t, "unit")?;
    let epoch = required(t.ints("epoch")?, &t, "epoch")?;
    let rel = t.floats("l2_to_init_rel")?;
    Ok((0..t.rows())
        .map(|i| MovementRecord {
            seed,
            unit_index: unit_index[i],
            unit: unit[i].clone(),
            epoch: epoch[i],
            l2_to_init_rel: rel[i],
        })
        .collect())
}

/// Reads a snapshot's `units.parquet`: trainable values per unit.
pub fn read_unit_params(path: &Path) -> Result<BTreeMap<String, i64>> {
    let t = ReadTable::read(path)?;
    let unit = required(t.texts("unit")?, &t, "unit")?;
    let params = required(t.ints("params")?, &t, "params")?;
    Ok(unit.into_iter().zip(params).collect())
}

/// Dotted names of the leaves that differ between two JSON values.
pub fn differing_keys(a: &Value, b: &Value, prefix: &str) -> Vec<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    differing_keys(x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), &p)
                })
                .collect()
        }
        (x, y) if x == y => Vec::new(),
        _ => vec![if prefix.is_empty() { "(all)".into() } else { prefix.to_string() }],
    }
}

/// Refuses seeds whose results were made with different settings, naming both files.
pub fn check_same_settings(results: &[SeedResults]) -> Result<()> {
    let Some(first) = results.first() else { return Ok(()) };
    for other in &results[1..] {
        let differ = differing_keys(&first.settings, &other.settings, "");
        if !differ.is_empty() {
            bail!(
                "seeds {} and {} were run with different settings ({}): {} (config_hash {}) and {} (config_hash {}); \
                 rerun reset-eval for the stale seed",
                first.seed,
                other.seed,
                differ.join(", "),
                first.path.display(),
                first.config_hash,
                other.path.display(),
                other.config_hash
            );
        }
        if (&first.dataset, &first.arch) != (&other.dataset, &other.arch) {
            bail!(
                "seeds {} and {} differ in dataset or architecture: {} has {}/{}, {} has {}/{}",
                first.seed,
                other.seed,
                first.path.display(),
                first.dataset,
                first.arch,
                other.path.display(),
                other.dataset,
                other.arch
            );
        }
    }
    Ok(())
}

/// Finds and reads every seed of the experiment that has finished reset results.
///
/// A seed without results (or without a stamp, so unfinished) is skipped with a warning; results
/// made with other settings than the pipeline's now (a stale stamp) are refused, since combining
/// them would stamp old numbers as current.
pub fn load(layout: &Layout, exp: &Experiment) -> Result<Inputs> {
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    let mut stale = Vec::new();
    for &seed in &exp.seeds {
        let dir = layout.reset_dir(&exp.name, seed);
        let path = dir.join("results.parquet");
        if !path.exists() {
            let why = format!("no {}", path.display());
            tracing::warn!("seed {seed} skipped: {why} (reset-eval has not run for it)");
            skipped.push((seed, why));
            continue;
        }
        match cache::freshness(&dir, &cache::reset_key(exp, seed)) {
            Freshness::Fresh => {}
            Freshness::Missing => {
                let why = format!("{} has no stamp.json (reset-eval did not finish)", dir.display());
                tracing::warn!("seed {seed} skipped: {why}");
                skipped.push((seed, why));
                continue;
            }
            Freshness::Stale(why) => stale.push(format!("seed {seed} ({}): {why}", path.display())),
        }
        results.push(read_results(&path, seed)?);
    }
    check_same_settings(&results)?;
    if !stale.is_empty() {
        bail!(
            "experiment '{}': reset results are stale against the pipeline file: {}; rerun reset-eval for these seeds \
             (or `cargo xtask run-all`)",
            exp.name,
            stale.join("; ")
        );
    }
    if results.is_empty() {
        bail!(
            "experiment '{}': no reset results for any of its seeds {:?} under {}: run train, snapshot and reset-eval first",
            exp.name,
            exp.seeds,
            layout.experiment_runs_dir(&exp.name).display()
        );
    }
    let mut movement = Vec::new();
    let mut movement_missing = Vec::new();
    let mut unit_params = BTreeMap::new();
    for r in &results {
        let dir = layout.snapshot_dir(&exp.name, r.seed);
        let path = dir.join("movement.parquet");
        // Movement only feeds a figure and a column, so a missing or stale snapshot is a warning.
        let why = match cache::freshness(&dir, &cache::snapshot_key(exp, r.seed)) {
            Freshness::Fresh if path.exists() => None,
            Freshness::Fresh | Freshness::Missing => Some("snapshot has not finished".to_string()),
            Freshness::Stale(why) => Some(format!("snapshot is stale: {why}")),
        };
        match why {
            None => {
                movement.extend(read_movement(&path, r.seed)?);
                if unit_params.is_empty() {
                    unit_params = read_unit_params(&dir.join("units.parquet"))?;
                }
            }
            Some(why) => {
                tracing::warn!("seed {}: {why} ({}); its movement is left out", r.seed, path.display());
                movement_missing.push(r.seed);
            }
        }
    }
    let seeds = results.iter().map(|r| r.seed).collect();
    Ok(Inputs { seeds, results, movement, skipped, movement_missing, unit_params })
}
