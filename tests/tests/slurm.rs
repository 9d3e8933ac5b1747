//! The Slurm executor against a real one-node Slurm (started by `tests/slurm/start-cluster.sh`,
//! which `.ci/run` runs): a small sweep through Slurm gives the local executor's bytes, a second
//! submission submits nothing, Slurm's own records show the dependency order, a cancelled job
//! shows as failed and the next run resubmits exactly what is unfinished, and a bad partition is
//! refused with nothing submitted.
//!
//! The test needs a cluster, so it is ignored unless asked for (`--ignored`): `cargo xtask test`
//! asks under CI (`CI` set) or with `LAYERLAB_SLURM_TESTS=1`. Asked for, it fails where no
//! cluster answers.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use layerlab_tests::{check_tables, mnist_datasets, outputs, text, tree_diff, xtask};

/// Whether a Slurm controller answers and has a usable node.
fn cluster_up() -> bool {
    Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .map(|o| {
            let states = String::from_utf8_lossy(&o.stdout);
            o.status.success() && states.lines().any(|s| s.starts_with("idle") || s.starts_with("mix"))
        })
        .unwrap_or(false)
}

/// The sweep: FCN on a slice of MNIST, depths given, two seeds, one CPU per job.
fn pipeline(dir: &Path, depths: &str, partition: Option<&str>) -> PathBuf {
    let partition = partition.map(|p| format!("partition = \"{p}\"\n")).unwrap_or_default();
    let text = format!(
        r#"data_dir = "data"
datasets_dir = "{datasets}"
default_experiments = ["depth"]

[executor]
cpus_per_task = 1
time = "20:00"
{partition}
[[experiment]]
name = "fcn"
dataset = "mnist"
seeds = [0, 1]
[experiment.model]
arch = "fcn"
width = 32
[experiment.train]
epochs = 2
lr = 0.05
checkpoints = [0, 1]
train_examples = 2000
test_examples = 500
[experiment.reset]
draws = 2
train_subset = 300

[[sweep]]
name = "depth"
base = "fcn"
axes = {{ "model.depth" = {depths} }}
"#,
        datasets = mnist_datasets().display(),
    );
    fs::create_dir_all(dir).unwrap();
    let path = dir.join("pipeline.toml");
    fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    let out = xtask(args);
    assert!(out.status.success(), "cargo xtask {args:?} failed:\n{}", text(&out));
    out
}

/// Labels after which run-all printed `submitted as job`.
fn submitted(out: &Output) -> BTreeSet<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(": submitted as job"))
        .filter_map(|l| l.split_once("] ").map(|(_, rest)| rest))
        .filter_map(|l| l.split_once(": submitted").map(|(label, _)| label.to_string()))
        .collect()
}

/// Label → job id, from the executor's record.
fn records(data: &Path) -> BTreeMap<String, u64> {
    let text = fs::read_to_string(data.join("slurm/jobs.json")).unwrap_or_else(|_| "{\"jobs\": {}}".into());
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["jobs"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v["job_id"].as_u64().unwrap())).collect()
}

