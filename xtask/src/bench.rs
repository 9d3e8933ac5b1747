//! `cargo xtask bench`: layerlab against a plain PyTorch baseline (`bench/pytorch_bench.py`) on
//! the same machine, in one invocation, with the same thread count on both sides.
//!
//! layerlab's side runs the real stage binaries where a stage is the workload (`train` for the
//! 40-epoch FCN run, `reset-eval` for the reset grid) and `layerlab-bench` for CNN steps. Each
//! process's peak memory comes from `wait4`'s rusage, its wall time from the clock around it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use xshell::{cmd, Shell};

use crate::flags;
use crate::project_root;

const WORKLOADS: [&str; 6] = ["fcn", "grid", "vgg", "resnet", "resnet50", "run-all"];

/// One measured figure of one side.
#[derive(Debug, Clone)]
struct Figure {
    workload: String,
    figure: String,
    side: &'static str,
    value: f64,
    unit: String,
    /// FLOPs per example for throughputs, in total for timed runs; none where not counted.
    flops: Option<f64>,
    peak_rss_mb: Option<f64>,
    /// Threads the side ran with.
    threads: usize,
}

impl Figure {
    fn from_json(v: &Value, side: &'static str, threads: usize) -> Result<Figure> {
        let text = |k: &str| v[k].as_str().map(String::from).with_context(|| format!("bench row lacks '{k}': {v}"));
        Ok(Figure {
            workload: text("workload")?,
            figure: text("figure")?,
            side,
            value: v["value"].as_f64().with_context(|| format!("bench row lacks a value: {v}"))?,
            unit: text("unit")?,
            flops: v["flops"].as_f64(),
            peak_rss_mb: v["peak_rss_mb"].as_f64(),
            threads,
        })
    }

    /// Lower is better for times, higher for throughputs.
    fn is_time(&self) -> bool {
        self.unit == "s"
    }

    fn gflops(&self) -> Option<f64> {
        let f = self.flops?;
        Some(if self.is_time() { f / self.value } else { f * self.value } / 1e9)
    }
}

/// What a process printed on stdout, how long it ran and its peak resident memory.
struct Measured {
    stdout: String,
    seconds: f64,
    peak_rss_mb: f64,
}

/// Runs a command to the end, its stderr appended to `log`; fails when it fails.
fn measure(mut command: Command, log: &Path) -> Result<Measured> {
    let what = format!("{command:?}");
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    command.stdout(Stdio::piped()).stderr(log_file);
    let t0 = Instant::now();
    let mut child = command.spawn().with_context(|| format!("cannot start {what}"))?;
    let mut stdout = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut stdout)?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pid is our own unreaped child; status and usage are valid for writes. Reaping it
    // here, instead of through `Child::wait`, is what gives its rusage (peak RSS).
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let seconds = t0.elapsed().as_secs_f64();
    if pid < 0 {
        bail!("waiting for {what} failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{what} failed (wait status {status}); its messages are in {}", log.display());
    }
    // Linux reports ru_maxrss in KiB.
    Ok(Measured { stdout, seconds, peak_rss_mb: usage.ru_maxrss as f64 / 1024.0 })
}

fn json_rows(stdout: &str, side: &'static str, threads: usize) -> Result<Vec<Figure>> {
    stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| {
            let v = serde_json::from_str(l).with_context(|| format!("bad bench line: {l}"))?;
            Figure::from_json(&v, side, threads)
        })
        .collect()
}

/// The row of the measured f32 peak in the bench table.
const PEAK_WORKLOAD: &str = "machine";
const PEAK_FIGURE: &str = "f32 peak (FMA loop)";

