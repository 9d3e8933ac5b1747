//! A sweep's results across its points: `sweep.parquet` (every point's summary rows with one
//! column per axis), the robustness grid figure, and the sweep's `report.md`.
//!
//! The figure puts sweep points in columns and units in rows, coloured by the test error after
//! re-initializing the unit to its initial value (τ = 0), critical cells outlined. Rows are units
//! by position from the input, except that every network's last unit (its classifier) shares the
//! bottom row: in a depth sweep the input layer and the classifier then sit on fixed rows, with
//! the hidden layers between them, and a position a shallower network lacks stays grey.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::plot;
use super::summary::is_robust;
use super::tables::{append, columns_of, empty_like};
use crate::table::{Column, ReadTable, Table};
use layerlab_pipeline::{AxisValue, Experiment, ResetMode, RowMode, Sweep};

/// One point's aggregate, read back from `results/<point>/`.
pub struct PointResults {
    pub experiment: Experiment,
    summary: ReadTable,
    /// Per unit (by index), for the first BatchNorm setting: τ = 0 re-initialization.
    pub units: Vec<UnitVerdict>,
    pub baseline: f64,
    /// The trained network's train error (on the labels it was trained on).
    pub baseline_train: Option<f64>,
    pub tolerance: f64,
    pub chance: f64,
    pub bn_stats: String,
}

/// How one unit of one point fared.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitVerdict {
    pub unit_index: i64,
    pub unit: String,
    pub reinit_error: Option<f64>,
    /// The train error after the same reset, on the labels trained on.
    pub reinit_train_error: Option<f64>,
    pub reinit_critical: Option<bool>,
    pub rerandomize_critical: Option<bool>,
}

/// Reads a point's `summary.parquet` and `robustness.parquet`.
pub fn read_point(results_dir: &Path, experiment: &Experiment) -> Result<PointResults> {
    let summary = ReadTable::read(&results_dir.join("summary.parquet"))?;
    let robustness = ReadTable::read(&results_dir.join("robustness.parquet"))?;
    let bn = robustness.texts("bn_stats")?;
    let first_bn = bn.first().cloned().flatten().unwrap_or_default();
    let names = robustness.texts("unit")?;
    let indices = robustness.ints("unit_index")?;
    let reinit_error = robustness.floats("reinit_test_error")?;
    let reinit_class = robustness.texts("reinit_class")?;
    let rerand_class = robustness.texts("rerandomize_class")?;
    let critical = |c: &Option<String>| c.as_deref().map(|c| c == "critical");
    // The train error after re-initialization to τ = 0, under the same BatchNorm setting.
    let (s_unit, s_mode, s_bn) = (summary.texts("unit")?, summary.texts("mode")?, summary.texts("bn_stats")?);
    let (s_epoch, s_train) = (summary.ints("source_epoch")?, summary.floats("train_error_mean")?);
    let reinit_train_error = |unit: &str| {
        (0..summary.rows())
            .find(|&r| {
                s_mode[r].as_deref() == Some(RowMode::Reset(ResetMode::Reinit).name())
                    && s_epoch[r] == Some(0)
                    && s_unit[r].as_deref() == Some(unit)
                    && s_bn[r].as_deref() == Some(first_bn.as_str())
            })
            .and_then(|r| s_train[r])
    };
    let mut units: Vec<UnitVerdict> = (0..robustness.rows())
        .filter(|&i| bn[i].as_deref() == Some(first_bn.as_str()))
        .map(|i| UnitVerdict {
            unit_index: indices[i].unwrap_or(i as i64),
            unit: names[i].clone().unwrap_or_default(),
            reinit_error: reinit_error[i],
            reinit_train_error: names[i].as_deref().and_then(reinit_train_error),
            reinit_critical: critical(&reinit_class[i]),
            rerandomize_critical: critical(&rerand_class[i]),
        })
        .collect();
    units.sort_by_key(|u| u.unit_index);
    let first = |name: &str| -> Result<f64> {
        robustness.floats(name)?.first().copied().flatten().with_context(|| format!("{}: no {name}", robustness.path))
    };
    Ok(PointResults {
        experiment: experiment.clone(),
        baseline: first("baseline_test_error")?,
        baseline_train: summary.floats("baseline_train_error")?.first().copied().flatten(),
        tolerance: first("tolerance")?,
        chance: first("chance_error")?,
        bn_stats: first_bn,
        summary,
        units,
    })
}

