//! Fault injection on a tiny pipeline over real MNIST: SIGKILL of `run-all` and of each stage
//! binary at seeded random moments, a full disk, two runs on one data folder, a stale lock, and
//! read-only or missing inputs. After every fault the outputs are either the old ones or none,
//! and a rerun ends with tables and checkpoints byte-identical to an uninterrupted run's.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use layerlab::data;
use layerlab_tests::{bins, mnist_datasets, outputs, run_bin, sha256_file, text, tree, tree_diff};

/// The tiny experiment: small enough that a whole pipeline takes seconds, large enough that
/// training writes several checkpoints and resume points.
fn config_text(data_dir: &Path, datasets_dir: &Path) -> String {
    format!(
        r#"data_dir = "{}"
datasets_dir = "{}"
[[experiment]]
name = "kill"
dataset = "mnist"
seeds = [0]
[experiment.model]
arch = "fcn"
depth = 1
width = 16
[experiment.train]
epochs = 3
lr = 0.05
batch_size = 50
checkpoints = [0, 1, 2]
train_examples = 1500
test_examples = 500
eval_batch_size = 500
[experiment.reset]
draws = 1
train_subset = 200
"#,
        data_dir.display(),
        datasets_dir.display()
    )
}

/// A test folder with its pipeline file; datasets are shared (read-only use) unless given.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    data: PathBuf,
}

fn setup(datasets: Option<&Path>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let data = dir.join("data");
    let config = dir.join("pipeline.toml");
    fs::write(&config, config_text(&data, datasets.unwrap_or(mnist_datasets()))).unwrap();
    Setup { _tmp: tmp, dir, config, data }
}

fn run_all_cmd(config: &Path) -> Command {
    let mut cmd = Command::new(bins().join("xtask"));
    cmd.args(["run-all", "--dev-build", "-j", "1", "--config", config.to_str().unwrap()]);
    cmd.current_dir(layerlab_tests::root());
    cmd
}

fn run_all(config: &Path) -> Output {
    let out = run_all_cmd(config).output().unwrap();
    assert!(out.status.success(), "run-all failed:\n{}", text(&out));
    out
}

/// The uninterrupted run's outputs and how long its run-all took.
fn reference() -> &'static (BTreeMap<String, String>, Duration) {
    static REF: OnceLock<(BTreeMap<String, String>, Duration)> = OnceLock::new();
    REF.get_or_init(|| {
        bins();
        let s = setup(None);
        run_all(&s.config);
        let outs = outputs(&s.data);
        // Time a forced rerun: the first run may have waited for cargo to build the binaries.
        let t0 = Instant::now();
        let mut forced = run_all_cmd(&s.config);
        let out = forced.arg("--force").output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let took = t0.elapsed();
        assert_eq!(tree_diff(&outs, &outputs(&s.data)), Vec::<String>::new(), "a forced rerun changed the outputs");
        assert!(outs.keys().any(|k| k.ends_with("epoch-0003.safetensors")), "{outs:?}");
        assert!(outs.keys().any(|k| k.ends_with("report.md")), "{outs:?}");
        eprintln!("reference run: {} files in {:.1} s", outs.len(), took.as_secs_f64());
        (outs, took)
    })
}

