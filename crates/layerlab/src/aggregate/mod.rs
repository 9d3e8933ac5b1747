//! Aggregation: an experiment's per-seed reset results → summary and robustness tables, the
//! heatmap and movement figures, and a Markdown report (the library half of the `aggregate` stage).

pub mod inputs;
pub mod plot;
pub mod report;
pub mod stats;
pub mod summary;
pub mod sweep;
pub mod tables;

use layerlab_pipeline::{ResetMode, RowMode};
use summary::{Curve, SummaryRow};

/// The test error of guessing uniformly: 1 − 1/classes (0.9 for ten classes).
pub fn chance_error(classes: usize) -> f64 {
    1.0 - 1.0 / classes.max(1) as f64
}

/// The paper's figure for one BatchNorm setting: one row per unit (input at the top), a first
/// column for re-randomization, then one per checkpoint τ. `None` when no unit was reset alone.
pub fn heatmap(
    summary: &[SummaryRow],
    bn: &str,
    title: String,
    subtitle: String,
    chance: f64,
) -> Option<plot::Heatmap> {
    let units = summary::units(summary);
    if units.is_empty() {
        return None;
    }
    let single = |r: &&SummaryRow| r.is_single() && r.bn_stats == bn;
    let mut epochs: Vec<i64> = summary
        .iter()
        .filter(single)
        .filter(|r| r.mode == RowMode::Reset(ResetMode::Reinit))
        .filter_map(|r| r.source_epoch)
        .collect();
    epochs.sort_unstable();
    epochs.dedup();
    let has_rerandomize = summary.iter().filter(single).any(|r| r.mode == RowMode::Reset(ResetMode::Rerandomize));
    let mut cols: Vec<(RowMode, Option<i64>)> = Vec::new();
    if has_rerandomize {
        cols.push((RowMode::Reset(ResetMode::Rerandomize), None));
    }
    cols.extend(epochs.iter().map(|&e| (RowMode::Reset(ResetMode::Reinit), Some(e))));
    let values = units
        .iter()
        .map(|(_, unit)| {
            cols.iter()
                .map(|&(mode, epoch)| {
                    summary
                        .iter()
                        .filter(single)
                        .find(|r| r.mode == mode && r.source_epoch == epoch && r.unit.as_deref() == Some(unit.as_str()))
                        .map(|r| r.test.mean)
                })
                .collect()
        })
        .collect();
    let units_len = units.len();
    let x_label = match (has_rerandomize, epochs.is_empty()) {
        (true, false) => "re-randomized  |  re-initialized to checkpoint τ (epoch)",
        (true, true) => "re-randomized",
        _ => "re-initialized to checkpoint τ (epoch)",
    };
    Some(plot::Heatmap {
        title,
        subtitle,
        rows: units.into_iter().map(|(_, u)| u).collect(),
        cols: cols.iter().map(|&(_, e)| e.map_or("rand.".to_string(), |e| e.to_string())).collect(),
        gap_after: (has_rerandomize && !epochs.is_empty()).then_some(1),
        values,
        critical: Vec::new(),
        vmax: chance,
        x_label: x_label.into(),
        // The longer label only fits beside a grid of several rows.
        y_label: if units_len >= 5 { "unit (input at the top)" } else { "unit" }.into(),
        bar_label: "test error".into(),
    })
}

/// The movement figure: one line per unit, the whole network (the snapshot's unit "all", which
/// has no index) last and emphasized.
pub fn movement_lines(curves: &[Curve], title: String) -> plot::Lines {
    plot::Lines {
        title,
        x_label: "epoch".into(),
        y_label: "relative distance from init  ‖w − w₀‖ / ‖w₀‖".into(),
        series: curves
            .iter()
            .map(|c| plot::Series {
                name: if c.unit_index.is_none() { format!("{} (network)", c.unit) } else { c.unit.clone() },
                points: c.points.iter().map(|&(e, v)| (e as f64, v)).collect(),
                emphasis: c.unit_index.is_none(),
            })
            .collect(),
    }
}

/// The growth curve: test error (%) against the number of units re-initialized to τ = 0 together
/// (k = 0 is the trained network), one line per BatchNorm setting, beside the tolerance's line.
/// `None` when no growth rows were found.
pub fn growth_lines(summary: &[SummaryRow], tolerance: f64, title: String) -> Option<plot::Lines> {
    let base = summary::baseline(summary)?.test.mean;
    let growth = |r: &&SummaryRow| r.mode == RowMode::Reset(ResetMode::Growth);
    let mut bns: Vec<&str> = Vec::new();
    for r in summary.iter().filter(growth) {
        if !bns.contains(&r.bn_stats.as_str()) {
            bns.push(&r.bn_stats);
        }
    }
    let mut series: Vec<plot::Series> = bns
        .iter()
        .map(|bn| {
            let mut points = vec![(0.0, 100.0 * base)];
            points.extend(
                summary
                    .iter()
                    .filter(growth)
                    .filter(|r| r.bn_stats == *bn)
                    .map(|r| (r.units.split(',').count() as f64, 100.0 * r.test.mean)),
            );
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let name = if *bn == "none" { "test error".to_string() } else { format!("test error ({bn})") };
            plot::Series { name, points, emphasis: false }
        })
        .collect();
    let k_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(0.0, f64::max);
    if k_max == 0.0 {
        return None;
    }
    let limit = 100.0 * (base + tolerance);
    series.push(plot::Series {
        name: "baseline + tolerance".into(),
        points: vec![(0.0, limit), (k_max, limit)],
        emphasis: true,
    });
    Some(plot::Lines {
        title,
        x_label: "units re-initialized to τ = 0 together, least damaging alone first".into(),
        y_label: "test error (%)".into(),
        series,
    })
}
