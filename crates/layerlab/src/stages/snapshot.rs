//! The `snapshot` stage: a training run's checkpoints → `units.parquet` and `movement.parquet`.
//!
//! Movement measures how far each unit's trainable values are from their initial ones at every
//! kept epoch. BatchNorm running statistics are not parameters and are left out.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::model::{Architecture, State};
use crate::stages::StageContext;
use crate::table::{provenance, with_device, Column, Table};
use crate::{checkpoint, data};
use layerlab_pipeline::cache::{Stage, Stamp};

pub enum Outcome {
    UpToDate,
    Written { units: usize, epochs: usize },
}

/// The network a run trained, built from the dataset's shape.
pub fn architecture(ctx: &StageContext) -> Result<Architecture> {
    let exp = &ctx.experiment;
    let dir = ctx.layout.dataset_dir(&exp.dataset);
    let test =
        data::read_split(&data::split_path(&dir, "test")).with_context(|| format!("dataset '{}'", exp.dataset))?;
    ctx.architecture(&test)
}

fn values(state: &State, names: &[&str]) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for n in names {
        let v: Vec<f32> = state[*n].flatten_all()?.to_vec1()?;
        out.extend(v.into_iter().map(f64::from));
    }
    Ok(out)
}

fn l2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt()
}

/// One row of `movement.parquet`: how far a unit's trainable tensors (or the whole network's, with
/// no `unit_index`) are from their initial values at one kept epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct MovementRow {
    pub unit_index: Option<i64>,
    pub unit: String,
    pub epoch: i64,
    pub l2_to_init: f64,
    /// `None` when the initial norm is 0.
    pub l2_to_init_rel: Option<f64>,
    pub linf_to_init: f64,
    pub l2_to_final: f64,
    pub l2_norm: f64,
}

/// Writes `movement.parquet`.
pub fn write_movement(
    path: &std::path::Path,
    experiment: &str,
    seed: u64,
    rows: &[MovementRow],
    meta: &[(String, String)],
) -> Result<()> {
    let n = rows.len();
    let float = |f: fn(&MovementRow) -> f64| Column::Float(rows.iter().map(|r| Some(f(r))).collect());
    Table::new()
        .col("experiment", Column::Text(vec![Some(experiment.to_string()); n]))
        .col("seed", Column::Int(vec![Some(seed as i64); n]))
        .nullable("unit_index", Column::Int(rows.iter().map(|r| r.unit_index).collect()))
        .col("unit", Column::Text(rows.iter().map(|r| Some(r.unit.clone())).collect()))
        .col("epoch", Column::Int(rows.iter().map(|r| Some(r.epoch)).collect()))
        .col("l2_to_init", float(|r| r.l2_to_init))
        .nullable("l2_to_init_rel", Column::Float(rows.iter().map(|r| r.l2_to_init_rel).collect()))
        .col("linf_to_init", float(|r| r.linf_to_init))
        .col("l2_to_final", float(|r| r.l2_to_final))
        .col("l2_norm", float(|r| r.l2_norm))
        .write(path, meta)
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(ctx: &StageContext, seed: u64) -> Result<Outcome> {
    ctx.check_seed(seed)?;
    let exp = &ctx.experiment;
    let (key, out_dir, fresh) = ctx.plan(Stage::Snapshot, seed);
    if fresh {
        return Ok(Outcome::UpToDate);
    }
    let t0 = Instant::now();
    let arch = architecture(ctx)?;
    let (dev, device_name) = ctx.compute_device()?;
    let checkpoints = checkpoint::load_run(&ctx.layout, &ctx.experiment, seed, &arch, &dev)?;
    Stamp::remove(&out_dir)?;
    let meta = with_device(provenance(&exp.name, &key.config.to_string(), &key.config_hash()), &device_name);

    write_units(&out_dir.join("units.parquet"), &exp.name, seed, &arch, &meta)?;

    // Rows: one per (unit or "all") × epoch.
    let mut groups: Vec<(Option<i64>, String, Vec<&str>)> = arch
        .units
        .iter()
        .map(|unit| {
            let names = unit.tensors.iter().filter(|t| t.trainable).map(|t| t.name.as_str()).collect();
            (Some(unit.index as i64), unit.name.clone(), names)
        })
        .collect();
    let all: Vec<&str> = groups.iter().flat_map(|g| g.2.iter().copied()).collect();
    groups.push((None, "all".to_string(), all));
    let (init_state, final_state) = (&checkpoints[0].1, &checkpoints[checkpoints.len() - 1].1);
    let mut rows = Vec::new();
    for (index, name, tensors) in &groups {
        let init = values(init_state, tensors)?;
        let fin = values(final_state, tensors)?;
        let init_norm = init.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (epoch, state) in &checkpoints {
            let now = values(state, tensors)?;
            let d = l2(&now, &init);
            rows.push(MovementRow {
                unit_index: *index,
                unit: name.clone(),
                epoch: *epoch as i64,
                l2_to_init: d,
                l2_to_init_rel: (init_norm > 0.0).then(|| d / init_norm),
                linf_to_init: now.iter().zip(&init).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max),
                l2_to_final: l2(&now, &fin),
                l2_norm: now.iter().map(|v| v * v).sum::<f64>().sqrt(),
            });
        }
    }
    write_movement(&out_dir.join("movement.parquet"), &exp.name, seed, &rows, &meta)?;
    Stamp::write_on(&out_dir, &key, t0.elapsed().as_secs_f64(), Some(&device_name))?;
    Ok(Outcome::Written { units: arch.units.len(), epochs: checkpoints.len() })
}

/// Writes `units.parquet`: one row per unit with its kind, tensors and trainable values.
pub fn write_units(
    path: &std::path::Path,
    experiment: &str,
    seed: u64,
    arch: &Architecture,
    meta: &[(String, String)],
) -> Result<()> {
    let mut u = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for unit in &arch.units {
        u.0.push(Some(unit.index as i64));
        u.1.push(Some(unit.name.clone()));
        u.2.push(Some(unit.kind.to_string()));
        u.3.push(Some(unit.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(",")));
        u.4.push(Some(unit.params() as i64));
    }
    let n = arch.units.len();
    Table::new()
        .col("experiment", Column::Text(vec![Some(experiment.to_string()); n]))
        .col("seed", Column::Int(vec![Some(seed as i64); n]))
        .col("unit_index", Column::Int(u.0))
        .col("unit", Column::Text(u.1))
        .col("kind", Column::Text(u.2))
        .col("tensors", Column::Text(u.3))
        .col("params", Column::Int(u.4))
        .write(path, meta)
}

/// Runs the stage and says in one line what it did.
pub fn describe(ctx: &StageContext, seed: u64) -> Result<String> {
    let name = &ctx.experiment.name;
    Ok(match run(ctx, seed)? {
        Outcome::UpToDate => format!("snapshot {name} seed {seed}: up to date"),
        Outcome::Written { units, epochs } => {
            format!("snapshot {name} seed {seed}: {units} units × {epochs} checkpoints")
        }
    })
}
