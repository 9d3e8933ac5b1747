//! Resets: a trained network with one unit (or a set of units) put back to another state, and the
//! evaluation of many such variants with prefix reuse.
//!
//! Only the reset units and what follows them change, so the activations entering the first reset
//! unit are the trained network's. They are computed once per batch and fed to every variant of
//! that unit (every checkpoint τ and every draw).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::data::Split;
use crate::eval::{batch_f32, batch_tensors, fast_plan, Accumulator, Metrics};
use crate::mlp::MlpForward;
use crate::model::{loss_and_errors, Architecture, BnMode, State, Unit};
use layerlab_pipeline::ComputePath;

/// How BatchNorm running statistics are treated when a unit is reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnStats {
    /// Running statistics are reset with the unit's other tensors.
    WithLayer,
    /// The trained running statistics are kept.
    Keep,
    /// Reset with the unit, then recomputed on training batches for every BatchNorm from the
    /// first reset unit on (those before it see unchanged inputs).
    Recalibrate,
    /// The network has no BatchNorm.
    None,
}

impl BnStats {
    pub fn parse(s: &str) -> Result<BnStats> {
        Ok(match s {
            "with-layer" => BnStats::WithLayer,
            "keep" => BnStats::Keep,
            "recalibrate" => BnStats::Recalibrate,
            "none" => BnStats::None,
            other => bail!("unknown BatchNorm setting '{other}'"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            BnStats::WithLayer => "with-layer",
            BnStats::Keep => "keep",
            BnStats::Recalibrate => "recalibrate",
            BnStats::None => "none",
        }
    }
}

fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// `base` with every tensor of `units` taken from `source` (running statistics too, unless `keep`).
pub fn reset_units(base: &State, units: &[&Unit], source: &State, bn: BnStats) -> Result<State> {
    let mut out = base.clone();
    for unit in units {
        for spec in &unit.tensors {
            if bn == BnStats::Keep && is_running_stat(&spec.name) {
                continue;
            }
            let t = source
                .get(&spec.name)
                .with_context(|| format!("source state lacks tensor '{}' of unit {}", spec.name, unit.name))?;
            out.insert(spec.name.clone(), t.clone());
        }
    }
    Ok(out)
}

/// The examples a grid is measured on, and how they are batched.
pub struct EvalSet<'a> {
    pub split: &'a Split,
    pub indices: Vec<usize>,
    pub batch: usize,
}

/// Training batches used to recompute BatchNorm statistics.
pub struct Calibration<'a> {
    pub split: &'a Split,
    pub batches: Vec<Vec<usize>>,
}

/// Running statistics recomputed as a cumulative average over calibration batches (PyTorch's
/// `momentum=None`), for every BatchNorm in layers `from..`.
fn recalibrate(arch: &Architecture, state: &mut State, prefixes: &[Tensor], from: usize) -> Result<()> {
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    for x in prefixes {
        let mut updates = Vec::new();
        arch.forward_range(state, x, from, arch.layers.len(), BnMode::Calibrate(&mut updates))?;
        for (name, t) in updates {
            let entry = match sums.remove(&name) {
                Some(s) => (s + t)?,
                None => t,
            };
            sums.insert(name, entry);
        }
    }
    let n = prefixes.len().max(1) as f64;
    for (name, sum) in sums {
        state.insert(name, (sum / n)?);
    }
    Ok(())
}

/// One variant of the network to evaluate: a name for the caller and its full state.
pub struct Variant {
    pub state: State,
}

