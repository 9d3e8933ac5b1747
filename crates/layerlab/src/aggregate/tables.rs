//! The aggregate Parquet tables: `summary.parquet`, `robustness.parquet`, and the cross-experiment
//! `results/robustness.parquet` that concatenates every experiment's robustness table.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arrow_schema::DataType;
use sha2::{Digest, Sha256};

use super::summary::{RobustnessRow, SummaryRow, Verdict};
use crate::table::{provenance, Column, ReadTable, Table};

/// What every row of an experiment's tables shares.
pub struct Identity<'a> {
    pub experiment: &'a str,
    pub dataset: &'a str,
    pub arch: &'a str,
}

impl Identity<'_> {
    fn start(&self, n: usize) -> Table {
        Table::new()
            .col("experiment", Column::Text(vec![Some(self.experiment.to_string()); n]))
            .col("dataset", Column::Text(vec![Some(self.dataset.to_string()); n]))
            .col("arch", Column::Text(vec![Some(self.arch.to_string()); n]))
    }
}

fn text<T>(rows: &[T], f: impl Fn(&T) -> Option<String>) -> Column {
    Column::Text(rows.iter().map(f).collect())
}
fn int<T>(rows: &[T], f: impl Fn(&T) -> Option<i64>) -> Column {
    Column::Int(rows.iter().map(f).collect())
}
fn float<T>(rows: &[T], f: impl Fn(&T) -> Option<f64>) -> Column {
    Column::Float(rows.iter().map(f).collect())
}

