//! Resets: a trained network with one unit (or a set of units) put back to another state, and the
//! evaluation of many such variants with prefix reuse.
//!
//! Only the reset units and what follows them change, so the activations entering the first reset
//! unit are the trained network's. They are computed once per batch and fed to every variant of
//! that unit (every checkpoint τ and every draw).

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, TensorId};

use crate::aggregate::summary::is_robust;
use crate::batchnorm::is_running_stat;
use crate::eval::{EvalSet, Metrics};
use crate::exec::Executor;
use crate::model::{Architecture, State, Unit};
use layerlab_pipeline::{BnStats, Experiment, ResetConfig, ResetMode, ROBUST_SET};

/// The name a BatchNorm setting has in the tables: `reset.bn_stats`'s, or `none` for a network
/// without BatchNorm (which is evaluated under no setting, `None`).
pub fn bn_label(bn: Option<BnStats>) -> &'static str {
    bn.map_or("none", BnStats::name)
}

/// `base` with every tensor of `units` taken from `source` (running statistics too, unless `keep`).
/// `bn` is `None` for a network without BatchNorm.
pub fn reset_units(base: &State, units: &[&Unit], source: &State, bn: Option<BnStats>) -> Result<State> {
    let mut out = base.clone();
    for unit in units {
        for spec in &unit.tensors {
            if bn == Some(BnStats::Keep) && is_running_stat(&spec.name) {
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

/// The joint sets of an experiment: `all-but-first`, the configured ones, and the suffixes.
pub fn joint_sets(exp: &Experiment, arch: &Architecture) -> Result<Vec<(String, Vec<String>)>> {
    let names: Vec<String> = arch.units.iter().map(|u| u.name.clone()).collect();
    let mut sets = Vec::new();
    if names.len() > 1 {
        sets.push(("all-but-first".to_string(), names[1..].to_vec()));
    }
    for (set, units) in &exp.reset.joint_sets {
        for u in units {
            if !names.contains(u) {
                bail!(
                    "experiment '{}': joint set '{set}' names unit '{u}', which {} does not have (units: {})",
                    exp.name,
                    arch.name,
                    names.join(", ")
                );
            }
        }
        sets.push((set.clone(), units.clone()));
    }
    if exp.reset.joint_suffixes {
        for d in 0..names.len() {
            sets.push((format!("from-{}", names[d]), names[d..].to_vec()));
        }
    }
    Ok(sets)
}

/// What a group of variants resets.
#[derive(Debug, Clone, Copy)]
pub enum GroupKind<'a> {
    /// One unit alone: re-initialized to every kept checkpoint, and re-randomized.
    Single(&'a Unit),
    /// A joint set: every unit in it re-initialized to each checkpoint together, and
    /// re-randomized together.
    Set,
    /// A step of the growth curve: the units re-initialized together to τ = 0.
    Growth,
}

/// A group of variants that share one prefix (the activations entering its first unit).
pub struct Group<'a> {
    pub kind: GroupKind<'a>,
    /// The unit's name, the joint set's, or the growth step's (`first-3`).
    pub name: String,
    pub units: Vec<&'a Unit>,
}

impl<'a> Group<'a> {
    /// The unit, when the group resets one unit alone.
    pub fn single(&self) -> Option<&'a Unit> {
        match self.kind {
            GroupKind::Single(unit) => Some(unit),
            GroupKind::Set | GroupKind::Growth => None,
        }
    }
}

/// The groups known before anything is evaluated: every unit alone (when `reinit` or
/// `rerandomize` is on), then every configured and built-in joint set (when `joint` or
/// `joint-rerandomize` is on). The robust set and the growth curve follow from the single units'
/// results: [`robust_set`], [`growth`].
pub fn groups<'a>(
    arch: &'a Architecture,
    sets: &[(String, Vec<String>)],
    modes: &[ResetMode],
) -> Result<Vec<Group<'a>>> {
    let (mut singles, mut joint) = (false, false);
    for mode in modes {
        match mode {
            ResetMode::Reinit | ResetMode::Rerandomize => singles = true,
            ResetMode::Joint | ResetMode::JointRerandomize => joint = true,
            ResetMode::Growth => {}
        }
    }
    let mut out = Vec::new();
    if singles {
        out.extend(arch.units.iter().map(|u| Group {
            kind: GroupKind::Single(u),
            name: u.name.clone(),
            units: vec![u],
        }));
    }
    if joint {
        for (name, units) in sets {
            let units = units.iter().map(|n| arch.unit(n)).collect::<Result<_>>()?;
            out.push(Group { kind: GroupKind::Set, name: name.clone(), units });
        }
    }
    Ok(out)
}