/// Evaluates every variant (all sharing the trained weights before layer `entry`) on `set`,
/// computing the shared prefix once per batch. With `calibration`, each variant's BatchNorm
/// statistics from `entry` on are recomputed first.
pub fn evaluate_variants(
    arch: &Architecture,
    trained: &State,
    entry: usize,
    variants: &mut [Variant],
    sets: &[&EvalSet<'_>],
    calibration: Option<&Calibration<'_>>,
    device: &Device,
    path: ComputePath,
    mut on_progress: impl FnMut(),
) -> Result<Vec<Vec<Metrics>>> {
    if let Some(cal) = calibration {
        let mut prefixes = Vec::with_capacity(cal.batches.len());
        for b in &cal.batches {
            let (x, _) = batch_tensors(cal.split, b, device)?;
            prefixes.push(arch.forward_range(trained, &x, 0, entry, BnMode::Eval)?);
        }
        for v in variants.iter_mut() {
            recalibrate(arch, &mut v.state, &prefixes, entry)?;
        }
    }
    let mut results = Vec::with_capacity(sets.len());
    if let (Some(plan), None) = (fast_plan(arch, device, path), calibration) {
        let from = plan.dense_before(entry);
        let mut shared = MlpForward::new(&plan, trained)?;
        let mut nets = variants.iter().map(|v| MlpForward::new(&plan, &v.state)).collect::<Result<Vec<_>>>()?;
        let mut x = Vec::new();
        for set in sets {
            let mut accs = vec![Accumulator::default(); variants.len()];
            for chunk in set.indices.chunks(set.batch.max(1)) {
                let labels = batch_f32(set.split, chunk, &mut x);
                let prefix: &[f32] = if from == 0 { &x } else { shared.run(&x, chunk.len(), 0, from) };
                for (net, acc) in nets.iter_mut().zip(accs.iter_mut()) {
                    let (loss, errors) = net.loss_and_errors_from(prefix, &labels, from);
                    acc.add(loss, errors, chunk.len());
                }
            }
            results.push(accs.iter().map(Accumulator::metrics).collect());
            on_progress();
        }
        return Ok(results);
    }
    for set in sets {
        let mut accs = vec![Accumulator::default(); variants.len()];
        for chunk in set.indices.chunks(set.batch.max(1)) {
            let (x, y) = batch_tensors(set.split, chunk, device)?;
            let prefix = arch.forward_range(trained, &x, 0, entry, BnMode::Eval)?;
            for (v, acc) in variants.iter().zip(accs.iter_mut()) {
                let logits = arch.forward_range(&v.state, &prefix, entry, arch.layers.len(), BnMode::Eval)?;
                let (loss, errors) = loss_and_errors(&logits, &y)?;
                acc.add(loss.to_scalar::<f32>()? as f64, errors, chunk.len());
            }
        }
        results.push(accs.iter().map(Accumulator::metrics).collect());
        on_progress();
    }
    Ok(results)
}

/// The first top-level layer touched by any of `units`.
pub fn entry_layer(units: &[&Unit]) -> usize {
    units.iter().map(|u| u.entry_layer).min().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::initial_state;
    use layerlab_pipeline::ModelConfig;

    fn arch(name: &str) -> Architecture {
        let cfg = ModelConfig {
            arch: name.into(),
            depth: 2,
            width: 16,
            width_mult: 0.125,
            batch_norm: true,
            pad_to: 32,
            init: "pytorch".into(),
        };
        Architecture::build(&cfg, [1, 28, 28], 10).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn reset_changes_exactly_the_units_tensors() {
        let a = arch("vgg11");
        let trained = initial_state(&a, 1, &Device::Cpu).unwrap();
        let source = initial_state(&a, 2, &Device::Cpu).unwrap();
        for bn in [BnStats::WithLayer, BnStats::Keep] {
            let unit = a.unit("conv3").unwrap();
            let out = reset_units(&trained, &[unit], &source, bn).unwrap();
            for (name, t) in &out {
                let owned = unit.tensors.iter().any(|s| &s.name == name);
                let from_source = owned && !(bn == BnStats::Keep && is_running_stat(name));
                let expected = if from_source { &source[name] } else { &trained[name] };
                assert_eq!(bits(t), bits(expected), "{name} under {bn:?}");
            }
            assert_eq!(out.len(), trained.len());
        }
    }

    #[test]
    fn prefix_reuse_gives_the_full_forward_result_bit_for_bit() {
        let a = arch("fcn");
        let trained = initial_state(&a, 1, &Device::Cpu).unwrap();
        let split = Split {
            images: (0..20 * 784).map(|i| (i * 7 % 251) as u8).collect(),
            labels: (0..20).map(|i| (i % 10) as u8).collect(),
            channels: 1,
            height: 28,
            width: 28,
        };
        let set = EvalSet { split: &split, indices: (0..20).collect(), batch: 8 };
        let unit = a.unit("fc2").unwrap();
        let source = initial_state(&a, 5, &Device::Cpu).unwrap();
        let variant = reset_units(&trained, &[unit], &source, BnStats::None).unwrap();
        let full =
            crate::eval::evaluate(&a, &variant, &split, &set.indices, 8, &Device::Cpu, ComputePath::Fast).unwrap();
        let mut variants = vec![Variant { state: variant }];
        let got = evaluate_variants(
            &a,
            &trained,
            unit.entry_layer,
            &mut variants,
            &[&set],
            None,
            &Device::Cpu,
            ComputePath::Fast,
            || {},
        )
        .unwrap();
        assert_eq!(got[0][0], full);
        // With nothing after the entry (reset-eval's baseline), the shared prefix is the output.
        let trained_full =
            crate::eval::evaluate(&a, &trained, &split, &set.indices, 8, &Device::Cpu, ComputePath::Fast).unwrap();
        let mut same = vec![Variant { state: trained.clone() }];
        let got = evaluate_variants(
            &a,
            &trained,
            a.layers.len(),
            &mut same,
            &[&set],
            None,
            &Device::Cpu,
            ComputePath::Fast,
            || {},
        )
        .unwrap();
        assert_eq!(got[0][0], trained_full);
    }
}