/// Writes `summary.parquet`: one row per (unit, mode, bn_stats, source_epoch), baseline included.
pub fn write_summary(path: &Path, id: &Identity, rows: &[SummaryRow], meta: &[(String, String)]) -> Result<()> {
    id.start(rows.len())
        .nullable("unit", text(rows, |r| r.unit.clone()))
        .nullable("unit_index", int(rows, |r| r.unit_index))
        .col("units", text(rows, |r| Some(r.units.clone())))
        .col("mode", text(rows, |r| Some(r.mode.name().to_string())))
        .col("bn_stats", text(rows, |r| Some(r.bn_stats.clone())))
        .nullable("source_epoch", int(rows, |r| r.source_epoch))
        .col("n_seeds", int(rows, |r| Some(r.n_seeds as i64)))
        .col("n_rows", int(rows, |r| Some(r.n_rows as i64)))
        .col("test_error_mean", float(rows, |r| Some(r.test.mean)))
        .nullable("test_error_std", float(rows, |r| r.test.std))
        .nullable("test_error_ci95_low", float(rows, |r| r.test.ci95.map(|c| c.0)))
        .nullable("test_error_ci95_high", float(rows, |r| r.test.ci95.map(|c| c.1)))
        .col("baseline_test_error", float(rows, |r| Some(r.baseline_test)))
        .col("test_error_delta", float(rows, |r| Some(r.test_delta())))
        .col("train_error_mean", float(rows, |r| Some(r.train.mean)))
        .nullable("train_error_std", float(rows, |r| r.train.std))
        .nullable("train_error_ci95_low", float(rows, |r| r.train.ci95.map(|c| c.0)))
        .nullable("train_error_ci95_high", float(rows, |r| r.train.ci95.map(|c| c.1)))
        .col("baseline_train_error", float(rows, |r| Some(r.baseline_train)))
        .col("train_error_delta", float(rows, |r| Some(r.train_delta())))
        .write(path, meta)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `robustness.parquet`: one row per unit × bn_stats.
pub fn write_robustness(path: &Path, id: &Identity, rows: &[RobustnessRow], meta: &[(String, String)]) -> Result<()> {
    let verdict = |pick: fn(&RobustnessRow) -> Option<Verdict>| {
        (
            float(rows, move |r| pick(r).map(|v| v.error)),
            float(rows, move |r| pick(r).map(|v| v.delta)),
            float(rows, move |r| pick(r).and_then(|v| v.damage)),
            text(rows, move |r| pick(r).map(|v| v.class().to_string())),
        )
    };
    let (re_err, re_delta, re_damage, re_class) = verdict(|r| r.reinit);
    let (rr_err, rr_delta, rr_damage, rr_class) = verdict(|r| r.rerandomize);
    id.start(rows.len())
        .col("unit", text(rows, |r| Some(r.unit.clone())))
        .col("unit_index", int(rows, |r| Some(r.unit_index)))
        .col("bn_stats", text(rows, |r| Some(r.bn_stats.clone())))
        .col("n_seeds", int(rows, |r| Some(r.n_seeds as i64)))
        .col("baseline_test_error", float(rows, |r| Some(r.baseline)))
        .col("tolerance", float(rows, |r| Some(r.tolerance)))
        .col("chance_error", float(rows, |r| Some(r.chance)))
        .col("reinit_epoch", int(rows, |_| Some(0)))
        .nullable("reinit_test_error", re_err)
        .nullable("reinit_delta", re_delta)
        .nullable("reinit_damage", re_damage)
        .nullable("reinit_class", re_class)
        .nullable("rerandomize_test_error", rr_err)
        .nullable("rerandomize_delta", rr_delta)
        .nullable("rerandomize_damage", rr_damage)
        .nullable("rerandomize_class", rr_class)
        .nullable("l2_to_init_rel_final", float(rows, |r| r.final_movement))
        .nullable("params", int(rows, |r| r.params))
        .write(path, meta)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Every column of a table read back, as the writer's own column values.
pub(crate) fn columns_of(t: &ReadTable) -> Result<Vec<(String, Column, bool)>> {
    let schema = t.batch.schema();
    schema
        .fields()
        .iter()
        .map(|f| {
            let name = f.name();
            let c = match f.data_type() {
                DataType::Int64 => Column::Int(t.ints(name)?),
                DataType::Float64 => Column::Float(t.floats(name)?),
                DataType::Utf8 => Column::Text(t.texts(name)?),
                DataType::Boolean => Column::Bool(t.bools(name)?),
                other => anyhow::bail!("{}: column '{name}' has type {other}, not one layerlab writes", t.path),
            };
            Ok((name.clone(), c, f.is_nullable()))
        })
        .collect()
}

pub(crate) fn append(into: &mut Column, from: Column) {
    match (into, from) {
        (Column::Int(a), Column::Int(b)) => a.extend(b),
        (Column::Float(a), Column::Float(b)) => a.extend(b),
        (Column::Text(a), Column::Text(b)) => a.extend(b),
        (Column::Bool(a), Column::Bool(b)) => a.extend(b),
        // The schemas were compared before appending, so the types always match here.
        _ => {}
    }
}

fn signature(cols: &[(String, Column, bool)]) -> Vec<(String, std::mem::Discriminant<Column>)> {
    cols.iter().map(|(n, c, _)| (n.clone(), std::mem::discriminant(c))).collect()
}

/// Concatenates every `<results_root>/*/robustness.parquet` into `<results_root>/robustness.parquet`.
///
/// `reference` is the table just written for this experiment: its columns define the schema, and
/// a table of another schema (from an older layerlab) is skipped with a warning rather than
/// failing this experiment. Returns the path written and the experiments it holds.
pub fn combine_robustness(results_root: &Path, reference: &Path) -> Result<(PathBuf, Vec<String>)> {
    let reference_cols = columns_of(&ReadTable::read(reference)?)?;
    let want = signature(&reference_cols);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(results_root)
        .with_context(|| format!("cannot list {}", results_root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("robustness.parquet").is_file())
        .collect();
    dirs.sort();
    let mut combined: Vec<(String, Column, bool)> =
        reference_cols.iter().map(|(n, c, _)| (n.clone(), empty_like(c), true)).collect();
    let mut hashes = serde_json::Map::new();
    let mut experiments = Vec::new();
    for dir in dirs {
        let path = dir.join("robustness.parquet");
        let table = match ReadTable::read(&path).and_then(|t| Ok((columns_of(&t)?, t.metadata))) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("{} left out of the cross-experiment table: {e:#}", path.display());
                continue;
            }
        };
        let (cols, metadata) = table;
        if signature(&cols) != want {
            tracing::warn!(
                "{} left out of the cross-experiment table: its columns differ from this layerlab's",
                path.display()
            );
            continue;
        }
        let name = metadata
            .get("experiment")
            .cloned()
            .unwrap_or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        hashes.insert(name.clone(), metadata.get("config_hash").cloned().unwrap_or_default().into());
        experiments.push(name);
        for (target, (_, c, _)) in combined.iter_mut().zip(cols) {
            append(&mut target.1, c);
        }
    }
    // Nullability follows the reference table, so that the combined file reads like the others.
    for (target, (_, _, nullable)) in combined.iter_mut().zip(&reference_cols) {
        target.2 = *nullable;
    }
    let config = serde_json::Value::Object(hashes).to_string();
    let hash = hex::encode(&Sha256::digest(config.as_bytes())[..8]);
    let mut meta = provenance("*", &config, &hash);
    meta.push(("experiments".into(), experiments.join(",")));
    let out = results_root.join("robustness.parquet");
    Table { columns: combined }.write(&out, &meta).with_context(|| format!("cannot write {}", out.display()))?;
    Ok((out, experiments))
}

pub(crate) fn empty_like(c: &Column) -> Column {
    match c {
        Column::Int(_) => Column::Int(Vec::new()),
        Column::Float(_) => Column::Float(Vec::new()),
        Column::Text(_) => Column::Text(Vec::new()),
        Column::Bool(_) => Column::Bool(Vec::new()),
    }
}
