//! Combining seeds: the summary (one row per unit × mode × BatchNorm setting × source epoch), the
//! robustness classification (one row per unit × BatchNorm setting) and the movement curves.
//!
//! Re-randomization draws are averaged within a seed first, so that every seed weighs the same and
//! the interval reflects the spread between trained networks, not between draws.

use layerlab_pipeline::{ResetMode, RowMode};
use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};

use super::inputs::{MovementRecord, ResultRecord};
use super::stats::Estimate;

/// One row of `summary.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    pub mode: RowMode,
    pub unit: Option<String>,
    pub unit_index: Option<i64>,
    pub units: String,
    pub bn_stats: String,
    pub source_epoch: Option<i64>,
    pub n_seeds: usize,
    /// Result rows pooled (draws × seeds for re-randomization, seeds otherwise).
    pub n_rows: usize,
    pub test: Estimate,
    pub train: Estimate,
    pub baseline_test: f64,
    pub baseline_train: f64,
}

impl SummaryRow {
    pub fn test_delta(&self) -> f64 {
        self.test.mean - self.baseline_test
    }
    pub fn train_delta(&self) -> f64 {
        self.train.mean - self.baseline_train
    }
    /// A single unit reset on its own (not the baseline, not a joint set).
    pub fn is_single(&self) -> bool {
        self.unit_index.is_some()
            && match self.mode {
                RowMode::Reset(ResetMode::Reinit | ResetMode::Rerandomize) => true,
                RowMode::Reset(ResetMode::Joint | ResetMode::JointRerandomize | ResetMode::Growth)
                | RowMode::Baseline => false,
            }
    }
}

type GroupKey = (RowMode, Option<String>, String, Option<i64>);

/// Groups result rows by (mode, unit, bn_stats, source_epoch), averages within each seed, then
/// summarises over seeds. Groups keep the order in which they first appear.
pub fn summarise<'a>(records: impl IntoIterator<Item = &'a ResultRecord>) -> Result<Vec<SummaryRow>> {
    let mut order: Vec<GroupKey> = Vec::new();
    let mut groups: HashMap<GroupKey, Vec<&ResultRecord>> = HashMap::new();
    for r in records {
        let key = (r.mode, r.unit.clone(), r.bn_stats.clone(), r.source_epoch);
        groups
            .entry(key.clone())
            .or_insert_with(|| {
                order.push(key);
                Vec::new()
            })
            .push(r);
    }
    let baseline_rows: Vec<&ResultRecord> =
        order.iter().filter(|k| k.0 == RowMode::Baseline).flat_map(|k| groups[k].iter().copied()).collect();
    if baseline_rows.is_empty() {
        bail!("no baseline rows (mode = 'baseline') among the results");
    }
    let (base_test, base_train) = per_seed(&baseline_rows);
    let base_test = Estimate::of(&base_test).map_or(f64::NAN, |e| e.mean);
    let base_train = Estimate::of(&base_train).map_or(f64::NAN, |e| e.mean);
    let mut out = Vec::with_capacity(order.len());
    for key in order {
        let rows = &groups[&key];
        let (test, train) = per_seed(rows);
        let (Some(test_est), Some(train_est)) = (Estimate::of(&test), Estimate::of(&train)) else { continue };
        let first = rows[0];
        out.push(SummaryRow {
            mode: key.0,
            unit: key.1,
            unit_index: first.unit_index,
            units: first.units.clone(),
            bn_stats: key.2,
            source_epoch: key.3,
            n_seeds: test.len(),
            n_rows: rows.len(),
            test: test_est,
            train: train_est,
            baseline_test: base_test,
            baseline_train: base_train,
        });
    }
    Ok(out)
}

/// Per-seed means of test and train error (seeds in ascending order).
fn per_seed(rows: &[&ResultRecord]) -> (Vec<f64>, Vec<f64>) {
    let mut by_seed: BTreeMap<u64, (f64, f64, usize)> = BTreeMap::new();
    for r in rows {
        let e = by_seed.entry(r.seed).or_insert((0.0, 0.0, 0));
        e.0 += r.test_error;
        e.1 += r.train_error;
        e.2 += 1;
    }
    by_seed.values().map(|&(t, tr, n)| (t / n as f64, tr / n as f64)).unzip()
}