/// The joint set (named [`ROBUST_SET`]) of the units robust on their own: those whose
/// re-initialization to τ = 0 raised the test error by at most `tolerance` over `baseline`.
/// `own_error`: each unit's test error when re-initialized alone to τ = 0, by unit index. `None`
/// when no unit is robust alone.
pub fn robust_set<'a>(
    arch: &'a Architecture,
    own_error: &BTreeMap<usize, f64>,
    baseline: f64,
    tolerance: f64,
) -> Option<Group<'a>> {
    let units: Vec<&Unit> = arch
        .units
        .iter()
        .filter(|u| own_error.get(&u.index).is_some_and(|&e| is_robust(e - baseline, tolerance)))
        .collect();
    (!units.is_empty()).then(|| Group { kind: GroupKind::Set, name: ROBUST_SET.to_string(), units })
}

/// The growth curve's steps: the units ordered by their own test error at τ = 0 (least damaging
/// first; ties in network order), and step k re-initializes the first k together (`first-k`).
/// Units without an error of their own in `own_error` are left out.
pub fn growth<'a>(arch: &'a Architecture, own_error: &BTreeMap<usize, f64>) -> Vec<Group<'a>> {
    let mut order: Vec<(&Unit, f64)> =
        arch.units.iter().filter_map(|u| own_error.get(&u.index).map(|&e| (u, e))).collect();
    order.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.index.cmp(&b.0.index)));
    (1..=order.len())
        .map(|k| Group {
            kind: GroupKind::Growth,
            name: format!("first-{k}"),
            units: order[..k].iter().map(|(u, _)| *u).collect(),
        })
        .collect()
}

/// What a variant is, for its result row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VariantLabel {
    pub mode: ResetMode,
    pub source_epoch: Option<i64>,
    pub draw: Option<i64>,
}

/// The variants of one group under one BatchNorm setting, in the order of their rows: the group
/// reset to every kept checkpoint (`reinit` for a unit, `joint` for a set), then each
/// re-randomization draw (`rerandomize` or `joint-rerandomize`, a unit's values from
/// `draw(unit, draw)`); a growth step reset to τ = 0 (`growth`).
pub fn variants(
    group: &Group<'_>,
    bn: Option<BnStats>,
    trained: &State,
    checkpoints: &BTreeMap<u32, State>,
    settings: &ResetConfig,
    mut draw: impl FnMut(&Unit, u32) -> Result<State>,
) -> Result<(Vec<Variant>, Vec<VariantLabel>)> {
    let mut variants = Vec::new();
    let mut labels = Vec::new();
    // In the order of `ResetMode::ALL`, the order of the rows; each mode contributes to one kind
    // of group.
    for &mode in ResetMode::ALL.iter().filter(|m| settings.modes.contains(m)) {
        match (mode, group.kind) {
            (ResetMode::Reinit, GroupKind::Single(_)) | (ResetMode::Joint, GroupKind::Set) => {
                for (&epoch, source) in checkpoints {
                    variants.push(Variant { state: reset_units(trained, &group.units, source, bn)? });
                    labels.push(VariantLabel { mode, source_epoch: Some(epoch as i64), draw: None });
                }
            }
            (ResetMode::Rerandomize, GroupKind::Single(_)) | (ResetMode::JointRerandomize, GroupKind::Set) => {
                for d in 0..settings.draws {
                    // Each unit takes the draw it takes alone, so a set's draw d is its units' draws d.
                    let mut source = State::new();
                    for unit in &group.units {
                        source.extend(draw(unit, d)?);
                    }
                    variants.push(Variant { state: reset_units(trained, &group.units, &source, bn)? });
                    labels.push(VariantLabel { mode, source_epoch: None, draw: Some(d as i64) });
                }
            }
            (ResetMode::Growth, GroupKind::Growth) => {
                if let Some(initial) = checkpoints.get(&0) {
                    variants.push(Variant { state: reset_units(trained, &group.units, initial, bn)? });
                    labels.push(VariantLabel { mode, source_epoch: Some(0), draw: None });
                }
            }
            (ResetMode::Reinit | ResetMode::Rerandomize, GroupKind::Set | GroupKind::Growth)
            | (ResetMode::Joint | ResetMode::JointRerandomize, GroupKind::Single(_) | GroupKind::Growth)
            | (ResetMode::Growth, GroupKind::Single(_) | GroupKind::Set) => {}
        }
    }
    Ok((variants, labels))
}