/// A small seeded generator (SplitMix64): the kill moments are the same on every run.
struct Moments(u64);
impl Moments {
    fn next_fraction(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Starts `cmd` in its own process group and SIGKILLs the whole group after `after` (what a
/// scheduler or a dying terminal does); returns whether it was still running then.
fn kill_after(mut cmd: Command, after: Duration) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).process_group(0);
    let mut child: Child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let pgid = child.id().to_string();
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
    child.wait().unwrap();
    true
}

/// What must hold right after a kill: every file with a final name is whole and equal to the
/// uninterrupted run's (so nothing half-written carries a final name), and every folder with a
/// stamp holds all of its outputs.
fn check_after_kill(data: &Path, what: &str) {
    let (reference, _) = reference();
    let now = outputs(data);
    for (path, hash) in &now {
        let name = Path::new(path).file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // a temporary file: never taken for a result
        }
        if name == "resume.safetensors" {
            let loaded = layerlab::checkpoint::load_tensors(&data.join(path), &candle_core::Device::Cpu);
            assert!(loaded.is_ok(), "{what}: {path} is a damaged resume point: {:?}", loaded.err());
            continue;
        }
        if name == layerlab::stages::reset_eval::RESUME_FILE {
            let loaded = layerlab::stages::reset_eval::ResumeFile::read(&data.join(path));
            assert!(loaded.is_ok(), "{what}: {path} is a damaged resume point of the grid: {:?}", loaded.err());
            continue;
        }
        assert_eq!(
            reference.get(path),
            Some(hash),
            "{what}: {path} has a final name but differs from the uninterrupted run's"
        );
    }
    for (path, _) in tree(data).iter().filter(|(p, _)| p.ends_with("stamp.json")) {
        let dir = Path::new(path).parent().unwrap().display().to_string();
        for r in reference.keys().filter(|r| r.starts_with(&format!("{dir}/")) && !r.contains("/datasets/")) {
            assert!(now.contains_key(r), "{what}: {dir} has a stamp but lacks {r}");
        }
    }
}

/// The rerun after a kill ends with exactly the uninterrupted run's outputs, no leftovers, and
/// the lock released.
fn check_after_rerun(s: &Setup, what: &str) {
    let out = run_all_cmd(&s.config).output().unwrap();
    assert!(out.status.success(), "{what}: the rerun failed:\n{}", text(&out));
    let diff = tree_diff(&reference().0, &outputs(&s.data));
    assert!(diff.is_empty(), "{what}: the rerun's outputs differ from an uninterrupted run's: {diff:?}");
    assert!(!s.data.join(".layerlab.lock").exists(), "{what}: the lock was left behind");
}

#[test]
fn sigkill_of_run_all_at_seeded_moments_then_a_rerun_gives_identical_outputs() {
    let (_, took) = reference();
    let s = setup(None);
    let mut moments = Moments(0x6c61_7965_726c_6162);
    for point in 0..10 {
        // Half the kills hit a run from nothing, half a forced rerun over finished results.
        let force = point % 2 == 1;
        if !force && s.data.exists() {
            // Start from a folder without results (datasets are shared and kept).
            fs::remove_dir_all(&s.data).unwrap();
        }
        let after = took.mul_f64(moments.next_fraction());
        let mut cmd = run_all_cmd(&s.config);
        if force {
            cmd.arg("--force");
        }
        let killed = kill_after(cmd, after);
        let what = format!(
            "run-all kill point {point} at {:.2} s{}",
            after.as_secs_f64(),
            if force { " (--force)" } else { "" }
        );
        eprintln!("{what}: {}", if killed { "killed" } else { "had finished" });
        check_after_kill(&s.data, &what);
        check_after_rerun(&s, &what);
    }
}

/// Raw MNIST IDX files rebuilt from the canonical copy (they hash to the published checksums).
fn raw_mnist() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = layerlab_tests::target_dir().join("test-cache").join("mnist-raw");
        let names = layerlab::pipeline::settings::IDX_FILES;
        if !names.iter().all(|n| dir.join(n).exists()) {
            let (train, test) = data::load(&mnist_datasets().join("mnist")).unwrap();
            fs::create_dir_all(&dir).unwrap();
            let enc = |s: &data::Split| {
                (
                    data::idx::encode_images(s.len() as u32, s.height as u32, s.width as u32, &s.images),
                    data::idx::encode_labels(&s.labels),
                )
            };
            let ((a, b), (c, d)) = (enc(&train), enc(&test));
            for (name, bytes) in names.iter().zip([a, b, c, d]) {
                let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
                fs::write(&tmp, bytes).unwrap();
                fs::rename(&tmp, dir.join(name)).unwrap();
            }
        }
        dir
    })
}