/// An axis's column for one point's rows: numbers stay numbers (integers become floats when the
/// axis mixes them), so that `GROUP BY "model.depth"` sorts as numbers; lists and mixtures become
/// their labels. `all` is every value of the axis, which decides the type.
fn axis_column(all: &[AxisValue], value: &AxisValue, rows: usize) -> Column {
    let ints = all.iter().all(|v| matches!(v, AxisValue::Int(_)));
    let numbers = all.iter().all(|v| matches!(v, AxisValue::Int(_) | AxisValue::Float(_)));
    let bools = all.iter().all(|v| matches!(v, AxisValue::Bool(_)));
    match value {
        AxisValue::Int(i) if ints => Column::Int(vec![Some(*i); rows]),
        AxisValue::Int(i) if numbers => Column::Float(vec![Some(*i as f64); rows]),
        AxisValue::Float(f) if numbers => Column::Float(vec![Some(*f); rows]),
        AxisValue::Bool(b) if bools => Column::Bool(vec![Some(*b); rows]),
        other => Column::Text(vec![Some(other.label()); rows]),
    }
}

/// `sweep.parquet`: every point's summary rows, after `sweep`, `point` and one column per axis
/// (named by the dotted setting), with each row's `tolerance` and `class` (robust or critical;
/// null for the baseline).
pub fn write_table(path: &Path, sweep: &Sweep, points: &[PointResults], meta: &[(String, String)]) -> Result<()> {
    let mut columns: Vec<(String, Column, bool)> = Vec::new();
    for (p, point) in points.iter().enumerate() {
        let rows = point.summary.rows();
        let values = &point.experiment.sweep.as_ref().context("a sweep point without its sweep")?.values;
        let mut cols: Vec<(String, Column, bool)> = vec![
            ("sweep".into(), Column::Text(vec![Some(sweep.name.clone()); rows]), false),
            ("point".into(), Column::Text(vec![Some(point.experiment.name.clone()); rows]), false),
        ];
        for ((axis, all_values), (_, value)) in sweep.axes.iter().zip(values) {
            cols.push((axis.clone(), axis_column(all_values, value, rows), false));
        }
        cols.extend(columns_of(&point.summary)?);
        let modes = point.summary.texts("mode")?;
        let deltas = point.summary.floats("test_error_delta")?;
        let class = modes
            .iter()
            .zip(&deltas)
            .map(|(mode, delta)| match (mode.as_deref(), delta) {
                (Some("baseline"), _) | (_, None) => None,
                (_, Some(d)) => Some(if is_robust(*d, point.tolerance) { "robust" } else { "critical" }.to_string()),
            })
            .collect();
        cols.push(("tolerance".into(), Column::Float(vec![Some(point.tolerance); rows]), false));
        cols.push(("class".into(), Column::Text(class), true));
        if p == 0 {
            columns = cols.iter().map(|(n, c, nullable)| (n.clone(), empty_like(c), *nullable)).collect();
        }
        let names: Vec<&String> = cols.iter().map(|(n, _, _)| n).collect();
        let want: Vec<&String> = columns.iter().map(|(n, _, _)| n).collect();
        anyhow::ensure!(
            names == want,
            "point '{}': its summary has other columns than the first point's (written by another layerlab?)",
            point.experiment.name
        );
        for (target, (_, c, nullable)) in columns.iter_mut().zip(cols) {
            target.2 |= nullable;
            append(&mut target.1, c);
        }
    }
    Table { columns }.write(path, meta).with_context(|| format!("cannot write {}", path.display()))
}

/// The rows of the grid: unit positions from the input, the last units on one bottom row.
/// Returns the row labels and, per point, each unit's row.
fn grid_rows(points: &[PointResults]) -> (Vec<String>, Vec<Vec<usize>>) {
    let inner = points.iter().map(|p| p.units.len().saturating_sub(1)).max().unwrap_or(0);
    let mut labels: Vec<BTreeMap<String, ()>> = vec![BTreeMap::new(); inner + 1];
    let rows: Vec<Vec<usize>> = points
        .iter()
        .map(|p| {
            let n = p.units.len();
            p.units
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    let row = if i + 1 == n { inner } else { i };
                    labels[row].insert(u.unit.clone(), ());
                    row
                })
                .collect()
        })
        .collect();
    let labels = labels
        .into_iter()
        .enumerate()
        .map(|(i, names)| {
            let names: Vec<String> = names.into_keys().collect();
            match names.as_slice() {
                [one] => one.clone(),
                _ if i == inner => "last unit".into(),
                _ => format!("unit {}", i + 1),
            }
        })
        .collect();
    (labels, rows)
}