/// One variant of the network to evaluate: a name for the caller and its full state.
pub struct Variant {
    pub state: State,
}

/// Evaluates every variant on `sets` with `executor` (see [`Executor::evaluate_variants`]):
/// the metrics per set, then per variant.
pub fn evaluate_variants(
    executor: &dyn Executor,
    trained: &State,
    entry: usize,
    variants: &mut [Variant],
    sets: &[&EvalSet<'_>],
    calibration: Option<&EvalSet<'_>>,
    mut on_progress: impl FnMut(),
) -> Result<Vec<Vec<Metrics>>> {
    let mut states: Vec<State> = variants.iter_mut().map(|v| std::mem::take(&mut v.state)).collect();
    let result = executor.evaluate_variants(trained, entry, &mut states, sets, calibration, &mut on_progress);
    for (v, state) in variants.iter_mut().zip(states) {
        v.state = state;
    }
    result
}

/// The first top-level layer touched by any of `units`.
pub fn entry_layer(units: &[&Unit]) -> usize {
    units.iter().map(|u| u.entry_layer).min().unwrap_or(0)
}

/// What fixes a variant's metrics: the tensors its state holds (by identity, in name order) and
/// the layer its BatchNorm statistics are recalibrated from, where that recomputes any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VariantKey {
    tensors: Vec<TensorId>,
    recalibrated_from: Option<usize>,
}

impl VariantKey {
    fn of(arch: &Architecture, state: &State, recalibrate_from: Option<usize>) -> VariantKey {
        let recalibrated_from = recalibrate_from.filter(|&entry| recalibration_recomputes_statistics(arch, entry));
        VariantKey { tensors: state.values().map(Tensor::id).collect(), recalibrated_from }
    }
}

/// Whether recalibrating from layer `entry` on changes any running statistics: whether a unit
/// with BatchNorm is computed from there on.
fn recalibration_recomputes_statistics(arch: &Architecture, entry: usize) -> bool {
    arch.units.iter().any(|u| u.entry_layer >= entry && u.has_batch_norm())
}

/// The reset grid's evaluations, each distinct variant computed once.
///
/// Variants repeat: a unit reset to the final checkpoint is the trained network; a unit without
/// BatchNorm gives the same network under `with-layer` and `keep`, and under `recalibrate` too
/// when no BatchNorm follows it. A variant whose state holds the same tensors as one already
/// evaluated (and is recalibrated from the same layer, where recalibration changes anything)
/// takes that one's metrics. They are the same bits: the same tensors through the same kernels,
/// and prefix reuse gives the full forward pass's bits (tested below).
pub struct GridEvaluator<'a> {
    arch: &'a Architecture,
    trained: &'a State,
    sets: &'a [&'a EvalSet<'a>],
    calibration: &'a EvalSet<'a>,
    executor: &'a dyn Executor,
    prefix_reuse: bool,
    known: HashMap<VariantKey, Vec<Metrics>>,
    /// Variants given the metrics of an identical one.
    pub reused: usize,
}