/// The baseline summary row (the trained networks themselves).
pub fn baseline(summary: &[SummaryRow]) -> Option<&SummaryRow> {
    summary.iter().find(|r| r.mode == RowMode::Baseline)
}

/// BatchNorm settings of the single-unit resets, in the order the results list them.
pub fn bn_settings(summary: &[SummaryRow]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in summary.iter().filter(|r| r.is_single()) {
        if !out.contains(&r.bn_stats) {
            out.push(r.bn_stats.clone());
        }
    }
    out
}

/// Single units in network order (input first): (index, name).
pub fn units(summary: &[SummaryRow]) -> Vec<(i64, String)> {
    let mut out: BTreeMap<i64, String> = BTreeMap::new();
    for r in summary.iter().filter(|r| r.is_single()) {
        if let (Some(i), Some(u)) = (r.unit_index, &r.unit) {
            out.entry(i).or_insert_with(|| u.clone());
        }
    }
    out.into_iter().collect()
}

/// The robust/critical cut: a reset that raised the test error by `delta` is robust when `delta`
/// is at most `tolerance`. A tiny slack keeps a delta that equals the tolerance up to rounding on
/// the robust side.
pub fn is_robust(delta: f64, tolerance: f64) -> bool {
    delta <= tolerance + 1e-12
}

/// How one kind of reset treated a unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub error: f64,
    pub delta: f64,
    /// (error − baseline) / (chance − baseline): 0 is unharmed, 1 is as bad as guessing.
    pub damage: Option<f64>,
    pub robust: bool,
}

impl Verdict {
    fn new(error: f64, baseline: f64, chance: f64, tolerance: f64) -> Verdict {
        let delta = error - baseline;
        let headroom = chance - baseline;
        Verdict {
            error,
            delta,
            damage: (headroom > 0.0).then(|| delta / headroom),
            robust: is_robust(delta, tolerance),
        }
    }
    pub fn class(&self) -> &'static str {
        if self.robust {
            "robust"
        } else {
            "critical"
        }
    }
}

/// One row of `robustness.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct RobustnessRow {
    pub unit: String,
    pub unit_index: i64,
    pub bn_stats: String,
    pub n_seeds: usize,
    pub baseline: f64,
    pub tolerance: f64,
    pub chance: f64,
    /// Re-initialization to epoch 0 (the initial values).
    pub reinit: Option<Verdict>,
    pub rerandomize: Option<Verdict>,
    /// Mean over seeds of the unit's relative ℓ2 distance from its initial value at the last epoch.
    pub final_movement: Option<f64>,
    /// Trainable values the unit holds (`None` when no snapshot has finished).
    pub params: Option<i64>,
}

/// Classifies every single unit under every BatchNorm setting against `tolerance`.
pub fn classify(
    summary: &[SummaryRow],
    tolerance: f64,
    chance: f64,
    final_movement: &HashMap<String, f64>,
    unit_params: &BTreeMap<String, i64>,
) -> Vec<RobustnessRow> {
    let base = baseline(summary).map_or(f64::NAN, |b| b.test.mean);
    let mut out = Vec::new();
    for bn in bn_settings(summary) {
        for (index, unit) in units(summary) {
            let find = |mode: ResetMode, epoch: Option<i64>| {
                summary.iter().find(|r| {
                    r.mode == RowMode::Reset(mode)
                        && r.bn_stats == bn
                        && r.unit.as_deref() == Some(unit.as_str())
                        && r.source_epoch == epoch
                })
            };
            let reinit = find(ResetMode::Reinit, Some(0));
            let rerand = find(ResetMode::Rerandomize, None);
            let n_seeds = reinit.or(rerand).map_or(0, |r| r.n_seeds);
            out.push(RobustnessRow {
                unit: unit.clone(),
                unit_index: index,
                bn_stats: bn.clone(),
                n_seeds,
                baseline: base,
                tolerance,
                chance,
                reinit: reinit.map(|r| Verdict::new(r.test.mean, base, chance, tolerance)),
                rerandomize: rerand.map(|r| Verdict::new(r.test.mean, base, chance, tolerance)),
                final_movement: final_movement.get(&unit).copied(),
                params: unit_params.get(&unit).copied(),
            });
        }
    }
    out
}