/// Short column label of a point: its axis values joined by " · ".
pub fn point_label(point: &Experiment) -> String {
    point
        .sweep
        .as_ref()
        .map(|s| s.values.iter().map(|(_, v)| v.label()).collect::<Vec<_>>().join(" · "))
        .unwrap_or_else(|| point.name.clone())
}

/// The robustness grid across the sweep.
pub fn figure(sweep: &Sweep, points: &[PointResults]) -> plot::Heatmap {
    let (rows, unit_rows) = grid_rows(points);
    let mut values = vec![vec![None; points.len()]; rows.len()];
    let mut critical = vec![vec![false; points.len()]; rows.len()];
    for (c, (point, unit_rows)) in points.iter().zip(&unit_rows).enumerate() {
        for (unit, &r) in point.units.iter().zip(unit_rows) {
            values[r][c] = unit.reinit_error;
            critical[r][c] = unit.reinit_critical == Some(true);
        }
    }
    let vmax = points.iter().map(|p| p.chance).fold(0.0, f64::max);
    let axes: Vec<&str> = sweep.axes.iter().map(|(k, _)| k.as_str()).collect();
    plot::Heatmap {
        title: format!("{}: test error (%) after re-initializing one unit to τ = 0", sweep.name),
        subtitle: format!(
            "mean over seeds  ·  outlined: critical (more than {} above the trained network)",
            tolerance_text(points)
        ),
        rows,
        cols: points.iter().map(|p| point_label(&p.experiment)).collect(),
        gap_after: None,
        values,
        critical,
        vmax,
        x_label: format!("sweep point ({})", axes.join(" · ")),
        y_label: "unit (input at the top, last unit at the bottom)".into(),
        bar_label: "test error".into(),
    }
}

/// The tolerance in words: one number when every point shares it (an axis may vary it).
fn tolerance_text(points: &[PointResults]) -> String {
    match points.split_first() {
        Some((first, rest)) if rest.iter().all(|p| p.tolerance == first.tolerance) => {
            format!("{:.1} pp", 100.0 * first.tolerance)
        }
        _ => "each point's tolerance".into(),
    }
}

fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