impl<'a> GridEvaluator<'a> {
    /// An evaluator of `trained`'s variants on `sets` (each variant's metrics come one per set),
    /// recalibrating on `calibration` where a variant asks for it.
    pub fn new(
        arch: &'a Architecture,
        trained: &'a State,
        sets: &'a [&'a EvalSet<'a>],
        calibration: &'a EvalSet<'a>,
        executor: &'a dyn Executor,
        prefix_reuse: bool,
    ) -> GridEvaluator<'a> {
        GridEvaluator { arch, trained, sets, calibration, executor, prefix_reuse, known: HashMap::new(), reused: 0 }
    }

    /// The trained network's metrics, one per set.
    pub fn baseline(&mut self) -> Result<Vec<Metrics>> {
        let variant = Variant { state: self.trained.clone() };
        let key = VariantKey::of(self.arch, &variant.state, None);
        let metrics = self.run(self.arch.layers.len(), vec![variant], None)?.remove(0);
        self.known.insert(key, metrics.clone());
        Ok(metrics)
    }

    /// The metrics (one per set) of each of `group`'s variants, per BatchNorm setting, in the
    /// order given. Recalibration, under `recalibrate`, starts at the group's first unit.
    pub fn evaluate(
        &mut self,
        group: &Group<'_>,
        settings: Vec<(Option<BnStats>, Vec<Variant>)>,
    ) -> Result<Vec<Vec<Vec<Metrics>>>> {
        let entry = entry_layer(&group.units);
        let mut keys = Vec::with_capacity(settings.len());
        let mut queued = HashSet::new();
        // Variants to compute: as they are, and recalibrated first.
        let (mut plain, mut recalibrated) = (Vec::new(), Vec::new());
        for (bn, variants) in settings {
            let recalibrate_from = (bn == Some(BnStats::Recalibrate)).then_some(entry);
            let mut setting = Vec::with_capacity(variants.len());
            for variant in variants {
                let key = VariantKey::of(self.arch, &variant.state, recalibrate_from);
                if self.known.contains_key(&key) || !queued.insert(key.clone()) {
                    self.reused += 1;
                } else if key.recalibrated_from.is_some() {
                    recalibrated.push((key.clone(), variant));
                } else {
                    plain.push((key.clone(), variant));
                }
                setting.push(key);
            }
            keys.push(setting);
        }
        let plain_entry = if self.prefix_reuse { entry } else { 0 };
        for (entry, list, calibration) in [(plain_entry, plain, None), (entry, recalibrated, Some(self.calibration))] {
            if list.is_empty() {
                continue;
            }
            let (list_keys, variants): (Vec<_>, Vec<_>) = list.into_iter().unzip();
            let metrics = self.run(entry, variants, calibration)?;
            self.known.extend(list_keys.into_iter().zip(metrics));
        }
        Ok(keys.iter().map(|setting| setting.iter().map(|k| self.known[k].clone()).collect()).collect())
    }

    /// [`evaluate_variants`], its metrics per variant (one per set).
    fn run(
        &self,
        entry: usize,
        mut variants: Vec<Variant>,
        calibration: Option<&EvalSet<'_>>,
    ) -> Result<Vec<Vec<Metrics>>> {
        let per_set =
            evaluate_variants(self.executor, self.trained, entry, &mut variants, self.sets, calibration, || {})?;
        Ok(per_variant(&per_set))
    }
}