/// The machine's nominal f32 peak for `threads` cores: FMA lanes × 2 FLOPs × 2 FMA units × the
/// clock /proc/cpuinfo gives. Printed beside the measured peak (`layerlab-bench peak`) that the
/// percentages are taken of: on AMD Zen 4, which runs AVX-512 on two 256-bit units, and in virtual
/// machines that report their base clock, the formula misses by up to 2×.
fn nominal_peak_gflops(threads: usize) -> (f64, String) {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let (per_cycle, isa) = if has("avx512f") {
        (64.0, "AVX-512: 2 FMA units x 16 lanes x 2")
    } else if has("avx2") && has("fma") {
        (32.0, "AVX2+FMA: 2 FMA units x 8 lanes x 2")
    } else {
        (8.0, "SSE: 4 lanes x (mul + add)")
    };
    let peak = threads as f64 * per_cycle * mhz / 1e3;
    (
        peak,
        format!("{threads} cores x {per_cycle} FLOP/cycle ({isa}) x {mhz:.0} MHz (/proc/cpuinfo) = {peak:.1} GFLOP/s"),
    )
}

/// The benchmark's Python: `--python`, or bench/.venv, made and filled with bench/requirements.txt.
fn python(sh: &Shell, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let venv = project_root().join("bench/.venv");
    let py = venv.join("bin/python");
    let ready = venv.join(".requirements-installed");
    let requirements = project_root().join("bench/requirements.txt");
    if !ready.exists() {
        eprintln!("bench: installing PyTorch into {} (once; a few GB)", venv.display());
        if !py.exists() {
            cmd!(sh, "python3 -m venv {venv}").run().context("cannot create bench/.venv (python3 -m venv)")?;
        }
        cmd!(sh, "{py} -m pip install --quiet --disable-pip-version-check -r {requirements}")
            .run()
            .context("cannot install the PyTorch baseline's requirements into bench/.venv")?;
        fs::write(&ready, "")?;
    }
    Ok(py)
}

fn release_bin(name: &str) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| project_root().join("target"));
    target.join("release").join(name)
}

/// The FCN benchmark config: bench/fcn-mnist.toml, or a 3-epoch copy of it for `--quick`.
fn fcn_config(bench_dir: &Path, quick: bool) -> Result<(PathBuf, u32)> {
    let shipped = project_root().join("bench/fcn-mnist.toml");
    if !quick {
        return Ok((shipped, 40));
    }
    let text = fs::read_to_string(&shipped).with_context(|| format!("cannot read {}", shipped.display()))?;
    let root = project_root();
    let quick_text = text
        .replace("epochs = 40", "epochs = 3")
        .replace("checkpoints = [0, 1, 2, 3, 5, 10, 20, 40]", "checkpoints = [0, 1, 2, 3]")
        .replace("\"../data/bench\"", &format!("{:?}", bench_dir.join("quick")))
        .replace("\"../data/datasets\"", &format!("{:?}", root.join("data/datasets")));
    let path = bench_dir.join("fcn-mnist-quick.toml");
    fs::write(&path, quick_text)?;
    Ok((path, 3))
}

impl flags::Bench {
    pub fn run(&self, sh: &Shell) -> Result<()> {
        for w in &self.workloads {
            if !WORKLOADS.contains(&w.as_str()) {
                bail!("unknown workload '{w}' (workloads: {})", WORKLOADS.join(", "));
            }
        }
        let selected = |w: &str| self.workloads.is_empty() || self.workloads.iter().any(|x| x == w);
        let root = project_root();
        let bench_dir = root.join("data/bench");
        fs::create_dir_all(&bench_dir).with_context(|| format!("cannot create {}", bench_dir.display()))?;
        let log = bench_dir.join("bench.log");
        fs::write(&log, "")?;
        if self.threads.is_empty() || self.threads.contains(&0) {
            bail!("--threads wants one or more counts of at least 1, e.g. --threads 1,2");
        }

        if !["cpu", "cuda"].contains(&self.device.as_str()) && !self.device.starts_with("cuda:") {
            bail!("--device wants cpu, cuda or cuda:N, not '{}'", self.device);
        }
        let features: &[&str] =
            if self.on_gpu() { &["--features", "train/cuda,reset-eval/cuda,layerlab-bench/cuda"] } else { &[] };
        cmd!(sh, "cargo build --release -q {features...} -p fetch-data -p train -p reset-eval -p layerlab-bench")
            .run()?;
        warn_if_busy();
        let py = python(sh, self.python.as_deref())?;
        // Each round measures every thread count in turn, so that a machine whose speed drifts
        // over the run skews the scaling (N threads against 1) less than whole passes per count.
        let mut runs = Vec::new();
        for round in 1..=self.rounds.max(1) {
            for &threads in &self.threads {
                if self.rounds > 1 {
                    eprintln!("bench: round {round} of {}, {threads} threads", self.rounds);
                }
                runs.extend(self.measure_at(threads, &py, &log)?);
            }
        }
        let mut rows: Vec<Figure> = medians(runs);
        if selected("run-all") && !self.quick {
            rows.extend(self.run_all(&bench_dir, &log)?);
        }
        self.report(sh, &rows, &bench_dir)
    }