/// One unit's movement curve: (epoch, mean over seeds of ‖w − w₀‖ / ‖w₀‖).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub unit: String,
    pub unit_index: Option<i64>,
    pub points: Vec<(i64, f64)>,
}

/// Mean relative distance from initialization per unit and epoch; units in network order, the
/// whole network ("all", no index) last.
pub fn movement_curves(records: &[MovementRecord]) -> Vec<Curve> {
    let mut acc: BTreeMap<(i64, String), BTreeMap<i64, (f64, usize)>> = BTreeMap::new();
    for r in records {
        let Some(v) = r.l2_to_init_rel else { continue };
        let key = (r.unit_index.unwrap_or(i64::MAX), r.unit.clone());
        let e = acc.entry(key).or_default().entry(r.epoch).or_insert((0.0, 0));
        e.0 += v;
        e.1 += 1;
    }
    acc.into_iter()
        .map(|((index, unit), points)| Curve {
            unit,
            unit_index: (index != i64::MAX).then_some(index),
            points: points.into_iter().map(|(epoch, (sum, n))| (epoch, sum / n as f64)).collect(),
        })
        .collect()
}

/// Each unit's movement at the last epoch of its curve.
pub fn final_movement(curves: &[Curve]) -> HashMap<String, f64> {
    curves.iter().filter_map(|c| Some((c.unit.clone(), c.points.last()?.1))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        seed: u64,
        mode: &str,
        unit: Option<(&str, i64)>,
        epoch: Option<i64>,
        draw: Option<i64>,
        test: f64,
    ) -> ResultRecord {
        ResultRecord {
            seed,
            mode: mode.parse().unwrap(),
            unit: unit.map(|u| u.0.to_string()),
            unit_index: if mode == "joint" { None } else { unit.map(|u| u.1) },
            units: unit.map_or(String::new(), |u| u.0.to_string()),
            source_epoch: epoch,
            draw,
            bn_stats: "none".into(),
            test_error: test,
            train_error: test / 2.0,
        }
    }

    /// A tiny two-unit table over three seeds, with values easy to work out by hand.
    fn tiny() -> Vec<ResultRecord> {
        let mut v = Vec::new();
        for (s, base) in [(0, 0.02), (1, 0.03), (2, 0.04)] {
            v.push(rec(s, "baseline", None, None, None, base));
            v.push(rec(s, "reinit", Some(("fc1", 0)), Some(0), None, 0.8 + 0.01 * s as f64));
            v.push(rec(s, "reinit", Some(("fc2", 1)), Some(0), None, base + 0.01));
            // Draws: seed s gives (0.5 + 0.1 s) and (0.7 + 0.1 s), whose mean is 0.6 + 0.1 s.
            v.push(rec(s, "rerandomize", Some(("fc1", 0)), None, Some(0), 0.5 + 0.1 * s as f64));
            v.push(rec(s, "rerandomize", Some(("fc1", 0)), None, Some(1), 0.7 + 0.1 * s as f64));
            v.push(rec(s, "rerandomize", Some(("fc2", 1)), None, Some(0), 0.09));
        }
        v
    }

    #[test]
    fn summary_by_hand() {
        let s = summarise(&tiny()).unwrap();
        let base = baseline(&s).unwrap();
        // Baseline 0.02, 0.03, 0.04: mean 0.03, s = 0.01, half-width 4.302653 · 0.01 / √3 = 0.024841.
        assert!((base.test.mean - 0.03).abs() < 1e-12);
        assert!((base.test.std.unwrap() - 0.01).abs() < 1e-12);
        let (lo, hi) = base.test.ci95.unwrap();
        assert!((hi - 0.03 - 0.024_841).abs() < 1e-5 && (0.03 - lo - 0.024_841).abs() < 1e-5);
        assert_eq!(base.test_delta(), 0.0);
        let fc1 = s.iter().find(|r| r.mode.name() == "reinit" && r.unit.as_deref() == Some("fc1")).unwrap();
        assert!((fc1.test.mean - 0.81).abs() < 1e-12);
        assert!((fc1.test_delta() - 0.78).abs() < 1e-12);
        assert!((fc1.train.mean - 0.405).abs() < 1e-12);
        assert!((fc1.train_delta() - (0.405 - 0.015)).abs() < 1e-12);
        assert_eq!((fc1.n_seeds, fc1.n_rows), (3, 3));
    }

    #[test]
    fn draws_are_averaged_within_a_seed_first() {
        let mut v = tiny();
        // A third draw for seed 0 only: seed 0's mean becomes (0.5 + 0.7 + 0.9) / 3 = 0.7, so the
        // mean over seeds is (0.7 + 0.7 + 0.8) / 3; pooling all rows would give 0.7 + 0.02 instead.
        v.push(rec(0, "rerandomize", Some(("fc1", 0)), None, Some(2), 0.9));
        let s = summarise(&v).unwrap();
        let r = s.iter().find(|r| r.mode.name() == "rerandomize" && r.unit.as_deref() == Some("fc1")).unwrap();
        assert!((r.test.mean - 2.2 / 3.0).abs() < 1e-12, "{}", r.test.mean);
        assert_eq!((r.n_seeds, r.n_rows), (3, 7));
        // Per-seed means 0.7, 0.7, 0.8: s = sqrt(((−1/30)² · 2 + (2/30)²) / 2) = 0.057735.
        assert!((r.test.std.unwrap() - 0.057_735).abs() < 1e-6);
    }

    #[test]
    fn one_seed_gives_no_interval() {
        let v: Vec<ResultRecord> = tiny().into_iter().filter(|r| r.seed == 1).collect();
        let s = summarise(&v).unwrap();
        assert!(s.iter().all(|r| r.n_seeds == 1 && r.test.ci95.is_none() && r.test.std.is_none()));
    }

    #[test]
    fn classification_follows_the_tolerance() {
        let s = summarise(&tiny()).unwrap();
        let moved = HashMap::from([("fc1".to_string(), 0.5)]);
        let rows = classify(&s, 0.05, 0.9, &moved, &BTreeMap::new());
        assert_eq!(rows.len(), 2);
        let (fc1, fc2) = (&rows[0], &rows[1]);
        assert_eq!((fc1.unit.as_str(), fc2.unit.as_str()), ("fc1", "fc2"));
        assert_eq!(fc1.reinit.unwrap().class(), "critical");
        assert_eq!(fc2.reinit.unwrap().class(), "robust");
        // fc2 re-randomized: 0.09 − 0.03 = 0.06 > 0.05 is critical; with a 0.1 tolerance it is robust.
        assert_eq!(fc2.rerandomize.unwrap().class(), "critical");
        assert_eq!(classify(&s, 0.1, 0.9, &moved, &BTreeMap::new())[1].rerandomize.unwrap().class(), "robust");
        // Damage: (0.81 − 0.03) / (0.9 − 0.03).
        assert!((fc1.reinit.unwrap().damage.unwrap() - 0.78 / 0.87).abs() < 1e-12);
        assert_eq!((fc1.final_movement, fc2.final_movement), (Some(0.5), None));
        // Exactly at the tolerance counts as robust.
        assert!(Verdict::new(0.08, 0.03, 0.9, 0.05).robust);
    }

    #[test]
    fn movement_is_averaged_over_seeds_with_units_in_order() {
        let m = |seed, idx: Option<i64>, unit: &str, epoch, v| MovementRecord {
            seed,
            unit_index: idx,
            unit: unit.into(),
            epoch,
            l2_to_init_rel: Some(v),
        };
        let rows = vec![
            m(0, None, "all", 1, 0.2),
            m(0, Some(1), "fc2", 1, 0.1),
            m(1, Some(1), "fc2", 1, 0.3),
            m(0, Some(0), "fc1", 0, 0.0),
            m(0, Some(0), "fc1", 1, 0.4),
        ];
        let c = movement_curves(&rows);
        let names: Vec<&str> = c.iter().map(|c| c.unit.as_str()).collect();
        assert_eq!(names, ["fc1", "fc2", "all"]);
        assert!((c[1].points[0].1 - 0.2).abs() < 1e-12);
        assert_eq!(final_movement(&c).get("fc1"), Some(&0.4));
    }
}
