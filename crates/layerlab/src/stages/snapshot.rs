//! The `snapshot` stage: a training run's checkpoints → `units.parquet` and `movement.parquet`.
//!
//! Movement measures how far each unit's trainable values are from their initial ones at every
//! kept epoch. BatchNorm running statistics are not parameters and are left out.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::model::{Architecture, State};
use crate::stages::{device, StageContext};
use crate::table::{provenance, Column, Table};
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
    Architecture::build(&exp.model, [test.channels, test.height, test.width], data::classes(&exp.dataset))
}

/// Loads every kept checkpoint of a run, in epoch order.
pub fn load_checkpoints(ctx: &StageContext, seed: u64, arch: &Architecture) -> Result<Vec<(u32, State)>> {
    let exp = &ctx.experiment;
    let train_dir = ctx.layout.train_dir(&exp.name, seed);
    if Stamp::read(&train_dir).is_none() {
        anyhow::bail!("{} has no finished training run (no stamp.json): run train first", train_dir.display());
    }
    exp.checkpoint_epochs()
        .into_iter()
        .map(|epoch| {
            let path = ctx.layout.checkpoint(&exp.name, seed, epoch);
            let (state, meta) = checkpoint::load(&path, arch, &device())?;
            if meta.epoch != epoch || meta.seed != seed {
                anyhow::bail!(
                    "{} says epoch {} seed {}, expected epoch {epoch} seed {seed}",
                    path.display(),
                    meta.epoch,
                    meta.seed
                );
            }
            Ok((epoch, state))
        })
        .collect()
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

pub fn run(ctx: &StageContext, seed: u64) -> Result<Outcome> {
    ctx.check_seed(seed)?;
    let exp = &ctx.experiment;
    let (key, out_dir, fresh) = ctx.plan(Stage::Snapshot, seed);
    if fresh {
        return Ok(Outcome::UpToDate);
    }
    let t0 = Instant::now();
    let arch = architecture(ctx)?;
    let checkpoints = load_checkpoints(ctx, seed, &arch)?;
    Stamp::remove(&out_dir)?;
    let meta = provenance(&exp.name, &key.config.to_string(), &key.config_hash());

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
        .col("experiment", Column::Text(vec![Some(exp.name.clone()); n]))
        .col("seed", Column::Int(vec![Some(seed as i64); n]))
        .col("unit_index", Column::Int(u.0))
        .col("unit", Column::Text(u.1))
        .col("kind", Column::Text(u.2))
        .col("tensors", Column::Text(u.3))
        .col("params", Column::Int(u.4))
        .write(&out_dir.join("units.parquet"), &meta)?;

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
    let mut cols: (Vec<_>, Vec<_>, Vec<_>, Vec<_>, Vec<_>, Vec<_>, Vec<_>, Vec<_>) = Default::default();
    for (index, name, tensors) in &groups {
        let init = values(init_state, tensors)?;
        let fin = values(final_state, tensors)?;
        let init_norm = init.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (epoch, state) in &checkpoints {
            let now = values(state, tensors)?;
            let d = l2(&now, &init);
            cols.0.push(*index);
            cols.1.push(Some(name.clone()));
            cols.2.push(Some(*epoch as i64));
            cols.3.push(Some(d));
            cols.4.push(if init_norm > 0.0 { Some(d / init_norm) } else { None });
            cols.5.push(Some(now.iter().zip(&init).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)));
            cols.6.push(Some(l2(&now, &fin)));
            cols.7.push(Some(now.iter().map(|v| v * v).sum::<f64>().sqrt()));
        }
    }
    let rows = cols.0.len();
    Table::new()
        .col("experiment", Column::Text(vec![Some(exp.name.clone()); rows]))
        .col("seed", Column::Int(vec![Some(seed as i64); rows]))
        .nullable("unit_index", Column::Int(cols.0))
        .col("unit", Column::Text(cols.1))
        .col("epoch", Column::Int(cols.2))
        .col("l2_to_init", Column::Float(cols.3))
        .nullable("l2_to_init_rel", Column::Float(cols.4))
        .col("linf_to_init", Column::Float(cols.5))
        .col("l2_to_final", Column::Float(cols.6))
        .col("l2_norm", Column::Float(cols.7))
        .write(&out_dir.join("movement.parquet"), &meta)?;
    Stamp::write(&out_dir, &key, t0.elapsed().as_secs_f64())?;
    Ok(Outcome::Written { units: arch.units.len(), epochs: checkpoints.len() })
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