    fn on_gpu(&self) -> bool {
        self.device != "cpu"
    }

    /// Every selected workload but run-all, both sides, at `thread_count` threads each.
    fn measure_at(&self, thread_count: usize, py: &Path, log: &Path) -> Result<Vec<Figure>> {
        let selected = |w: &str| self.workloads.is_empty() || self.workloads.iter().any(|x| x == w);
        let root = project_root();
        let bench_dir = root.join("data/bench");
        let threads = thread_count.to_string();
        let script = root.join("bench/pytorch_bench.py");
        let datasets = root.join("data/datasets");
        let (steps, repeats) = if self.quick { ("1", "2") } else { ("5", "5") };
        let (config, epochs) = fcn_config(&bench_dir, self.quick)?;
        let epochs_s = epochs.to_string();
        let layerlab = |bin: &str| {
            let mut c = Command::new(release_bin(bin));
            c.env("RAYON_NUM_THREADS", &threads).current_dir(&root);
            c
        };
        let device = self.device.as_str();
        let pytorch = |workload: &str| {
            let mut c = Command::new(py);
            c.arg(&script).arg(workload).arg("--threads").arg(&threads).arg("--datasets").arg(&datasets);
            c.args(["--device", device.split(':').next().unwrap_or("cpu")]);
            c.env("OMP_NUM_THREADS", &threads).current_dir(&root);
            c
        };
        let mut rows: Vec<Figure> = Vec::new();

        if !self.on_gpu() {
            // The peak the GFLOP/s percentages are taken of, measured in each round as the rest.
            let mut c = layerlab("layerlab-bench");
            c.args(["peak", "--threads", &threads]);
            let v: Value = serde_json::from_str(measure(c, log)?.stdout.trim()).context("bad peak line")?;
            rows.push(Figure {
                workload: PEAK_WORKLOAD.into(),
                figure: PEAK_FIGURE.into(),
                side: "layerlab",
                value: v["gflops"].as_f64().context("peak line without gflops")?,
                unit: "GFLOP/s".into(),
                flops: None,
                peak_rss_mb: None,
                threads: thread_count,
            });
        }
        if selected("fcn") || selected("grid") {
            let mut c = layerlab("fetch-data");
            c.arg("mnist").arg("--datasets-dir").arg(&datasets);
            measure(c, log)?;
        }
        let fcn_dir = if self.quick { bench_dir.join("quick") } else { bench_dir.clone() };
        let checkpoints = fcn_dir.join("runs/fcn-mnist/seed-0/train/checkpoints");
        if selected("fcn") || (selected("grid") && !checkpoints.join(format!("epoch-{epochs:04}.safetensors")).exists())
        {
            eprintln!("bench: FCN training, {epochs} epochs (layerlab, {threads} threads)");
            let mut c = layerlab("train");
            c.arg("--config").arg(&config).args(["-e", "fcn-mnist", "--seed", "0", "--force", "--device", device]);
            let m = measure(c, log)?;
            // Trained only for the grid's checkpoints when fcn itself is not asked for.
            if selected("fcn") {
                let mut c = layerlab("layerlab-bench");
                c.arg("history")
                    .arg(fcn_dir.join("runs/fcn-mnist/seed-0/train/history.parquet"))
                    .args(["--examples", "60000"]);
                for mut f in json_rows(&measure(c, log)?.stdout, "layerlab", thread_count)? {
                    f.peak_rss_mb = Some(m.peak_rss_mb);
                    rows.push(f);
                }
                rows.push(Figure {
                    workload: "fcn-mnist".into(),
                    figure: format!("{epochs}-epoch run"),
                    side: "layerlab",
                    value: m.seconds,
                    unit: "s".into(),
                    flops: None,
                    peak_rss_mb: Some(m.peak_rss_mb),
                    threads: thread_count,
                });
                eprintln!("bench: FCN training, {epochs} epochs (PyTorch)");
                let mut c = pytorch("fcn-train");
                c.arg("--epochs").arg(&epochs_s).arg("--out").arg(&bench_dir);
                rows.extend(json_rows(&measure(c, log)?.stdout, "pytorch", thread_count)?);
            }
        }
        if selected("grid") {
            eprintln!("bench: FCN reset grid (layerlab)");
            let mut c = layerlab("reset-eval");
            c.arg("--config").arg(&config).args(["-e", "fcn-mnist", "--seed", "0", "--force", "--device", device]);
            let m = measure(c, log)?;
            let mut c = layerlab("layerlab-bench");
            c.arg("fcn-flops");
            let flops: Value = serde_json::from_str(measure(c, log)?.stdout.trim())?;
            // 4 units × (every kept checkpoint + 5 fresh draws).
            let kept = fs::read_dir(&checkpoints)
                .with_context(|| format!("cannot list {}", checkpoints.display()))?
                .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with("epoch-")))
                .count();
            let evaluations = 4.0 * (kept as f64 + 5.0);
            rows.push(Figure {
                workload: "fcn-mnist".into(),
                figure: "reset grid".into(),
                side: "layerlab",
                value: m.seconds,
                unit: "s".into(),
                // Counted as the naive loop's work (every evaluation a full forward pass), so both
                // sides are measured against the same count.
                flops: flops["forward"].as_f64().map(|f| f * evaluations * 10_000.0),
                peak_rss_mb: Some(m.peak_rss_mb),
                threads: thread_count,
            });
            eprintln!("bench: FCN reset grid (PyTorch)");
            let mut c = pytorch("fcn-reset-grid");
            c.arg("--checkpoints").arg(&checkpoints).arg("--epochs").arg(&epochs_s);
            rows.extend(json_rows(&measure(c, log)?.stdout, "pytorch", thread_count)?);
        }
        for (name, arch) in [("vgg", "vgg11"), ("resnet", "resnet18"), ("resnet50", "resnet50")] {
            if !selected(name) {
                continue;
            }
            eprintln!("bench: {arch} (layerlab, {threads} threads)");
            let mut c = layerlab("layerlab-bench");
            let width = self.width.to_string();
            c.args(["cnn", "--arch", arch, "--steps", steps, "--repeats", repeats, "--device", device]);
            c.args(["--width-mult", &width]);
            rows.extend(json_rows(&measure(c, log)?.stdout, "layerlab", thread_count)?);
            eprintln!("bench: {arch} (PyTorch)");
            let mut c = pytorch(name);
            c.args(["--steps", steps, "--repeats", repeats, "--width", &width]);
            rows.extend(json_rows(&measure(c, log)?.stdout, "pytorch", thread_count)?);
        }
        Ok(rows)
    }

    /// The default pipeline from nothing but the datasets (a copy of pipeline.toml writing under
    /// data/bench/run-all), then the same command again with nothing to do. layerlab only.
    fn run_all(&self, bench_dir: &Path, log: &Path) -> Result<Vec<Figure>> {
        let root = project_root();
        let shipped = root.join("pipeline.toml");
        let text = fs::read_to_string(&shipped).with_context(|| format!("cannot read {}", shipped.display()))?;
        let out_dir = bench_dir.join("run-all");
        if out_dir.exists() {
            fs::remove_dir_all(&out_dir).with_context(|| format!("cannot clear {}", out_dir.display()))?;
        }
        let datasets = root.join("data/datasets");
        let copy = text.replacen(
            "data_dir = \"data\"",
            &format!("data_dir = {:?}\ndatasets_dir = {:?}", out_dir, datasets),
            1,
        );
        if copy == text {
            bail!("{} has no `data_dir = \"data\"` line to redirect", shipped.display());
        }
        let config = bench_dir.join("run-all.toml");
        fs::write(&config, copy)?;
        let xtask = std::env::current_exe()?;
        let mut figures = Vec::new();
        for figure in ["default run-all", "run-all, nothing to do"] {
            eprintln!("bench: {figure} (layerlab)");
            let mut c = Command::new(&xtask);
            c.arg("run-all").arg("--config").arg(&config).current_dir(&root);
            let m = measure(c, log)?;
            figures.push(Figure {
                workload: "fcn-mnist".into(),
                figure: figure.into(),
                side: "layerlab",
                value: m.seconds,
                unit: "s".into(),
                flops: None,
                peak_rss_mb: None,
                // run-all splits the machine's cores among its seed chains itself.
                threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            });
        }
        Ok(figures)
    }

    fn report(&self, sh: &Shell, rows: &[Figure], bench_dir: &Path) -> Result<()> {
        let mut pairs: BTreeMap<(String, String, usize), [Option<&Figure>; 2]> = BTreeMap::new();
        for f in rows {
            let e = pairs.entry((f.workload.clone(), f.figure.clone(), f.threads)).or_default();
            e[usize::from(f.side == "pytorch")] = Some(f);
        }
        let gpu = self.on_gpu();
        let measured_peak: BTreeMap<usize, f64> = rows
            .iter()
            .filter(|f| f.workload == PEAK_WORKLOAD && f.figure == PEAK_FIGURE)
            .map(|f| (f.threads, f.value))
            .collect();
        let peak_gflops =
            |threads: usize| measured_peak.get(&threads).copied().unwrap_or_else(|| nominal_peak_gflops(threads).0);
        let fmt = |f: Option<&Figure>| {
            f.map(|f| {
                let v = if f.is_time() { format!("{:.2} s", f.value) } else { format!("{:.0} {}", f.value, f.unit) };
                let peak = peak_gflops(f.threads);
                let share = |g: f64| if gpu { String::new() } else { format!(" ({:.0}%)", 100.0 * g / peak) };
                let g = f.gflops().map(|g| format!(", {g:.1} GFLOP/s{}", share(g))).unwrap_or_default();
                let m = f.peak_rss_mb.map(|m| format!(", {m:.0} MB")).unwrap_or_default();
                format!("{v}{g}{m}")
            })
            .unwrap_or_else(|| "-".into())
        };
        println!();
        println!(
            "{:<16} {:<22} {:>7} {:<44} {:<44} {:>7}  target",
            "workload", "figure", "threads", "layerlab", "PyTorch", "ratio"
        );
        let mut out_rows = Vec::new();
        for ((workload, figure, threads), [ours, theirs]) in &pairs {
            let ratio = match (ours, theirs) {
                (Some(a), Some(b)) => Some(a.value / b.value),
                _ => None,
            };
            // The targets are the CPU's (issue 15); a GPU's are read off the table by hand.
            let targets = if self.on_gpu() { None } else { target(workload, figure) };
            let verdict = match (ratio, targets, ours) {
                (Some(r), Some((bound, at_most)), _) => {
                    let met = if at_most { r <= bound } else { r >= bound };
                    format!("{}{bound:.2} {}", if at_most { "<= " } else { ">= " }, if met { "met" } else { "NOT met" })
                }
                (None, _, Some(f)) => match absolute_target(figure) {
                    Some(limit) => format!("< {limit} s {}", if f.value < limit { "met" } else { "NOT met" }),
                    None => String::new(),
                },
                _ => String::new(),
            };
            println!(
                "{:<16} {:<22} {:>7} {:<44} {:<44} {:>7}  {verdict}",
                workload,
                figure,
                threads,
                fmt(*ours),
                fmt(*theirs),
                ratio.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into()),
            );
            for f in [ours, theirs].into_iter().flatten() {
                out_rows.push(json!({
                    "workload": f.workload, "figure": f.figure, "side": f.side, "value": f.value, "unit": f.unit,
                    "threads": f.threads, "ratio": ratio,
                    "target": if verdict.is_empty() { Value::Null } else { json!(verdict) },
                    "gflops": f.gflops(), "peak_gflops": peak_gflops(f.threads), "peak_rss_mb": f.peak_rss_mb,
                }));
            }
        }
        println!("ratio = layerlab / PyTorch (times: lower is better; throughputs: higher is better)");
        for t in &self.threads {
            match measured_peak.get(t) {
                Some(p) => println!("peak f32, measured (layerlab-bench peak): {p:.1} GFLOP/s at {t} threads"),
                None => println!("peak f32, not measured: the nominal figure is used"),
            }
            println!("peak f32, nominal: {}", nominal_peak_gflops(*t).1);
        }
        for line in scaling(&pairs) {
            println!("{line}");
        }

        let revision = cmd!(sh, "git rev-parse --short HEAD").read().unwrap_or_else(|_| "unknown".into());
        let dirty = !cmd!(sh, "git status --porcelain --untracked-files=no").read().unwrap_or_default().is_empty();
        let revision = if dirty { format!("{revision}-dirty") } else { revision };
        let machine = if self.on_gpu() { format!("{}; GPU: {}", machine(), self.device) } else { machine() };
        let date = cmd!(sh, "date -u +%Y-%m-%dT%H:%M:%SZ").read().unwrap_or_default();
        let input: String = out_rows.iter().map(|r| format!("{r}\n")).collect();
        let out = bench_dir.join("bench.parquet");
        let tool = release_bin("layerlab-bench");
        cmd!(sh, "{tool} table {out} --revision {revision} --machine {machine} --date {date}").stdin(input).run()?;
        println!("table: {}", out.display());
        Ok(())
    }
}