fn names(units: &[&UnitVerdict]) -> String {
    if units.is_empty() {
        "none".into()
    } else {
        units.iter().map(|u| u.unit.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The sweep's `report.md`: per point its critical units, then per axis value the units critical
/// in every point with that value.
pub fn report(sweep: &Sweep, points: &[PointResults], figure_file: &str, pipeline: &Path, key: &str) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Sweep {}: which layers matter across {} points\n", sweep.name, points.len());
    if !sweep.description.is_empty() {
        let _ = writeln!(w, "{}\n", sweep.description);
    }
    let axes: Vec<String> = sweep
        .axes
        .iter()
        .map(|(k, v)| format!("`{k}` ∈ {{{}}}", v.iter().map(AxisValue::label).collect::<Vec<_>>().join(", ")))
        .collect();
    let _ = writeln!(w, "Axes: {}. Pipeline file: `{}`.\n", axes.join(" × "), pipeline.display());
    let _ = writeln!(
        w,
        "A unit is **critical** when resetting it alone raises the mean test error more than {} \
         above the trained network's (`aggregate.tolerance`), **robust** otherwise. \
         Re-initialization is to the unit's initial value (τ = 0).\n",
        tolerance_text(points)
    );
    let _ = writeln!(w, "![robustness across the sweep]({figure_file})\n");
    let _ = writeln!(w, "## Per point\n");
    let _ = writeln!(
        w,
        "| point | {} | baseline error | critical to re-initialization | critical to re-randomization |",
        sweep.axes.iter().map(|(k, _)| format!("`{k}`")).collect::<Vec<_>>().join(" | ")
    );
    let _ = writeln!(w, "|---|{}---|---|---|", "---|".repeat(sweep.axes.len()));
    for p in points {
        let values = p.experiment.sweep.as_ref().map(|s| s.values.clone()).unwrap_or_default();
        let reinit: Vec<&UnitVerdict> = p.units.iter().filter(|u| u.reinit_critical == Some(true)).collect();
        let rerand: Vec<&UnitVerdict> = p.units.iter().filter(|u| u.rerandomize_critical == Some(true)).collect();
        let bn = if p.bn_stats == "none" { String::new() } else { format!(" (BatchNorm: {})", p.bn_stats) };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {}{bn} | {} |",
            p.experiment.name,
            values.iter().map(|(_, v)| v.label()).collect::<Vec<_>>().join(" | "),
            pct(p.baseline),
            names(&reinit),
            names(&rerand)
        );
    }
    let _ = writeln!(w, "\n## Per axis value\n");
    let _ = writeln!(
        w,
        "Units critical to re-initialization in **every** point with that value (and, in brackets, in \
         some but not all).\n"
    );
    for (a, (axis, values)) in sweep.axes.iter().enumerate() {
        let _ = writeln!(w, "### `{axis}`\n");
        for value in values {
            let with: Vec<&PointResults> = points
                .iter()
                .filter(|p| p.experiment.sweep.as_ref().is_some_and(|s| &s.values[a].1 == value))
                .collect();
            let mut count: BTreeMap<(i64, String), usize> = BTreeMap::new();
            for p in &with {
                for u in p.units.iter().filter(|u| u.reinit_critical == Some(true)) {
                    *count.entry((u.unit_index, u.unit.clone())).or_default() += 1;
                }
            }
            let always: Vec<&str> =
                count.iter().filter(|(_, &n)| n == with.len()).map(|((_, u), _)| u.as_str()).collect();
            let sometimes: Vec<String> = count
                .iter()
                .filter(|(_, &n)| n < with.len())
                .map(|((_, u), n)| format!("{u} {n}/{}", with.len()))
                .collect();
            let always = if always.is_empty() { "none".to_string() } else { always.join(", ") };
            let sometimes = if sometimes.is_empty() { String::new() } else { format!(" ({})", sometimes.join(", ")) };
            let _ = writeln!(w, "- `{axis}` = {}: critical: {always}{sometimes}", value.label());
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "## Train error after re-initialization (τ = 0)\n");
    let _ = writeln!(
        w,
        "The error on the training examples, with the labels the network was trained on (the random \
         ones under `train.label_noise`), after resetting each unit alone to its initial value: how \
         much of what the network fitted, memorized labels included, each unit carries.\n"
    );
    let mut columns: Vec<(i64, String)> =
        points.iter().flat_map(|p| p.units.iter().map(|u| (u.unit_index, u.unit.clone()))).collect();
    columns.sort();
    columns.dedup();
    let header: Vec<&str> = columns.iter().map(|(_, u)| u.as_str()).collect();
    let _ = writeln!(w, "| point | baseline train error | {} |", header.join(" | "));
    let _ = writeln!(w, "|---|---|{}", "---|".repeat(columns.len()));
    let cell = |v: Option<f64>| v.map_or("—".to_string(), pct);
    for p in points {
        let cells: Vec<String> = columns
            .iter()
            .map(|(i, name)| {
                cell(p.units.iter().find(|u| u.unit_index == *i && &u.unit == name).and_then(|u| u.reinit_train_error))
            })
            .collect();
        let _ = writeln!(w, "| {} | {} | {} |", p.experiment.name, cell(p.baseline_train), cells.join(" | "));
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "## Files\n");
    let _ = writeln!(
        w,
        "- `sweep.parquet`: every point's summary rows with one column per axis, e.g. \
         `SELECT \"{}\", unit, avg(test_error_mean) FROM 'sweep.parquet' WHERE mode = 'reinit' AND source_epoch = 0 GROUP BY ALL ORDER BY ALL`",
        sweep.axes.first().map_or("point", |(k, _)| k.as_str())
    );
    let _ = writeln!(w, "- each point's own report: `../<point>/report.md`");
    let _ = writeln!(w, "- sweep aggregate key `{key}`");
    md
}
