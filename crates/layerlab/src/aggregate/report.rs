//! `report.md`: one experiment's results in words, tables and figures, readable on its own.

use layerlab_pipeline::{ResetMode, RowMode};
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::inputs::Inputs;
use super::summary::{baseline, RobustnessRow, SummaryRow, Verdict};
use layerlab_pipeline::{Experiment, ROBUST_SET};

/// Everything the report shows.
pub struct ReportInput<'a> {
    pub experiment: &'a Experiment,
    pub pipeline_path: &'a Path,
    pub inputs: &'a Inputs,
    pub summary: &'a [SummaryRow],
    pub robustness: &'a [RobustnessRow],
    /// (bn_stats, file name of the PNG) per heatmap; the SVG has the same stem.
    pub heatmaps: &'a [(String, String)],
    pub movement_figure: Option<&'a str>,
    /// File name of the growth curve's PNG, when growth rows were found.
    pub growth_figure: Option<&'a str>,
    pub chance: f64,
    pub classes: usize,
    pub aggregate_key: &'a str,
    pub config_hash: &'a str,
}

fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

fn pp(v: f64) -> String {
    format!("{:+.2} pp", 100.0 * v)
}

/// A settings section as JSON; sections are plain data, so a failure can only show as `null`.
fn json<T: serde::Serialize>(section: &T) -> Value {
    serde_json::to_value(section).unwrap_or(Value::Null)
}