/// One figure per (workload, figure, side, threads): the median value over the rounds (the upper
/// one of an even count) and the largest peak memory.
fn medians(runs: Vec<Figure>) -> Vec<Figure> {
    let mut groups: BTreeMap<(String, String, &'static str, usize), Vec<Figure>> = BTreeMap::new();
    for f in runs {
        groups.entry((f.workload.clone(), f.figure.clone(), f.side, f.threads)).or_default().push(f);
    }
    groups
        .into_values()
        .map(|mut fs| {
            fs.sort_by(|a, b| a.value.total_cmp(&b.value));
            let rss = fs.iter().filter_map(|f| f.peak_rss_mb).reduce(f64::max);
            let mut median = fs.swap_remove(fs.len() / 2);
            median.peak_rss_mb = rss;
            median
        })
        .collect()
}

/// Each side's throughput at N threads over its throughput at 1 thread, for every throughput
/// measured at 1 thread and more; CNN training has a target (the issue's ≥ 1.85 at 2 threads).
fn scaling(pairs: &BTreeMap<(String, String, usize), [Option<&Figure>; 2]>) -> Vec<String> {
    let mut lines = Vec::new();
    for ((workload, figure, threads), sides) in pairs {
        let Some(one) = pairs.get(&(workload.clone(), figure.clone(), 1)) else { continue };
        // The peak's own scaling says how far the machine itself scales (cores shared with
        // other guests, clocks that drop with more busy cores).
        if *threads == 1 || !(figure.ends_with("throughput") || figure == PEAK_FIGURE) {
            continue;
        }
        let gain = |i: usize| match (sides[i], one[i]) {
            (Some(n), Some(o)) => format!("{:.2}", n.value / o.value),
            _ => "-".into(),
        };
        let verdict = if figure == "train throughput" && workload != "fcn-mnist" && *threads == 2 {
            let met = sides[0].zip(one[0]).is_some_and(|(n, o)| n.value / o.value >= 1.85);
            format!("  target >= 1.85 {}", if met { "met" } else { "NOT met" })
        } else {
            String::new()
        };
        lines.push(format!(
            "scaling {workload} {figure}, {threads} threads / 1 thread: layerlab {}, PyTorch {}{verdict}",
            gain(0),
            gain(1)
        ));
    }
    lines
}

/// Both sides want every core they are given; other work skews the figures, and PyTorch's OpenMP
/// threads (which spin while waiting) far more than layerlab's. Samples how busy the CPUs are over
/// one second (the load average would still count the build that just ran).
fn warn_if_busy() {
    fn cpu_times() -> Option<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        Some((fields.iter().sum(), idle))
    }
    let Some((total0, idle0)) = cpu_times() else { return };
    std::thread::sleep(std::time::Duration::from_secs(1));
    let Some((total1, idle1)) = cpu_times() else { return };
    let busy = 1.0 - (idle1 - idle0) as f64 / (total1 - total0).max(1) as f64;
    if busy > 0.1 {
        eprintln!(
            "bench: warning: the CPUs are {:.0}% busy with other work; figures taken now are not comparable \
             with a quiet machine's",
            busy * 100.0
        );
    }
}