/// [`evaluate_variants`]'s metrics (per set, then per variant) per variant, then per set.
fn per_variant(per_set: &[Vec<Metrics>]) -> Vec<Vec<Metrics>> {
    let variants = per_set.first().map_or(0, Vec::len);
    (0..variants).map(|i| per_set.iter().map(|set| set[i]).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Split;
    use crate::exec;
    use crate::kernels::KernelOptions;
    use crate::test_support::bits;
    use candle_core::Device;
    use layerlab_pipeline::ComputePath;
    use layerlab_pipeline::ModelConfig;

    /// `examples` 28×28 one-channel images of made-up pixels (pixel i is i·step mod modulus) and
    /// labels (example i has i·label_step mod 10).
    fn images_28x28(examples: usize, step: usize, modulus: usize, label_step: usize) -> Split {
        Split {
            images: (0..examples * 784).map(|i| (i * step % modulus) as u8).collect(),
            labels: (0..examples).map(|i| (i * label_step % 10) as u8).collect(),
            channels: 1,
            height: 28,
            width: 28,
        }
    }

    fn arch(name: &str) -> Architecture {
        arch_at_width(name, 0.125)
    }

    fn arch_at_width(name: &str, width_mult: f64) -> Architecture {
        let cfg = ModelConfig {
            arch: name.parse().unwrap(),
            depth: 2,
            width: 16,
            width_mult,
            batch_norm: true,
            pad_to: 32,
            init: layerlab_pipeline::WeightInit::Pytorch,
        };
        Architecture::build(&cfg, [1, 28, 28], 10).unwrap()
    }

    #[test]
    fn reset_changes_exactly_the_units_tensors() {
        let a = arch("vgg11");
        let trained = a.initial_state(1, &Device::Cpu).unwrap();
        let source = a.initial_state(2, &Device::Cpu).unwrap();
        for bn in [BnStats::WithLayer, BnStats::Keep] {
            let unit = a.unit("conv3").unwrap();
            let out = reset_units(&trained, &[unit], &source, Some(bn)).unwrap();
            for (name, t) in &out {
                let owned = unit.tensors.iter().any(|s| &s.name == name);
                let from_source = owned && !(bn == BnStats::Keep && is_running_stat(name));
                let expected = if from_source { &source[name] } else { &trained[name] };
                assert_eq!(bits(t), bits(expected), "{name} under {bn:?}");
            }
            assert_eq!(out.len(), trained.len());
        }
    }

    /// Prefix reuse against a plain evaluation of each variant, on every compute path: the fully
    /// connected fast path, candle's path for the same network, and the convolutional networks
    /// (with BatchNorm, under each setting that changes what a variant holds).
    #[test]
    fn prefix_reuse_gives_the_full_forward_result_bit_for_bit() {
        let split = images_28x28(12, 7, 251, 1);
        let cases = [
            ("fcn", "fc2", ComputePath::Fast),
            ("fcn", "fc2", ComputePath::Autograd),
            ("vgg11", "conv3", ComputePath::Fast),
            ("vgg11", "conv3", ComputePath::Autograd),
            ("resnet18", "layer2.0.shortcut", ComputePath::Fast),
            ("resnet18", "layer2.0.shortcut", ComputePath::Autograd),
        ];
        for (name, unit_name, path) in cases {
            let a = arch(name);
            let trained = a.initial_state(1, &Device::Cpu).unwrap();
            let source = a.initial_state(5, &Device::Cpu).unwrap();
            let set = EvalSet::new(&split, (0..12).collect(), 5);
            let unit = a.unit(unit_name).unwrap();
            let settings =
                if a.has_batch_norm() { vec![Some(BnStats::WithLayer), Some(BnStats::Keep)] } else { vec![None] };
            for bn in settings {
                let variant = reset_units(&trained, &[unit], &source, bn).unwrap();
                let executor = exec::choose(&a, &Device::Cpu, path, KernelOptions::default());
                let full = executor.evaluate(&variant, &set).unwrap();
                let mut variants = vec![Variant { state: variant }];
                let got =
                    evaluate_variants(&*executor, &trained, unit.entry_layer, &mut variants, &[&set], None, || {})
                        .unwrap();
                assert!(unit.entry_layer > 0, "{name}: {unit_name} should have a prefix to reuse");
                assert_eq!(got[0][0].loss.to_bits(), full.loss.to_bits(), "{name} {path:?} {bn:?}");
                assert_eq!(got[0][0], full, "{name} {path:?} {bn:?}");
            }
            // With nothing after the entry (reset-eval's baseline), the shared prefix is the output.
            let executor = exec::choose(&a, &Device::Cpu, path, KernelOptions::default());
            let trained_full = executor.evaluate(&trained, &set).unwrap();
            let mut same = vec![Variant { state: trained.clone() }];
            let got = evaluate_variants(&*executor, &trained, a.layers.len(), &mut same, &[&set], None, || {}).unwrap();
            assert_eq!(got[0][0], trained_full, "{name} {path:?}");
        }
    }

    /// The CNN fast path ([`crate::cnn::CnnForward`]) against candle's ops on the same variants,
    /// with the BatchNorm statistics recalibrated first (so that evaluation runs on statistics
    /// that are not the initial zeros and ones): recalibrated statistics, losses and errors
    /// agree to float rounding.
    #[test]
    fn the_cnn_fast_path_agrees_with_candles_ops() {
        let split = images_28x28(16, 13, 253, 3);
        let calibration = EvalSet::new(&split, (0..14).collect(), 7);
        for (name, unit_name) in [("vgg11", "conv3"), ("resnet18", "layer2.0.shortcut")] {
            let a = arch(name);
            let trained = a.initial_state(1, &Device::Cpu).unwrap();
            let source = a.initial_state(5, &Device::Cpu).unwrap();
            let unit = a.unit(unit_name).unwrap();
            let variant = reset_units(&trained, &[unit], &source, Some(BnStats::Recalibrate)).unwrap();
            let set = EvalSet::new(&split, (0..16).collect(), 7);
            let run = |path| {
                let mut variants = vec![Variant { state: variant.clone() }];
                let executor = exec::choose(&a, &Device::Cpu, path, KernelOptions::default());
                let m = evaluate_variants(
                    &*executor,
                    &trained,
                    unit.entry_layer,
                    &mut variants,
                    &[&set],
                    Some(&calibration),
                    || {},
                )
                .unwrap();
                (m[0][0], variants.pop().unwrap().state)
            };
            let ((fast, fast_state), (slow, slow_state)) = (run(ComputePath::Fast), run(ComputePath::Autograd));
            assert!((fast.loss - slow.loss).abs() <= 1e-5 * slow.loss, "{name}: loss {} vs {}", fast.loss, slow.loss);
            assert_eq!(fast.error, slow.error, "{name}: error rate");
            let mut recalibrated = 0;
            for (k, t) in &slow_state {
                let (p, q) = (bits(&fast_state[k]), bits(t));
                let (p, q): (Vec<f32>, Vec<f32>) =
                    (p.into_iter().map(f32::from_bits).collect(), q.into_iter().map(f32::from_bits).collect());
                let scale = q.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let diff = p.iter().zip(&q).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(diff <= 1e-5 * scale, "{name}: {k} differs by {diff}");
                recalibrated += usize::from(is_running_stat(k) && bits(t) != bits(&variant[k]));
            }
            assert!(recalibrated >= 4, "{name}: only {recalibrated} running statistics were recomputed");
        }
    }

    #[test]
    fn the_variant_grid_follows_the_modes() {
        let a = arch("fcn");
        let trained = a.initial_state(1, &Device::Cpu).unwrap();
        let checkpoints: BTreeMap<u32, State> =
            [0, 1, 3].into_iter().map(|e| (e, a.initial_state(10 + e as u64, &Device::Cpu).unwrap())).collect();
        let sets = vec![("pair".to_string(), vec!["fc2".to_string(), "fc3".to_string()])];
        let modes = |m: &[&str]| m.iter().map(|s| s.parse::<ResetMode>().unwrap()).collect::<Vec<_>>();
        let settings = |m: &[&str]| ResetConfig { modes: modes(m), draws: 2, ..ResetConfig::default() };
        let draw = |u: &Unit, d: u32| {
            a.initial_state(100 + d as u64, &Device::Cpu)
                .map(|s| s.into_iter().filter(|(n, _)| u.tensors.iter().any(|t| &t.name == n)).collect::<State>())
        };
        let label = |mode, epoch: Option<i64>, draw: Option<i64>| VariantLabel { mode, source_epoch: epoch, draw };

        let all = settings(&["reinit", "rerandomize", "joint"]);
        let grid = groups(&a, &sets, &all.modes).unwrap();
        let names: Vec<&str> = grid.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["fc1", "fc2", "fc3", "pair"]);
        let (built, labels) = variants(&grid[1], None, &trained, &checkpoints, &all, draw).unwrap();
        assert_eq!(
            labels,
            [
                label(ResetMode::Reinit, Some(0), None),
                label(ResetMode::Reinit, Some(1), None),
                label(ResetMode::Reinit, Some(3), None),
                label(ResetMode::Rerandomize, None, Some(0)),
                label(ResetMode::Rerandomize, None, Some(1)),
            ]
        );
        // Re-initialization to epoch 1 changes fc2's tensors and nothing else.
        for (name, t) in &built[1].state {
            let want = if name.starts_with("fc2.") { &checkpoints[&1][name] } else { &trained[name] };
            assert_eq!(bits(t), bits(want), "{name}");
        }
        let (_, labels) = variants(&grid[3], None, &trained, &checkpoints, &all, draw).unwrap();
        assert_eq!(labels.iter().map(|l| l.mode).collect::<Vec<_>>(), [ResetMode::Joint; 3]);

        // Without reinit, single units are only re-randomized; without joint, no set is evaluated.
        let rerandomize = settings(&["rerandomize"]);
        let grid = groups(&a, &sets, &rerandomize.modes).unwrap();
        assert_eq!(grid.len(), 3);
        let (_, labels) = variants(&grid[0], None, &trained, &checkpoints, &rerandomize, draw).unwrap();
        assert_eq!(
            labels,
            [label(ResetMode::Rerandomize, None, Some(0)), label(ResetMode::Rerandomize, None, Some(1))]
        );
        assert!(groups(&a, &sets, &modes(&["joint"])).unwrap().iter().all(|g| g.single().is_none()));
    }

    /// The robust set holds exactly the units within the tolerance of the baseline; the growth
    /// curve adds units least damaging first (ties in network order); a set's draw d is its
    /// units' own draws d; growth resets to τ = 0 only.
    #[test]
    fn robust_set_growth_and_joint_draws_follow_each_units_own_results() {
        let a = arch("fcn");
        fn names<'a>(g: &Group<'a>) -> Vec<&'a str> {
            g.units.iter().map(|&u| u.name.as_str()).collect()
        }
        // fc1 critical, fc2 exactly at the tolerance, fc3 below the baseline (index order: fc1..fc3).
        let own: BTreeMap<usize, f64> = [(0, 0.70), (1, 0.07), (2, 0.01)].into_iter().collect();
        let robust = robust_set(&a, &own, 0.02, 0.05).unwrap();
        assert_eq!(robust.name, ROBUST_SET);
        assert_eq!(names(&robust), ["fc2", "fc3"]);
        assert!(robust_set(&a, &own, 0.02, 0.049).map(|g| names(&g)) == Some(vec!["fc3"]));
        assert!(robust_set(&a, &[(0, 0.9)].into_iter().collect(), 0.02, 0.05).is_none());
        let steps = growth(&a, &own);
        assert_eq!(steps.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["first-1", "first-2", "first-3"]);
        assert_eq!(names(&steps[2]), ["fc3", "fc2", "fc1"]);
        let tied: BTreeMap<usize, f64> = [(0, 0.5), (1, 0.5), (2, 0.1)].into_iter().collect();
        assert_eq!(names(&growth(&a, &tied)[2]), ["fc3", "fc1", "fc2"]);

        let trained = a.initial_state(1, &Device::Cpu).unwrap();
        let checkpoints: BTreeMap<u32, State> =
            [0, 2].into_iter().map(|e| (e, a.initial_state(10 + e as u64, &Device::Cpu).unwrap())).collect();
        let draw = |u: &Unit, d: u32| u.draw(1000 * u.index as u64 + d as u64, &Device::Cpu);
        let settings = ResetConfig { modes: ResetMode::ALL.to_vec(), draws: 2, ..ResetConfig::default() };
        let (built, labels) = variants(&robust, None, &trained, &checkpoints, &settings, draw).unwrap();
        let modes: Vec<ResetMode> = labels.iter().map(|l| l.mode).collect();
        assert_eq!(
            modes,
            [ResetMode::Joint, ResetMode::Joint, ResetMode::JointRerandomize, ResetMode::JointRerandomize]
        );
        for (variant, label) in built.iter().zip(&labels).skip(2) {
            let d = label.draw.unwrap() as u32;
            for (name, t) in &variant.state {
                let owner = a.units.iter().find(|u| u.tensors.iter().any(|s| &s.name == name)).unwrap();
                let want = if ["fc2", "fc3"].contains(&owner.name.as_str()) {
                    draw(owner, d).unwrap()[name].clone()
                } else {
                    trained[name].clone()
                };
                assert_eq!(bits(t), bits(&want), "{name}, draw {d}");
            }
        }
        let (built, labels) = variants(&steps[1], None, &trained, &checkpoints, &settings, draw).unwrap();
        assert_eq!(labels, [VariantLabel { mode: ResetMode::Growth, source_epoch: Some(0), draw: None }]);
        for (name, t) in &built[0].state {
            let reset = name.starts_with("fc3.") || name.starts_with("fc2.");
            assert_eq!(bits(t), bits(if reset { &checkpoints[&0][name] } else { &trained[name] }), "{name}");
        }
    }

    /// The grid's evaluator against each BatchNorm setting's variants evaluated together, as
    /// reset-eval did before repeats were found: the same metrics bit for bit, with the repeats
    /// computed once (the count is the rule's, worked out by hand below). VGG-11-BN's last units
    /// only, at width 1/16 and on the fast path, to keep the test short; the evaluator does not
    /// look at the path.
    #[test]
    fn identical_variants_are_evaluated_once_with_the_metrics_of_each() {
        let split = images_28x28(8, 11, 241, 7);
        let a = arch_at_width("vgg11", 0.0625);
        // Trained running statistics unlike the initial zeros and ones, so that `keep` and
        // `with-layer` differ wherever a unit has BatchNorm.
        let mut trained = a.initial_state(1, &Device::Cpu).unwrap();
        for (name, t) in trained.clone() {
            if name.ends_with(".running_mean") {
                trained.insert(name, (t + 0.05).unwrap());
            } else if name.ends_with(".running_var") {
                trained.insert(name, (t * 1.5).unwrap());
            }
        }
        let checkpoints: BTreeMap<u32, State> = [
            (0, a.initial_state(2, &Device::Cpu).unwrap()),
            (1, a.initial_state(3, &Device::Cpu).unwrap()),
            (2, trained.clone()),
        ]
        .into_iter()
        .collect();
        let settings = ResetConfig { modes: ResetMode::ALL.to_vec(), draws: 2, ..ResetConfig::default() };
        let (test, train) = (EvalSet::new(&split, (0..5).collect(), 3), EvalSet::new(&split, (3..8).collect(), 5));
        let calibration = EvalSet::new(&split, (0..6).collect(), 3);
        let sets = [&test, &train];
        let executor = exec::choose(&a, &Device::Cpu, ComputePath::Fast, KernelOptions::default());
        let mut grid = GridEvaluator::new(&a, &trained, &sets, &calibration, &*executor, true);
        let baseline = grid.baseline().unwrap();
        assert_eq!(baseline, sets.map(|s| executor.evaluate(&trained, s).unwrap()));

        let joint = [("last".to_string(), vec!["conv8".to_string()])];
        let last_units = ["conv7", "conv8", "fc", "last"];
        for group in groups(&a, &joint, &settings.modes).unwrap().iter().filter(|g| last_units.contains(&&*g.name)) {
            // One draw per unit and index, shared by the settings, as reset-eval does.
            let mut drawn = BTreeMap::new();
            let mut per_setting = Vec::new();
            for bn in [Some(BnStats::WithLayer), Some(BnStats::Keep), Some(BnStats::Recalibrate)] {
                let draw = |u: &Unit, d: u32| -> Result<State> {
                    Ok(drawn.entry(d).or_insert_with(|| u.draw(1000 + d as u64, &Device::Cpu).unwrap()).clone())
                };
                per_setting.push((bn, variants(group, bn, &trained, &checkpoints, &settings, draw).unwrap().0));
            }
            let together: Vec<Vec<Vec<Metrics>>> = per_setting
                .iter()
                .map(|(bn, vs)| {
                    let cal = (*bn == Some(BnStats::Recalibrate)).then_some(&calibration);
                    let mut copies: Vec<Variant> = vs.iter().map(|v| Variant { state: v.state.clone() }).collect();
                    let entry = entry_layer(&group.units);
                    let m = evaluate_variants(&*executor, &trained, entry, &mut copies, &sets, cal, || {}).unwrap();
                    per_variant(&m)
                })
                .collect();
            let got = grid.evaluate(group, per_setting).unwrap();
            assert_eq!(got, together, "{}", group.name);
            if group.name == "conv8" {
                // Different keys, different networks: the comparison above is not between equals.
                let epoch0 = |setting: usize| got[setting][0][0].loss;
                assert!(epoch0(0) != epoch0(1) && epoch0(0) != epoch0(2), "conv8's settings agree");
            }
        }
        // 3 checkpoints (the last is the trained network), 2 draws. Under `with-layer` and `keep`
        // every group's final checkpoint repeats the baseline (4 groups), and `last`'s other two
        // repeat conv8's; under `keep` fc (no BatchNorm) repeats its 4 others from `with-layer`;
        // under `recalibrate` fc's 5 repeat `with-layer`'s (nothing after it has BatchNorm) and
        // `last`'s 3 repeat conv8's.
        assert!(!a.unit("fc").unwrap().has_batch_norm() && a.unit("conv8").unwrap().has_batch_norm());
        assert_eq!(grid.reused, (4 + 2) + (4 + 2 + 4) + (5 + 3));
    }

    /// ResNet's units of one residual block enter at the block, so their recalibration starts
    /// there: the final checkpoint of `layer2.0.conv1` and of `layer2.0.shortcut`, recalibrated,
    /// are one network; of another block, another; `fc`'s recalibration changes nothing.
    #[test]
    fn units_of_one_residual_block_recalibrate_from_the_block() {
        let a = arch("resnet18");
        let trained = a.initial_state(1, &Device::Cpu).unwrap();
        let recalibrated = |unit: &str| VariantKey::of(&a, &trained, Some(a.unit(unit).unwrap().entry_layer));
        assert_eq!(recalibrated("layer2.0.conv1"), recalibrated("layer2.0.shortcut"));
        assert_ne!(recalibrated("layer2.0.conv2"), recalibrated("layer2.1.conv1"));
        assert!(recalibrated("layer4.1.conv2").recalibrated_from.is_some());
        assert_eq!(recalibrated("fc"), VariantKey::of(&a, &trained, None));
    }
}