/// Job id → (state, start, end) in Unix seconds, from the accounting, once every job has a row.
fn sacct(ids: &[u64]) -> BTreeMap<u64, (String, i64, i64)> {
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let t0 = Instant::now();
    loop {
        let out = Command::new("sacct")
            .env("SLURM_TIME_FORMAT", "%s")
            .args(["-n", "-P", "-X", "-o", "JobID,State,Start,End", "-j", &list])
            .output()
            .expect("sacct runs");
        assert!(out.status.success(), "sacct failed: {}", text(&out));
        let rows: BTreeMap<u64, (String, i64, i64)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                Some((f[0].parse().ok()?, (f[1].to_string(), f[2].parse().ok()?, f[3].parse().ok()?)))
            })
            .collect();
        if ids.iter().all(|id| rows.contains_key(id)) {
            return rows;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "sacct has no finished rows for all of {list}: {rows:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until none of these jobs is queued or running.
fn wait_for_end(ids: &[u64]) {
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let t0 = Instant::now();
    loop {
        let out = Command::new("squeue").args(["-h", "-o", "%i", "-j", &list]).output().expect("squeue runs");
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "jobs {list} still queued after 10 minutes");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
#[ignore = "needs a Slurm cluster (tests/slurm/start-cluster.sh); cargo xtask test runs it under CI"]
fn a_sweep_through_slurm_matches_the_local_executor_and_resumes_after_a_cancel() {
    assert!(cluster_up(), "no Slurm cluster answers `sinfo`: tests/slurm/start-cluster.sh starts one (.ci/run does)");
    let tmp = tempfile::tempdir().unwrap();
    let local = pipeline(&tmp.path().join("local"), "[1, 2]", None);
    let slurm = pipeline(&tmp.path().join("slurm"), "[1, 2]", None);
    let (local_data, slurm_data) = (tmp.path().join("local/data"), tmp.path().join("slurm/data"));
    let cfg = |p: &Path| p.to_str().unwrap().to_string();

    // The same sweep, both executors: the same bytes.
    run(&["run-all", "--config", &cfg(&local), "--dev-build"]);
    let first = run(&["run-all", "--config", &cfg(&slurm), "--dev-build", "--executor", "slurm", "--wait"]);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("all 15 job(s) completed"), "{stdout}");
    assert_eq!(submitted(&first).len(), 15, "2 points × 2 seeds × 3 stages, 2 aggregates, 1 sweep aggregate");
    let diff = tree_diff(&outputs(&local_data), &outputs(&slurm_data));
    assert_eq!(diff, Vec::<String>::new(), "the Slurm executor's outputs differ from the local one's");
    for f in ["sweep.parquet", "robustness.svg", "robustness.png", "report.md"] {
        assert!(slurm_data.join("results/depth").join(f).is_file(), "{f} missing");
    }
    // The report's train-error table: a row per point, a percentage in every unit's cell the
    // point has (depth 1 has fc1 and fc2, depth 2 fc1 to fc3), a dash where it has none.
    let report = std::fs::read_to_string(slurm_data.join("results/depth/report.md")).unwrap();
    let table: Vec<&str> = report
        .split("## Train error after re-initialization (τ = 0)")
        .nth(1)
        .expect("the report's train-error section")
        .lines()
        .filter(|l| l.starts_with("| depth."))
        .collect();
    assert_eq!(table.len(), 2, "{report}");
    fn cells(row: &str) -> Vec<&str> {
        row.split('|').map(str::trim).filter(|c| !c.is_empty()).skip(2).collect()
    }
    let (shallow, deep) = (cells(table[0]), cells(table[1]));
    assert_eq!(deep.len(), 3, "{report}");
    assert!(deep.iter().all(|c| c.ends_with('%')), "{report}");
    assert_eq!(shallow.iter().filter(|c| **c == "—").count(), 1, "{report}");
    check_tables(&slurm_data);

    // Nothing changed: nothing is submitted.
    let before = records(&slurm_data);
    let second = run(&["run-all", "--config", &cfg(&slurm), "--dev-build", "--executor", "slurm"]);
    assert!(String::from_utf8_lossy(&second.stdout).contains("nothing to submit"), "{}", text(&second));
    assert_eq!(records(&slurm_data), before);

    // Slurm's own records: no snapshot or reset-eval started before its training ended.
    let rows = sacct(&before.values().copied().collect::<Vec<_>>());
    for (label, id) in &before {
        assert_eq!(rows[id].0, "COMPLETED", "{label}");
        for stage in ["snapshot", "reset-eval"] {
            if let Some(rest) = label.strip_prefix(&format!("{stage} ")) {
                let train = before[&format!("train {rest}")];
                assert!(rows[id].1 >= rows[&train].2, "{label} started before its training ended: {rows:?}");
            }
        }
    }

    // A new axis value: only the new point (and the sweep's aggregate) is submitted. Its first
    // training job is cancelled at once; status shows it failed.
    let slurm = pipeline(&tmp.path().join("slurm"), "[1, 2, 3]", None);
    let third = run(&["run-all", "--config", &cfg(&slurm), "--dev-build", "--executor", "slurm"]);
    let new = submitted(&third);
    assert!(new.iter().all(|l| l.contains("depth-3") || l == "aggregate sweep depth"), "{new:?}");
    assert_eq!(new.len(), 8, "{new:?}");
    let jobs = records(&slurm_data);
    let victim = jobs["train depth.depth-3 seed 0"];
    let cancel = Command::new("scancel").arg(victim.to_string()).output().unwrap();
    assert!(cancel.status.success(), "{}", text(&cancel));
    let new_ids: Vec<u64> = new.iter().map(|l| jobs[l]).collect();
    wait_for_end(&new_ids);
    let status = run(&["status", "--config", &cfg(&slurm)]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let line = status.lines().find(|l| l.starts_with("train depth.depth-3 seed 0 ")).unwrap_or("");
    assert!(line.contains(&format!("slurm job {victim}: failed (CANCELLED)")), "{status}");

    // The next run resubmits exactly what is unfinished, and completes.
    let unfinished: BTreeSet<String> = status
        .lines()
        .filter(|l| !l.starts_with("sweep ") && !l.starts_with(' ') && !l.contains("  fresh"))
        .filter_map(|l| l.split("  ").next())
        .map(|l| l.trim().to_string())
        .filter(|l| !l.starts_with("fetch-data"))
        .collect();
    assert!(unfinished.contains("train depth.depth-3 seed 0"), "{status}");
    let fourth = run(&["run-all", "--config", &cfg(&slurm), "--dev-build", "--executor", "slurm", "--wait"]);
    assert_eq!(submitted(&fourth), unfinished, "{}", text(&fourth));
    let status = run(&["status", "--config", &cfg(&slurm)]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.lines().filter(|l| !l.starts_with("sweep ") && !l.starts_with(' ')).all(|l| l.contains("  fresh")),
        "not everything is fresh:\n{status}"
    );

    // An unknown partition is refused in Slurm's words, and nothing is submitted.
    let bad = pipeline(&tmp.path().join("bad"), "[1]", Some("nosuch"));
    let out = xtask(&["run-all", "--config", &cfg(&bad), "--dev-build", "--executor", "slurm"]);
    assert!(!out.status.success());
    let message = text(&out);
    assert!(message.contains("invalid partition") && message.contains("nothing was submitted"), "{message}");
    assert!(!tmp.path().join("bad/data/slurm/jobs.json").exists(), "a job record was written");
}