/// A settings section as `key = value` items, in the order serde gives them.
fn settings_line(value: &Value) -> String {
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v {
                Value::Null => format!("{k} = (none)"),
                Value::String(s) => format!("{k} = {s}"),
                other => format!("{k} = {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

fn list<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items.into_iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

fn verdict_cells(v: Option<Verdict>) -> [String; 3] {
    match v {
        Some(v) => [pct(v.error), pp(v.delta), format!("**{}**", v.class())],
        None => ["–".into(), "–".into(), "–".into()],
    }
}

/// The whole report as Markdown.
pub fn render(r: &ReportInput) -> String {
    let exp = r.experiment;
    let mut md = String::new();
    let w = &mut md;
    let first = r.inputs.results.first();
    let arch = first.map_or(exp.model.arch.name(), |f| f.arch.as_str());
    let _ = writeln!(w, "# {}: which layers matter\n", exp.name);
    if !exp.description.is_empty() {
        let _ = writeln!(w, "{}\n", exp.description);
    }
    let _ = writeln!(
        w,
        "Architecture `{arch}` on `{}`. Each unit (layer) of the trained network is put back, alone, to an earlier \
         checkpoint (re-initialization) or to a fresh random draw from its initial distribution (re-randomization), \
         with every other unit kept as trained and no retraining; the table and figures show the test error that \
         results. Numbers are means over the {} seed(s) found: {} (the experiment lists {}).\n",
        exp.dataset,
        r.inputs.seeds.len(),
        list(&r.inputs.seeds),
        list(&exp.seeds)
    );
    for (seed, why) in &r.inputs.skipped {
        let _ = writeln!(w, "> **Seed {seed} is missing** from these results: {why}.\n");
    }

    let _ = writeln!(w, "## Settings\n");
    // Only the keys this architecture reads: an FCN's line saying `batch_norm = true` misleads.
    let mut model = json(&exp.model);
    if let Value::Object(map) = &mut model {
        map.retain(|k, _| exp.model.keys_read().contains(&k.as_str()));
    }
    let _ = writeln!(w, "- **Model**: {}", settings_line(&model));
    let _ = writeln!(w, "- **Training**: {}", settings_line(&json(&exp.train)));
    let _ = writeln!(w, "- **Resets**: {}", settings_line(&json(&exp.reset)));
    let _ = writeln!(
        w,
        "- **Classification**: tolerance = {} ({:.1} percentage points above the baseline); chance level = {} ({} classes)",
        exp.aggregate.tolerance,
        100.0 * exp.aggregate.tolerance,
        pct(r.chance),
        r.classes
    );
    let _ = writeln!(w, "- **Pipeline file**: `{}`", r.pipeline_path.display());
    let _ = writeln!(w, "- **Computed on** (the reset grids): {}\n", devices(&r.inputs.results));

    let _ = writeln!(w, "## Baseline\n");
    match baseline(r.summary) {
        Some(b) => {
            let spread = |e: &super::stats::Estimate| match (e.std, e.ci95) {
                (Some(s), Some((lo, hi))) => {
                    format!(" ± {} (std over {} seeds; 95% interval {} to {})", pct(s), e.n, pct(lo), pct(hi))
                }
                _ => format!(" ({} seed: no spread)", e.n),
            };
            let _ = writeln!(w, "- Test error of the trained network: **{}**{}", pct(b.test.mean), spread(&b.test));
            let _ =
                writeln!(w, "- Training error (fixed training subset): {}{}\n", pct(b.train.mean), spread(&b.train));
        }
        None => {
            let _ = writeln!(w, "No baseline rows were found.\n");
        }
    }

    let _ = writeln!(w, "## Robustness of each unit\n");
    let _ = writeln!(
        w,
        "A unit is **robust** when its mean test error after the reset is at most {:.1} percentage points above the \
         baseline, and **critical** otherwise. Re-initialization here is to epoch 0 (the initial values); the heatmap \
         below shows every checkpoint. `robustness.parquet` also holds the normalized damage \
         (error − baseline) / (chance − baseline), so another cut can be applied.\n",
        100.0 * exp.aggregate.tolerance
    );
    let bns: Vec<&str> = {
        let mut v: Vec<&str> = Vec::new();
        for row in r.robustness {
            if !v.contains(&row.bn_stats.as_str()) {
                v.push(&row.bn_stats);
            }
        }
        v
    };
    for bn in &bns {
        if bns.len() > 1 || *bn != "none" {
            let _ = writeln!(w, "### BatchNorm statistics: `{bn}`\n");
        }
        let _ = writeln!(w, "| unit | re-init τ=0 | Δ | class | re-randomized | Δ | class | moved (‖w−w₀‖/‖w₀‖) |");
        let _ = writeln!(w, "|---|---:|---:|---|---:|---:|---|---:|");
        let rows: Vec<&RobustnessRow> = r.robustness.iter().filter(|x| x.bn_stats == *bn).collect();
        for row in &rows {
            let [a, b, c] = verdict_cells(row.reinit);
            let [d, e, f] = verdict_cells(row.rerandomize);
            let moved = row.final_movement.map_or("–".to_string(), |m| format!("{m:.3}"));
            let _ = writeln!(w, "| {} | {a} | {b} | {c} | {d} | {e} | {f} | {moved} |", row.unit);
        }
        let names = |pick: &dyn Fn(&RobustnessRow) -> Option<Verdict>, robust: bool| {
            let v: Vec<&str> =
                rows.iter().filter(|x| pick(x).is_some_and(|v| v.robust == robust)).map(|x| x.unit.as_str()).collect();
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let _ = writeln!(
            w,
            "\nCritical to re-initialization: {}. Critical to re-randomization: {}.\n",
            names(&|x| x.reinit, false),
            names(&|x| x.rerandomize, false)
        );
    }

    let _ = writeln!(w, "## Figures\n");
    for (bn, png) in r.heatmaps {
        let svg = png.trim_end_matches(".png").to_string() + ".svg";
        let what = if bn == "none" { String::new() } else { format!(" (BatchNorm statistics: `{bn}`)") };
        let _ = writeln!(
            w,
            "Test error after resetting one unit{what}; colour from 0 to chance level ({}):\n",
            pct(r.chance)
        );
        let _ = writeln!(w, "![Reset heatmap{what}]({png})\n");
        let _ = writeln!(w, "Vector version: [{svg}]({svg}).\n");
    }
    match r.movement_figure {
        Some(png) => {
            let svg = png.trim_end_matches(".png").to_string() + ".svg";
            let _ = writeln!(w, "How far each unit moved from its initial value during training (mean over seeds):\n");
            let _ = writeln!(w, "![Movement from initialization]({png})\n");
            let _ = writeln!(w, "Vector version: [{svg}]({svg}).\n");
        }
        None => {
            let _ = writeln!(w, "No movement figure: no seed has finished snapshot results.\n");
        }
    }

    let joint: Vec<&SummaryRow> = r.summary.iter().filter(|x| x.mode == RowMode::Reset(ResetMode::Joint)).collect();
    let _ = writeln!(w, "## Joint resets\n");
    if joint.is_empty() {
        let _ = writeln!(w, "No joint resets were run (`reset.modes` leaves out `joint`).\n");
    } else {
        let _ = writeln!(
            w,
            "Test error when a whole set of units is re-initialized to checkpoint τ together (and, under \
             \"rand.\", re-randomized together: each unit's own draws, averaged). `robust` is the set of the \
             units robust on their own (next section).\n"
        );
        let mut epochs: Vec<i64> = joint.iter().filter_map(|x| x.source_epoch).collect();
        epochs.sort_unstable();
        epochs.dedup();
        let mut bn_joint: Vec<&str> = Vec::new();
        for x in &joint {
            if !bn_joint.contains(&x.bn_stats.as_str()) {
                bn_joint.push(&x.bn_stats);
            }
        }
        for bn in bn_joint {
            if bn != "none" {
                let _ = writeln!(w, "BatchNorm statistics: `{bn}`\n");
            }
            let rerandomized = |set: &str| {
                r.summary
                    .iter()
                    .find(|x| {
                        x.mode == RowMode::Reset(ResetMode::JointRerandomize)
                            && x.bn_stats == bn
                            && x.unit.as_deref() == Some(set)
                    })
                    .map(|x| pct(x.test.mean))
            };
            let has_rand =
                joint.iter().any(|x| x.bn_stats == bn && rerandomized(x.unit.as_deref().unwrap_or("")).is_some());
            let rand_head = if has_rand { " rand. |" } else { "" };
            let _ = writeln!(
                w,
                "| set | units |{rand_head} {} |",
                list(epochs.iter().map(|e| format!("τ={e}"))).replace(", ", " | ")
            );
            let _ = writeln!(w, "|---|---|{}", "---:|".repeat(epochs.len() + usize::from(has_rand)));
            let mut sets: Vec<(&str, &str)> = Vec::new();
            for x in joint.iter().filter(|x| x.bn_stats == bn) {
                let s = (x.unit.as_deref().unwrap_or("?"), x.units.as_str());
                if !sets.contains(&s) {
                    sets.push(s);
                }
            }
            for (set, units) in sets {
                let cells: Vec<String> = epochs
                    .iter()
                    .map(|&e| {
                        joint
                            .iter()
                            .find(|x| x.bn_stats == bn && x.unit.as_deref() == Some(set) && x.source_epoch == Some(e))
                            .map_or("–".into(), |x| pct(x.test.mean))
                    })
                    .collect();
                let varies = r.inputs.records().any(|x| {
                    x.mode == RowMode::Reset(ResetMode::Joint)
                        && x.bn_stats == bn
                        && x.unit.as_deref() == Some(set)
                        && x.units != units
                });
                let units = if varies {
                    format!("{} (seed {}'s; other seeds differ)", units.replace(',', ", "), r.inputs.seeds[0])
                } else {
                    units.replace(',', ", ")
                };
                let rand = if has_rand {
                    format!(" {} |", rerandomized(set).unwrap_or_else(|| "–".into()))
                } else {
                    String::new()
                };
                let _ = writeln!(w, "| {set} | {units} |{rand} {} |", cells.join(" | "));
            }
            let _ = writeln!(w);
        }
    }

    joint_robustness(w, r);

    let _ = writeln!(w, "## Provenance\n");
    let _ = writeln!(
        w,
        "- Written by layerlab {} (aggregate key `{}`, config hash `{}`).",
        layerlab_pipeline::VERSION,
        r.aggregate_key,
        r.config_hash
    );
    let _ = writeln!(w, "- Seeds found: {} of the experiment's {}.", list(&r.inputs.seeds), list(&exp.seeds));
    if !r.inputs.movement_missing.is_empty() {
        let _ = writeln!(
            w,
            "- Seeds without movement results (left out of the movement figure): {}.",
            list(&r.inputs.movement_missing)
        );
    }
    let _ = writeln!(w, "- Tables: [summary.parquet](summary.parquet), [robustness.parquet](robustness.parquet); every experiment together: [../robustness.parquet](../robustness.parquet).\n");
    let _ = writeln!(w, "| seed | reset results | config hash | written by |");
    let _ = writeln!(w, "|---:|---|---|---|");
    for s in &r.inputs.results {
        let _ = writeln!(
            w,
            "| {} | `{}` | `{}` | layerlab {} |",
            s.seed,
            s.path.display(),
            s.config_hash,
            s.layerlab_version
        );
    }
    md
}

/// Each device the seeds' reset grids ran on, with its seeds: `cuda:0: NVIDIA H200, … (seeds 0, 1)`.
fn devices(results: &[super::inputs::SeedResults]) -> String {
    let mut by_device: Vec<(&str, Vec<u64>)> = Vec::new();
    for r in results {
        let device = if r.device.is_empty() { "not recorded" } else { r.device.as_str() };
        match by_device.iter_mut().find(|(d, _)| *d == device) {
            Some((_, seeds)) => seeds.push(r.seed),
            None => by_device.push((device, vec![r.seed])),
        }
    }
    let seeds = |s: &[u64]| s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let parts: Vec<String> = by_device
        .iter()
        .map(|(d, s)| format!("{d} (seed{} {})", if s.len() == 1 { "" } else { "s" }, seeds(s)))
        .collect();
    if parts.is_empty() {
        "no seed".into()
    } else {
        parts.join("; ")
    }
}

/// `## Joint robustness`: the robust set together, the growth curve, and the parameters held by
/// critical and robust units.
fn joint_robustness(w: &mut String, r: &ReportInput) {
    let exp = r.experiment;
    let tolerance = exp.aggregate.tolerance;
    let _ = writeln!(w, "## Joint robustness\n");
    let _ = writeln!(
        w,
        "Are the units that are robust one at a time robust together? In each seed, reset-eval collects the units \
         whose own re-initialization to τ = 0 kept the test error within the tolerance (the set `{ROBUST_SET}`) and \
         resets them together; then it re-initializes the units to τ = 0 cumulatively, in order of their own damage \
         (least first), to find where the network breaks.\n"
    );
    let seeds_of = |mode: ResetMode, unit: &str, bn: &str| -> Vec<(u64, String)> {
        let mut out: Vec<(u64, String)> = Vec::new();
        for x in r.inputs.records() {
            let wanted = x.mode == RowMode::Reset(mode) && x.unit.as_deref() == Some(unit) && x.bn_stats == bn;
            if wanted && !out.iter().any(|(s, _)| *s == x.seed) {
                out.push((x.seed, x.units.replace(',', ", ")));
            }
        }
        out
    };
    let described = |per_seed: &[(u64, String)]| -> String {
        match per_seed {
            [] => "none".into(),
            [(_, one)] => one.clone(),
            [(_, first), rest @ ..] if rest.iter().all(|(_, u)| u == first) => format!("{first} (in every seed)"),
            all => all.iter().map(|(s, u)| format!("seed {s}: {u}")).collect::<Vec<_>>().join("; "),
        }
    };
    let find = |mode: ResetMode, unit: &str, bn: &str, epoch: Option<i64>| {
        r.summary.iter().find(|x| {
            x.mode == RowMode::Reset(mode)
                && x.bn_stats == bn
                && x.unit.as_deref() == Some(unit)
                && x.source_epoch == epoch
        })
    };
    let class =
        |x: &SummaryRow| if super::summary::is_robust(x.test_delta(), tolerance) { "robust" } else { "critical" };
    let mut bns: Vec<&str> = Vec::new();
    for x in r.summary.iter().filter(|x| !x.is_single() && x.mode != RowMode::Baseline) {
        if !bns.contains(&x.bn_stats.as_str()) {
            bns.push(&x.bn_stats);
        }
    }
    let mut any = false;
    for bn in &bns {
        if bns.len() > 1 || *bn != "none" {
            let _ = writeln!(w, "### BatchNorm statistics: `{bn}`\n");
        }
        let robust_seeds = seeds_of(ResetMode::Joint, ROBUST_SET, bn);
        let reinit = find(ResetMode::Joint, ROBUST_SET, bn, Some(0));
        let rerand = find(ResetMode::JointRerandomize, ROBUST_SET, bn, None);
        if reinit.is_some() || rerand.is_some() {
            any = true;
            let seeds = if robust_seeds.is_empty() {
                seeds_of(ResetMode::JointRerandomize, ROBUST_SET, bn)
            } else {
                robust_seeds
            };
            let _ = writeln!(w, "- Robust alone: {}.", described(&seeds));
            for (what, x) in [("re-initialized to τ = 0", reinit), ("re-randomized", rerand)] {
                if let Some(x) = x {
                    let _ = writeln!(
                        w,
                        "- Together, {what}: {} ({}): **{}** together.",
                        pct(x.test.mean),
                        pp(x.test_delta()),
                        class(x)
                    );
                }
            }
            let _ = writeln!(w);
        }
        let mut steps: Vec<&SummaryRow> =
            r.summary.iter().filter(|x| x.mode == RowMode::Reset(ResetMode::Growth) && x.bn_stats == *bn).collect();
        steps.sort_by_key(|x| x.units.split(',').count());
        if steps.is_empty() {
            continue;
        }
        any = true;
        let _ = writeln!(
            w,
            "Growth curve: the first k units in order of their own damage, re-initialized to τ = 0 together:\n"
        );
        let orders =
            steps.last().map_or(Vec::new(), |last| seeds_of(ResetMode::Growth, last.unit.as_deref().unwrap_or(""), bn));
        let orders_differ = orders.iter().any(|(_, o)| *o != orders[0].1);
        let added_head =
            if orders_differ { format!("unit added (seed {}'s order)", orders[0].0) } else { "unit added".to_string() };
        let _ = writeln!(w, "| k | {added_head} | test error | Δ | together |");
        let _ = writeln!(w, "|---:|---|---:|---:|---|");
        let mut previous: Vec<&str> = Vec::new();
        let mut breaks = None;
        for x in &steps {
            let units: Vec<&str> = x.units.split(',').collect();
            let added: Vec<&str> = units.iter().copied().filter(|u| !previous.contains(u)).collect();
            let k = units.len();
            if breaks.is_none() && class(x) == "critical" {
                breaks = Some((k, added.join(", ")));
            }
            let _ = writeln!(
                w,
                "| {k} | {} | {} | {} | {} |",
                added.join(", "),
                pct(x.test.mean),
                pp(x.test_delta()),
                class(x)
            );
            previous = units;
        }
        let order = described(
            &steps
                .last()
                .map_or(Vec::new(), |last| seeds_of(ResetMode::Growth, last.unit.as_deref().unwrap_or(""), bn)),
        );
        let _ = writeln!(w, "\nOrder: {order}.");
        match breaks {
            Some((k, unit)) => {
                let _ = writeln!(
                    w,
                    "The network breaks at k = {k}, when {unit} joins (more than {:.1} points above the baseline).\n",
                    100.0 * tolerance
                );
            }
            None => {
                let _ = writeln!(w, "The network does not break: every step stays within the tolerance.\n");
            }
        }
    }
    if let Some(png) = r.growth_figure {
        let svg = png.trim_end_matches(".png").to_string() + ".svg";
        let _ = writeln!(w, "![Growth curve]({png})\n");
        let _ = writeln!(w, "Vector version: [{svg}]({svg}).\n");
    }
    if !any {
        let _ = writeln!(
            w,
            "Not run: `reset.modes` needs `reinit` with `joint` or `joint-rerandomize` for the robust set, and \
             `growth` for the curve (and `train.checkpoints` must keep epoch 0).\n"
        );
    }
    parameters(w, r);
}

/// The parameters held by critical and robust units, per BatchNorm setting and kind of reset.
fn parameters(w: &mut String, r: &ReportInput) {
    if r.robustness.iter().all(|x| x.params.is_none()) {
        return;
    }
    let _ = writeln!(w, "### Parameters in critical and robust units\n");
    let _ = writeln!(
        w,
        "Where the network's trainable values sit: the critical units, not the parameter count, carry what the \
         network learned.\n"
    );
    let _ = writeln!(w, "| BatchNorm | reset | critical units | their parameters | robust units | their parameters |");
    let _ = writeln!(w, "|---|---|---:|---:|---:|---:|");
    let mut bns: Vec<&str> = Vec::new();
    for x in r.robustness {
        if !bns.contains(&x.bn_stats.as_str()) {
            bns.push(&x.bn_stats);
        }
    }
    let total: i64 = {
        let first = bns.first().copied().unwrap_or("");
        r.robustness.iter().filter(|x| x.bn_stats == first).filter_map(|x| x.params).sum()
    };
    let share = |p: i64| {
        if total > 0 {
            format!("{} ({:.1}%)", thousands(p), 100.0 * p as f64 / total as f64)
        } else {
            thousands(p)
        }
    };
    for bn in bns {
        for (what, pick) in [
            ("re-init τ=0", (|x: &RobustnessRow| x.reinit) as fn(&RobustnessRow) -> Option<Verdict>),
            ("re-randomized", |x: &RobustnessRow| x.rerandomize),
        ] {
            let rows: Vec<(&RobustnessRow, Verdict)> =
                r.robustness.iter().filter(|x| x.bn_stats == bn).filter_map(|x| Some((x, pick(x)?))).collect();
            if rows.is_empty() {
                continue;
            }
            let side = |robust: bool| {
                let units: Vec<_> = rows.iter().filter(|(_, v)| v.robust == robust).collect();
                (units.len(), units.iter().filter_map(|(x, _)| x.params).sum::<i64>())
            };
            let ((nc, pc), (nr, pr)) = (side(false), side(true));
            let _ = writeln!(w, "| {bn} | {what} | {nc} | {} | {nr} | {} |", share(pc), share(pr));
        }
    }
    let _ = writeln!(w);
}

/// 1234567 → `1,234,567`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}