/// The targets: (bound, whether the ratio must stay at or below it).
fn target(workload: &str, figure: &str) -> Option<(f64, bool)> {
    Some(match (workload, figure) {
        ("fcn-mnist", "train throughput") => (1.25, false),
        ("fcn-mnist", f) if f.ends_with("-epoch run") => (0.8, true),
        ("fcn-mnist", "reset grid") => (1.0 / 3.0, true),
        (_, "train throughput") => (1.1, false),
        (_, "inference throughput") => (1.3, false),
        _ => return None,
    })
}

/// Targets on layerlab's own time, in seconds, where PyTorch has no counterpart.
fn absolute_target(figure: &str) -> Option<f64> {
    match figure {
        "default run-all" => Some(360.0),
        "run-all, nothing to do" => Some(1.0),
        _ => None,
    }
}

fn machine() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{model}, {cores} cores")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(side: &'static str, value: f64, rss: f64) -> Figure {
        Figure {
            workload: "vgg".into(),
            figure: "train throughput".into(),
            side,
            value,
            unit: "images/s".into(),
            flops: None,
            peak_rss_mb: Some(rss),
            threads: 2,
        }
    }

    #[test]
    fn rounds_reduce_to_each_sides_median_and_largest_memory() {
        let runs = vec![
            figure("layerlab", 900.0, 100.0),
            figure("pytorch", 1000.0, 800.0),
            figure("layerlab", 1200.0, 120.0),
            figure("pytorch", 700.0, 810.0),
            figure("layerlab", 1000.0, 110.0),
            figure("pytorch", 1100.0, 790.0),
        ];
        let m = medians(runs);
        assert_eq!(m.len(), 2);
        let ours = m.iter().find(|f| f.side == "layerlab").unwrap();
        let theirs = m.iter().find(|f| f.side == "pytorch").unwrap();
        assert_eq!((ours.value, ours.peak_rss_mb), (1000.0, Some(120.0)));
        assert_eq!((theirs.value, theirs.peak_rss_mb), (1000.0, Some(810.0)));
    }
}