#[test]
fn sigkill_of_each_stage_binary_at_seeded_moments_then_a_rerun_gives_identical_outputs() {
    reference();
    let mut moments = Moments(0x7374_6167_6573_2121);
    let stages = ["fetch-data", "train", "snapshot", "reset-eval", "aggregate"];
    for point in 0..10 {
        let stage = stages[point % stages.len()];
        // Even points kill a run whose output folder is empty; odd ones a forced run over
        // finished results (which must then be either kept whole or replaced whole).
        let over_old = point % 2 == 1;
        let private = tempfile::tempdir().unwrap();
        let datasets = private.path().join("datasets");
        let s = setup((stage == "fetch-data").then_some(datasets.as_path()));
        let config = s.config.to_str().unwrap();
        let seed_args: Vec<String> = ["--config", config, "-e", "kill", "-s", "0"].map(String::from).to_vec();
        let args: Vec<String> = match stage {
            "fetch-data" => {
                let from = raw_mnist().to_str().unwrap();
                let d = datasets.to_str().unwrap();
                ["mnist", "--from", from, "--offline", "--no-registry", "--datasets-dir", d].map(String::from).to_vec()
            }
            "aggregate" => ["--config", config, "-e", "kill"].map(String::from).to_vec(),
            _ => seed_args.clone(),
        };
        let stage_cmd = |force: bool| {
            let mut cmd = Command::new(bins().join(stage));
            cmd.args(&args);
            if force {
                cmd.arg("--force");
            }
            cmd
        };
        // The stages before this one run to the end.
        for b in ["train", "snapshot", "reset-eval"].into_iter().take_while(|b| *b != stage) {
            if stage == "fetch-data" {
                break;
            }
            let out = run_bin(b, &seed_args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(out.status.success(), "{b}: {}", text(&out));
        }
        // Time the stage once, uninterrupted.
        let t0 = Instant::now();
        let out = stage_cmd(false).output().unwrap();
        assert!(out.status.success(), "{stage}: {}", text(&out));
        let took = t0.elapsed();
        let fetched: Vec<String> = if stage == "fetch-data" {
            ["train", "test"].iter().map(|sp| sha256_file(&datasets.join(format!("mnist/{sp}.safetensors")))).collect()
        } else {
            Vec::new()
        };
        let output_dir = match stage {
            "fetch-data" => datasets.join("mnist"),
            "train" => s.data.join("runs/kill/seed-0/train"),
            "snapshot" => s.data.join("runs/kill/seed-0/snapshot"),
            "reset-eval" => s.data.join("runs/kill/seed-0/reset"),
            _ => s.data.join("results/kill"),
        };
        if !over_old {
            fs::remove_dir_all(&output_dir).unwrap();
        }
        let after = took.mul_f64(moments.next_fraction());
        let killed = kill_after(stage_cmd(over_old), after);
        let what = format!(
            "{stage} kill point {point} at {:.2} s of {:.2} s{}",
            after.as_secs_f64(),
            took.as_secs_f64(),
            if over_old { " (--force over old results)" } else { "" }
        );
        eprintln!("{what}: {}", if killed { "killed" } else { "had finished" });
        if stage == "fetch-data" {
            // A killed fetch leaves no dataset, the old one, or a whole new one; the rerun ends it.
            let whole = |what: &str| {
                for (split, reference) in ["train", "test"].iter().zip(&fetched) {
                    let ours = sha256_file(&output_dir.join(format!("{split}.safetensors")));
                    assert_eq!(&ours, reference, "{what}: {split} differs from an uninterrupted fetch");
                }
            };
            if output_dir.join("stamp.json").exists() || output_dir.join("manifest.json").exists() {
                whole(&what);
            }
            let out = stage_cmd(false).output().unwrap();
            assert!(out.status.success(), "{what}: {}", text(&out));
            whole(&what);
            let left: Vec<String> = fs::read_dir(&datasets)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(left, ["mnist"], "{what}: leftovers in the datasets folder");
            continue;
        }
        check_after_kill(&s.data, &what);
        check_after_rerun(&s, &what);
    }
}

/// A grid slow enough to kill between its groups (each a few evaluations of an FCN 2×256 on
/// 3,000 examples), fast enough for a test.
fn grid_config_text(data_dir: &Path) -> String {
    format!(
        r#"data_dir = "{}"
datasets_dir = "{}"
[[experiment]]
name = "grid"
dataset = "mnist"
seeds = [0]
[experiment.model]
arch = "fcn"
depth = 2
width = 256
[experiment.train]
epochs = 1
lr = 0.05
checkpoints = [0, 1]
train_examples = 2000
test_examples = 2000
eval_batch_size = 500
[experiment.reset]
draws = 2
train_subset = 1000
"#,
        data_dir.display(),
        mnist_datasets().display()
    )
}

/// reset-eval keeps a resume point after each group of variants: killed after its first groups,
/// its rerun takes them from the resume point (computing only the rest) and writes the rows of an
/// unbroken run, bit for bit. A resume point of other settings is ignored; a damaged one is named,
/// and the results already written are kept.
#[test]
fn a_grid_killed_after_its_first_groups_resumes_from_them_to_an_unbroken_runs_rows() {
    let s = setup(None);
    fs::write(&s.config, grid_config_text(&s.data)).unwrap();
    let args = ["--config", s.config.to_str().unwrap(), "-e", "grid", "-s", "0"];
    let out = run_bin("train", &args);
    assert!(out.status.success(), "{}", text(&out));
    let reset_dir = s.data.join("runs/grid/seed-0/reset");
    let (results, resume, stamp) =
        (reset_dir.join("results.parquet"), reset_dir.join("resume.json"), reset_dir.join("stamp.json"));
    let reset_eval = |extra: &[&str]| {
        let out = run_bin("reset-eval", &[&args[..], extra].concat());
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let unbroken = reset_eval(&[]);
    assert!(!unbroken.contains("resume point"), "{unbroken}");
    // Each group's line says where the grid stands: groups 1 to N, in order, of N (the robust set
    // and the growth curve counted; the robust set dropped from the count once it is found empty).
    let positions: Vec<(usize, usize)> = unbroken
        .lines()
        .filter_map(|l| {
            let (done, total) = l.rsplit_once("(group ")?.1.strip_suffix(')')?.split_once(" of ")?;
            Some((done.parse().ok()?, total.parse().ok()?))
        })
        .collect();
    let groups = positions.len();
    assert!(groups > 2, "{unbroken}");
    let done: Vec<usize> = positions.iter().map(|p| p.0).collect();
    assert_eq!(done, (1..=groups).collect::<Vec<_>>(), "{unbroken}");
    assert_eq!(positions.last().unwrap().1, groups, "{unbroken}");
    let no_robust_set = unbroken.contains("no unit is robust alone");
    assert_eq!(positions[0].1, groups + usize::from(no_robust_set), "{unbroken}");
    assert!(positions.windows(2).all(|w| w[1].1 <= w[0].1), "{unbroken}");
    let reference = sha256_file(&results);
    assert!(!resume.exists(), "the resume point outlived the results");

    // A grid from nothing, killed (-9) as soon as its first group's resume point exists.
    let kill_after_first_group = || {
        fs::remove_dir_all(&reset_dir).unwrap();
        let mut child = Command::new(bins().join("reset-eval"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !resume.exists() && t0.elapsed() < Duration::from_secs(300) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
        child.wait().unwrap();
        assert!(!stamp.exists() && !results.exists(), "the grid finished before the kill: make it longer");
    };
    kill_after_first_group();
    let kept = layerlab::stages::reset_eval::ResumeFile::read(&resume).unwrap().groups.len();
    assert!(kept >= 1, "the resume point holds no group");
    let status = text(&run_bin("xtask", &["status", "--config", args[1], "-e", "grid"]));
    let reset_line = status.lines().find(|l| l.starts_with("reset-eval grid seed 0 ")).unwrap_or_default();
    assert!(reset_line.ends_with(&format!(" missing (resumes after {kept} groups of its grid)")), "{status}");
    let resumed = reset_eval(&[]);
    let said = |t: &str| t.lines().filter(|l| l.contains("evaluations in")).collect::<Vec<_>>().join("\n");
    eprintln!("unbroken: {}\nkilled after {kept} groups, rerun: {}", said(&unbroken), said(&resumed));
    assert!(
        resumed.contains(&format!("resuming reset-eval grid seed 0: {kept} groups already evaluated")),
        "{resumed}"
    );
    assert!(resumed.contains(&format!("{kept} groups taken from the resume point")), "{resumed}");
    // Each replayed group says so, rather than claiming evaluations it did not make.
    let replayed_lines = resumed.lines().filter(|l| l.contains(" results taken from the resume point")).count();
    assert_eq!(replayed_lines, kept, "{resumed}");
    assert_eq!(sha256_file(&results), reference, "the resumed grid's rows differ from an unbroken run's");
    assert!(!resume.exists(), "the resume point outlived the results");

    // A resume point written under other settings is not continued.
    kill_after_first_group();
    let mut other = layerlab::stages::reset_eval::ResumeFile::read(&resume).unwrap();
    other.key = "another key".into();
    for group in &mut other.groups {
        for m in group.metrics.iter_mut().flatten().flatten() {
            m.error = 2.0; // would show in the rows if it were taken
        }
    }
    fs::write(&resume, serde_json::to_string(&other).unwrap()).unwrap();
    let fresh = reset_eval(&[]);
    assert!(!fresh.contains("resume point"), "{fresh}");
    assert_eq!(sha256_file(&results), reference, "a resume point of other settings was taken");

    // A damaged resume point is named; the results already written stay.
    fs::remove_file(&stamp).unwrap();
    fs::write(&resume, b"{\"format\": \"layerlab-reset-resume-1\", \"key\": ").unwrap();
    let out = run_bin("reset-eval", &args);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("resume.json") && t.contains("damaged") && !t.contains("panicked"), "{t}");
    assert_eq!(sha256_file(&results), reference, "the results were touched");
}

/// Runs `f` with a tmpfs of `size` mounted at `dir`, or returns false when mounting is not allowed.
fn with_tmpfs(dir: &Path, size: &str, f: impl FnOnce()) -> bool {
    fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return false;
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let _ = Command::new("umount").arg("-l").arg(dir).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    true
}

/// Fills the file system holding `dir` up to all but about `keep` bytes.
fn fill(dir: &Path, keep: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let block = vec![0u8; 4096];
    let mut written = 0u64;
    while f.write_all(&block).is_ok() {
        written += 4096;
    }
    let _ = f.sync_all();
    f.set_len(written.saturating_sub(keep)).unwrap();
    path
}

#[test]
fn a_full_disk_gives_a_clear_error_keeps_earlier_results_and_a_rerun_completes() {
    reference();
    let s = setup(None);
    let mounted = with_tmpfs(&s.data, "16m", || {
        run_all(&s.config);
        let before = tree(&s.data);
        // A reset setting changes: reset-eval and aggregate must rerun, into a full disk.
        let cfg = fs::read_to_string(&s.config).unwrap().replace("draws = 1", "draws = 2");
        fs::write(&s.config, cfg).unwrap();
        let filler = fill(&s.data, 4096);
        let out = run_all_cmd(&s.config).output().unwrap();
        let t = text(&out);
        assert!(!out.status.success(), "a full disk went unnoticed:\n{t}");
        assert!(t.contains("No space left on device"), "{t}");
        assert!(
            ["results.parquet", "stamp.json", "resume.json"].iter().any(|f| t.contains(f)),
            "the message names no file:\n{t}"
        );
        assert!(!t.contains("panicked"), "{t}");
        let after = tree(&s.data);
        for (path, hash) in &before {
            let changed = after.get(path) != Some(hash);
            // Only the stage that failed may lose its stamp; its results and everything else stay.
            if changed && !(path.ends_with("reset/stamp.json") || path.starts_with("logs")) {
                panic!("{path} changed after the failed run:\n{t}");
            }
        }
        let temps: Vec<_> = after.keys().filter(|p| p.contains(".tmp-")).collect();
        assert!(temps.is_empty(), "temporary files left: {temps:?}");
        fs::remove_file(filler).unwrap();
        let out = run_all_cmd(&s.config).output().unwrap();
        assert!(out.status.success(), "the rerun after freeing space failed:\n{}", text(&out));
        let out = run_all_cmd(&s.config).output().unwrap();
        assert!(text(&out).contains("up to date"), "{}", text(&out));
    });
    if !mounted {
        // No tmpfs (not root): the same fault through RLIMIT_FSIZE on one stage, with SIGXFSZ
        // ignored so that the write fails with EFBIG instead of killing the process.
        assert!(std::env::var_os("CI").is_none(), "CI runs as root and must mount a tmpfs");
        eprintln!("tmpfs not mountable here: disk full simulated with RLIMIT_FSIZE");
        run_all(&s.config);
        let before = tree(&s.data);
        let train = bins().join("train");
        let script = format!(
            "trap '' XFSZ; ulimit -f 8; exec '{}' --config '{}' -e kill -s 0 --force",
            train.display(),
            s.config.display()
        );
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        let t = text(&out);
        assert!(!out.status.success() && t.contains("File too large") && !t.contains("panicked"), "{t}");
        let after = tree(&s.data);
        assert!(after.keys().all(|p| !p.contains(".tmp-")), "temporary files left");
        assert!(
            before.iter().all(|(p, h)| p.ends_with("stamp.json") || after.get(p) == Some(h) || p.contains("resume")),
            "earlier results changed"
        );
        run_all(&s.config);
    }
}

#[test]
fn a_second_run_all_is_refused_naming_the_first_and_a_stale_lock_is_taken_over() {
    let s = setup(None);
    let mut first = run_all_cmd(&s.config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let lock = s.data.join(".layerlab.lock");
    let t0 = Instant::now();
    while !lock.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(lock.exists(), "the first run took no lock");
    let out = run_all_cmd(&s.config).output().unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "a second run-all was allowed:\n{t}");
    assert!(t.contains(&format!("process {}", first.id())) && t.contains(&s.data.display().to_string()), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(first.wait().unwrap().success(), "the first run failed");
    assert!(!lock.exists(), "the lock outlived its run");

    // A lock left by a process that is gone (or garbage) is taken over.
    let mut dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    for content in [format!("{pid} 0\n"), "garbage".to_string()] {
        fs::write(&lock, content).unwrap();
        let out = run_all_cmd(&s.config).output().unwrap();
        assert!(out.status.success(), "a stale lock blocked the run:\n{}", text(&out));
        assert!(!lock.exists());
    }
}

#[test]
fn missing_inputs_are_named() {
    let s = setup(None);
    run_all(&s.config);
    let seed_args = ["--config", s.config.to_str().unwrap(), "-e", "kill", "-s", "0", "--force"];
    let run = s.data.join("runs/kill/seed-0");

    // A deleted checkpoint: snapshot and reset-eval name it and change nothing.
    let ckpt = run.join("train/checkpoints/epoch-0001.safetensors");
    fs::remove_file(&ckpt).unwrap();
    for stage in ["snapshot", "reset-eval"] {
        let before = tree(&s.data);
        let out = run_bin(stage, &seed_args);
        let t = text(&out);
        assert!(!out.status.success(), "{stage}: {t}");
        assert!(t.contains(&ckpt.display().to_string()) && t.contains("No such file"), "{stage}: {t}");
        assert!(!t.contains("panicked"), "{t}");
        assert_eq!(tree_diff(&before, &tree(&s.data)), Vec::<String>::new(), "{stage} changed files");
    }

    // A missing dataset folder.
    let cfg = fs::read_to_string(&s.config).unwrap();
    let elsewhere = s.dir.join("no-datasets");
    fs::write(&s.config, cfg.replace(&mnist_datasets().display().to_string(), &elsewhere.display().to_string()))
        .unwrap();
    let out = run_bin("train", &seed_args);
    let t = text(&out);
    assert!(!out.status.success() && t.contains(&elsewhere.join("mnist").display().to_string()), "{t}");
}

/// Read-only folders, as read-only bind mounts: root, who runs CI, ignores permission bits.
#[test]
#[ignore = "needs root (read-only bind mounts); cargo xtask test runs it under CI"]
fn read_only_folders_are_named() {
    let s = setup(None);
    run_all(&s.config);
    let seed_args = ["--config", s.config.to_str().unwrap(), "-e", "kill", "-s", "0", "--force"];
    let run = s.data.join("runs/kill/seed-0");
    let cfg = fs::read_to_string(&s.config).unwrap();
    let ro = s.dir.join("ro-datasets");
    let bind = |from: &Path, to: &Path| -> bool {
        fs::create_dir_all(to).unwrap();
        Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(to)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            && Command::new("mount")
                .args(["-o", "remount,ro,bind"])
                .arg(to)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
    };
    assert!(bind(mnist_datasets(), &ro), "a read-only bind mount was refused: this test must run as root");
    // A checkpoint for the training below to write again.
    let ckpt = run.join("train/checkpoints/epoch-0001.safetensors");
    fs::remove_file(&ckpt).unwrap();
    // Training only reads the datasets: a read-only dataset folder is fine.
    fs::write(&s.config, cfg.replace(&mnist_datasets().display().to_string(), &ro.display().to_string())).unwrap();
    let out = run_bin("train", &seed_args);
    assert!(out.status.success(), "train wrote into its dataset folder:\n{}", text(&out));
    // Fetching into it is refused, naming the folder.
    let out = run_bin(
        "fetch-data",
        &[
            "mnist",
            "--force",
            "--offline",
            "--no-registry",
            "--datasets-dir",
            ro.to_str().unwrap(),
            "--from",
            raw_mnist().to_str().unwrap(),
        ],
    );
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains(&ro.display().to_string()) && t.contains("Read-only file system"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
    let _ = Command::new("umount").arg(&ro).status();
    fs::write(&s.config, &cfg).unwrap();

    // An output folder that cannot be written: the error names it; nothing changes.
    let out_dir = run.join("snapshot");
    assert!(bind(&out_dir, &out_dir));
    let before = tree(&s.data);
    assert!(ckpt.exists(), "train above rewrote the deleted checkpoint");
    let out = run_bin("snapshot", &seed_args);
    let t = text(&out);
    let _ = Command::new("umount").arg(&out_dir).status();
    assert!(
        !out.status.success() && t.contains(&out_dir.display().to_string()) && t.contains("Read-only file system"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
    assert_eq!(tree_diff(&before, &tree(&s.data)), Vec::<String>::new());
}

/// A permission error: a checkpoint that the user running the stage may not read. The stage runs
/// as `nobody` (setpriv, which needs root), from a copy of the binary and of the datasets inside
/// the test's folder, so that `nobody` reaches everything else wherever the checkout lies.
#[test]
#[ignore = "needs root (setpriv to run as nobody); cargo xtask test runs it under CI"]
fn an_unreadable_checkpoint_is_named() {
    let s = setup(None);
    let datasets = s.dir.join("datasets");
    layerlab_tests::copy_tree(mnist_datasets(), &datasets);
    let cfg = fs::read_to_string(&s.config).unwrap();
    fs::write(&s.config, cfg.replace(&mnist_datasets().display().to_string(), &datasets.display().to_string()))
        .unwrap();
    run_all(&s.config);
    let seed_args = ["--config", s.config.to_str().unwrap(), "-e", "kill", "-s", "0", "--force"];
    let reset_eval = s.dir.join("reset-eval");
    fs::copy(bins().join("reset-eval"), &reset_eval).unwrap();
    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(nobody, "setpriv cannot run a command as nobody: this test must run as root, with setpriv installed");
    // The unprivileged user may walk the test folder but not read the checkpoint.
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(&s.dir).status();
    let _ = Command::new("chmod").arg("a+rx").arg(s.dir.parent().unwrap()).status();
    let ckpt = s.data.join("runs/kill/seed-0/train/checkpoints/epoch-0002.safetensors");
    let mut p = fs::metadata(&ckpt).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o600);
    fs::set_permissions(&ckpt, p).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&reset_eval)
        .args(seed_args)
        .env("HOME", "/tmp")
        .output()
        .expect("setpriv runs");
    let t = text(&out);
    assert!(!out.status.success() && t.contains(&ckpt.display().to_string()) && t.contains("Permission denied"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
}
