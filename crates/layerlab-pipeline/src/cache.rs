//! Stage keys and stamps: the one freshness check.
//!
//! A stage's key hashes its name and version, the canonical JSON of only the settings it reads,
//! and the keys of the stages it consumes (never the upstream files themselves). Each output
//! folder gets `stamp.json`, written last: no stamp means not done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::Sweep;
use crate::{fsutil, DataSource, Experiment, Layout, OptimizerKind, OwnDataset};

/// The five stages, in dependency order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    FetchData,
    Train,
    Snapshot,
    ResetEval,
    Aggregate,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::FetchData, Stage::Train, Stage::Snapshot, Stage::ResetEval, Stage::Aggregate];

    pub fn name(self) -> &'static str {
        match self {
            Stage::FetchData => "fetch-data",
            Stage::Train => "train",
            Stage::Snapshot => "snapshot",
            Stage::ResetEval => "reset-eval",
            Stage::Aggregate => "aggregate",
        }
    }

    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Bumped whenever a stage's output changes for the same inputs, so old results go stale.
    pub fn version(self) -> u32 {
        match self {
            Stage::FetchData => 1,
            Stage::Train => 1,
            Stage::Snapshot => 1,
            // 2: the joint set of the units robust alone (with `joint` and `reinit`).
            Stage::ResetEval => 2,
            // 2: the sweep report's table of train errors after re-initialization.
            // 3: the robust set, the growth curve, joint re-randomization and each unit's parameters.
            Stage::Aggregate => 3,
        }
    }
}

/// What a stage's key is made of, and the key itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageKey {
    pub stage: String,
    pub version: u32,
    /// The canonical settings this stage reads.
    pub config: Value,
    /// Keys of the stages consumed, by name.
    pub inputs: BTreeMap<String, String>,
    pub key: String,
}

impl StageKey {
    fn new(stage: Stage, config: Value, inputs: BTreeMap<String, String>) -> StageKey {
        // serde_json's map is sorted, so this text is canonical.
        let canonical =
            json!({ "stage": stage.name(), "version": stage.version(), "config": config, "inputs": inputs });
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        StageKey {
            stage: stage.name().into(),
            version: stage.version(),
            config,
            inputs,
            key: hex::encode(&digest[..12]),
        }
    }

    /// Short hash of the settings alone, for metadata ("config hash").
    pub fn config_hash(&self) -> String {
        hex::encode(&Sha256::digest(self.config.to_string().as_bytes())[..8])
    }
}

fn to_value<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("settings serialize to JSON")
}

/// fetch-data's key: a catalogue dataset's name; for the user's own, also its classes and the
/// sha256 of its two files (not where they are), so that changed files rerun everything after.
pub fn dataset_key(dataset: &DataSource) -> StageKey {
    match dataset {
        DataSource::Catalogue(d) => StageKey::new(Stage::FetchData, json!({ "dataset": d }), BTreeMap::new()),
        DataSource::Own(own) => own_dataset_key(own, &[file_sha256(&own.train), file_sha256(&own.test)]),
    }
}

/// fetch-data's key of an own dataset whose train and test files have these sha256 digests
/// (fetch-data hashes them once, for the key and for the manifest).
pub fn own_dataset_key(own: &OwnDataset, digests: &[String; 2]) -> StageKey {
    let config = json!({
        "dataset": own.name, "classes": own.classes,
        "files": { "train": digests[0], "test": digests[1] },
    });
    StageKey::new(Stage::FetchData, config, BTreeMap::new())
}

/// The sha256 of a file, or why it cannot be read (the stage that reads it then says so).
pub fn file_sha256(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => hex::encode(Sha256::digest(&bytes)),
        Err(e) => format!("unreadable: {e}"),
    }
}

pub fn train_key(exp: &Experiment, seed: u64) -> StageKey {
    // Keys only another optimizer reads stay out (an Adam run's `momentum`, from `[defaults]`),
    // so that changing them does not retrain it. SGD's keep `momentum` and `nesterov`, as before.
    let mut train = to_value(&exp.train);
    if let Some(fields) = train.as_object_mut() {
        let own = exp.train.optimizer.own_keys();
        for key in OptimizerKind::ALL.iter().flat_map(|o| o.own_keys()).filter(|k| !own.contains(k)) {
            fields.remove(*key);
        }
    }
    let mut config = json!({
        "experiment": exp.name, "dataset": exp.dataset, "seed": seed,
        "model": to_value(&exp.model), "train": train,
    });
    // An imported run is what its files hold: their sha256 in the key, not where they are.
    if let Some(dir) = &exp.train.import {
        if let Some(fields) = config["train"].as_object_mut() {
            fields.remove("import");
        }
        config["imported"] = imported_files(&import_dir(Path::new(dir), seed));
    }
    StageKey::new(Stage::Train, config, BTreeMap::from([("dataset".into(), dataset_key(&exp.dataset).key)]))
}

/// The folder a seed's imported checkpoints are in: `<dir>/seed-<seed>` when there is one, else
/// `dir` itself.
pub fn import_dir(dir: &Path, seed: u64) -> PathBuf {
    let per_seed = dir.join(format!("seed-{seed}"));
    if per_seed.is_dir() {
        per_seed
    } else {
        dir.to_path_buf()
    }
}

/// The `.safetensors` files of an import folder, in name order.
pub fn import_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// File name → sha256 of every checkpoint in an import folder, for the train key; a folder that
/// cannot be read gives its error instead (the stage then says what is wrong).
fn imported_files(dir: &Path) -> Value {
    let files = match import_files(dir) {
        Ok(files) => files,
        Err(e) => return json!({ "unreadable": format!("{}: {e}", dir.display()) }),
    };
    let mut out = serde_json::Map::new();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.insert(name, Value::String(file_sha256(&path)));
    }
    Value::Object(out)
}

pub fn snapshot_key(exp: &Experiment, seed: u64) -> StageKey {
    let config = json!({ "experiment": exp.name, "seed": seed });
    StageKey::new(Stage::Snapshot, config, BTreeMap::from([("train".into(), train_key(exp, seed).key)]))
}

pub fn reset_key(exp: &Experiment, seed: u64) -> StageKey {
    let mut config = json!({ "experiment": exp.name, "seed": seed, "reset": to_value(&exp.reset) });
    // Where `train.train_examples` cuts training short, the train subset has been drawn from the
    // examples trained on since 2026-12-06 (before: from the whole split); only those keys change.
    if exp.train.train_examples.is_some() {
        config["train_subset_from"] = json!("examples trained on");
    }
    // Which units are robust alone, and so which form the joint `robust` set, is decided by the
    // experiment's tolerance.
    if exp.reset.finds_robust_set() {
        config["robust_tolerance"] = json!(exp.aggregate.tolerance);
    }
    let inputs =
        BTreeMap::from([("dataset".into(), dataset_key(&exp.dataset).key), ("train".into(), train_key(exp, seed).key)]);
    StageKey::new(Stage::ResetEval, config, inputs)
}

pub fn aggregate_key(exp: &Experiment) -> StageKey {
    // The description is printed in the report, so it is part of what the stage reads.
    let config = json!({
        "experiment": exp.name, "description": exp.description, "seeds": exp.seeds,
        "aggregate": to_value(&exp.aggregate),
    });
    let mut inputs = BTreeMap::new();
    for &seed in &exp.seeds {
        inputs.insert(format!("reset/seed-{seed}"), reset_key(exp, seed).key);
        inputs.insert(format!("snapshot/seed-{seed}"), snapshot_key(exp, seed).key);
    }
    StageKey::new(Stage::Aggregate, config, inputs)
}

/// The key of a sweep's aggregate: the sweep's axes and points, and every point's aggregate key.
pub fn sweep_key(sweep: &Sweep, points: &[&Experiment]) -> StageKey {
    let config = json!({ "sweep": sweep.name, "axes": to_value(&sweep.axes), "points": sweep.points });
    let inputs = points.iter().map(|p| (format!("aggregate/{}", p.name), aggregate_key(p).key)).collect();
    StageKey::new(Stage::Aggregate, config, inputs)
}

/// The key of `stage` for an experiment (and seed, for per-seed stages).
pub fn key_for(stage: Stage, exp: &Experiment, seed: u64) -> StageKey {
    match stage {
        Stage::FetchData => dataset_key(&exp.dataset),
        Stage::Train => train_key(exp, seed),
        Stage::Snapshot => snapshot_key(exp, seed),
        Stage::ResetEval => reset_key(exp, seed),
        Stage::Aggregate => aggregate_key(exp),
    }
}

/// The output folder that holds a stage's stamp.
pub fn output_dir(layout: &Layout, stage: Stage, exp: &Experiment, seed: u64) -> PathBuf {
    match stage {
        Stage::FetchData => layout.dataset_dir(&exp.dataset),
        Stage::Train => layout.train_dir(&exp.name, seed),
        Stage::Snapshot => layout.snapshot_dir(&exp.name, seed),
        Stage::ResetEval => layout.reset_dir(&exp.name, seed),
        Stage::Aggregate => layout.results_dir(&exp.name),
    }
}

/// `stamp.json`: written last into an output folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stamp {
    #[serde(flatten)]
    pub key: StageKey,
    pub layerlab_version: String,
    /// Seconds since the Unix epoch when the stage finished (with a fraction, so that a stage
    /// rerun within the same second still orders after its inputs).
    pub finished_at: f64,
    pub seconds: f64,
    /// What the stage computed on (`cpu: <model>, N threads`, `cuda:0`), for stages that compute.
    /// Not part of the key: the same settings on another device are the same experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

pub const STAMP_FILE: &str = "stamp.json";

impl Stamp {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STAMP_FILE)
    }

    /// Writes the stamp (atomically) into `dir`: call only once every output is in place.
    pub fn write(dir: &Path, key: &StageKey, seconds: f64) -> Result<()> {
        Stamp::write_on(dir, key, seconds, None)
    }

    /// [`Stamp::write`] for a stage that computed on `device`.
    pub fn write_on(dir: &Path, key: &StageKey, seconds: f64, device: Option<&str>) -> Result<()> {
        let finished_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let device = device.map(str::to_string);
        let stamp = Stamp { key: key.clone(), layerlab_version: crate::VERSION.into(), finished_at, seconds, device };
        let text = serde_json::to_string_pretty(&stamp)?;
        fsutil::write_atomic(&Stamp::path(dir), text.as_bytes())
    }

    /// The stamp in `dir`, if there is a readable one.
    pub fn read(dir: &Path) -> Option<Stamp> {
        let text = std::fs::read_to_string(Stamp::path(dir)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Removes a stamp, so that the folder counts as not done while it is rewritten.
    pub fn remove(dir: &Path) -> Result<()> {
        match std::fs::remove_file(Stamp::path(dir)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", Stamp::path(dir).display())),
        }
    }
}

/// Whether a stage's output is up to date, and if not, why.
#[derive(Debug, Clone, PartialEq)]
pub enum Freshness {
    Fresh,
    Missing,
    Stale(String),
}

/// The one freshness check: compares the stamp in `dir` with the expected key.
pub fn freshness(dir: &Path, expected: &StageKey) -> Freshness {
    let Some(stamp) = Stamp::read(dir) else { return Freshness::Missing };
    let old = stamp.key;
    if old.key == expected.key {
        return Freshness::Fresh;
    }
    if old.version != expected.version {
        return Freshness::Stale(format!("stage version {} → {}", old.version, expected.version));
    }
    let mut reasons = Vec::new();
    if old.config != expected.config {
        reasons.push(format!("settings changed ({})", changed_keys(&old.config, &expected.config, "").join(", ")));
    }
    for (name, key) in &expected.inputs {
        match old.inputs.get(name) {
            Some(k) if k == key => {}
            Some(_) => reasons.push(format!("input {name} changed")),
            None => reasons.push(format!("new input {name}")),
        }
    }
    if reasons.is_empty() {
        reasons.push("key changed".into());
    }
    Freshness::Stale(reasons.join("; "))
}

/// Dotted names of the leaves that differ between two JSON values.
fn changed_keys(old: &Value, new: &Value, prefix: &str) -> Vec<String> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    changed_keys(a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null), &p)
                })
                .collect()
        }
        (a, b) if a == b => Vec::new(),
        _ => vec![if prefix.is_empty() { "(all)".into() } else { prefix.to_string() }],
    }
}

/// The output folders a stage reads, by input name.
pub fn input_dirs(layout: &Layout, stage: Stage, exp: &Experiment, seed: u64) -> Vec<(String, PathBuf)> {
    let out = |s: Stage, seed: u64| output_dir(layout, s, exp, seed);
    match stage {
        Stage::FetchData => Vec::new(),
        Stage::Train => vec![("dataset".into(), out(Stage::FetchData, seed))],
        Stage::Snapshot => vec![("train".into(), out(Stage::Train, seed))],
        Stage::ResetEval => {
            vec![("dataset".into(), out(Stage::FetchData, seed)), ("train".into(), out(Stage::Train, seed))]
        }
        Stage::Aggregate => exp
            .seeds
            .iter()
            .flat_map(|&s| {
                [
                    (format!("reset/seed-{s}"), out(Stage::ResetEval, s)),
                    (format!("snapshot/seed-{s}"), out(Stage::Snapshot, s)),
                ]
            })
            .collect(),
    }
}

/// The one freshness check of a stage: its stamp against its key, and against its inputs'
/// stamps (an input redone after this stage finished makes it stale, even with the same key).
pub fn check(layout: &Layout, stage: Stage, exp: &Experiment, seed: u64) -> Freshness {
    let dir = output_dir(layout, stage, exp, seed);
    check_dir(&dir, &key_for(stage, exp, seed), input_dirs(layout, stage, exp, seed))
}

/// The freshness of a sweep's aggregate, in `results/<sweep>/`.
pub fn check_sweep(layout: &Layout, sweep: &Sweep, points: &[&Experiment]) -> Freshness {
    let inputs = points.iter().map(|p| (format!("aggregate/{}", p.name), layout.results_dir(&p.name))).collect();
    check_dir(&layout.results_dir(&sweep.name), &sweep_key(sweep, points), inputs)
}

fn check_dir(dir: &Path, key: &StageKey, inputs: Vec<(String, PathBuf)>) -> Freshness {
    let own = freshness(dir, key);
    if own != Freshness::Fresh {
        return own;
    }
    let finished = Stamp::read(dir).map(|s| s.finished_at).unwrap_or(0.0);
    for (name, input) in inputs {
        match Stamp::read(&input) {
            None => return Freshness::Stale(format!("input {name} is missing")),
            Some(s) if s.finished_at > finished => return Freshness::Stale(format!("input {name} was redone")),
            Some(_) => {}
        }
    }
    Freshness::Fresh
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dataset, Pipeline};

    fn pipeline(extra: &str) -> Pipeline {
        let text = format!(
            "[[experiment]]\nname = \"a\"\ndataset = \"mnist\"\n[experiment.train]\nepochs = 2\ncheckpoints = [0]\n{extra}\n\
             [[experiment]]\nname = \"b\"\ndataset = \"mnist\"\n"
        );
        Pipeline::parse(&text, Path::new("p.toml"), Path::new("/x")).unwrap()
    }

    #[test]
    fn reset_setting_changes_only_reset_and_aggregate_keys() {
        let p1 = pipeline("");
        let p2 = pipeline("[experiment.reset]\ndraws = 2");
        let (a1, a2) = (&p1.experiments[0], &p2.experiments[0]);
        assert_eq!(train_key(a1, 0), train_key(a2, 0));
        assert_eq!(snapshot_key(a1, 0), snapshot_key(a2, 0));
        assert_ne!(reset_key(a1, 0).key, reset_key(a2, 0).key);
        assert_ne!(aggregate_key(a1).key, aggregate_key(a2).key);
        assert_eq!(aggregate_key(&p1.experiments[1]), aggregate_key(&p2.experiments[1]));
    }

    #[test]
    fn description_changes_only_the_aggregate_key() {
        let p1 = pipeline("");
        let p2 = pipeline("")
            .experiments
            .iter()
            .map(|e| Experiment { description: "new words".into(), ..e.clone() })
            .collect::<Vec<_>>();
        let (a1, a2) = (&p1.experiments[0], &p2[0]);
        for stage in [Stage::Train, Stage::Snapshot, Stage::ResetEval] {
            assert_eq!(key_for(stage, a1, 0), key_for(stage, a2, 0), "{stage:?}");
        }
        assert_ne!(aggregate_key(a1).key, aggregate_key(a2).key);
    }

    #[test]
    fn train_setting_changes_everything_downstream() {
        let p1 = pipeline("");
        let p2 = pipeline("lr = 0.02");
        let (a1, a2) = (&p1.experiments[0], &p2.experiments[0]);
        assert_eq!(dataset_key(&Dataset::Mnist.into()), dataset_key(&a2.dataset));
        for stage in [Stage::Train, Stage::Snapshot, Stage::ResetEval, Stage::Aggregate] {
            assert_ne!(key_for(stage, a1, 0).key, key_for(stage, a2, 0).key, "{stage:?}");
        }
        assert_ne!(train_key(a1, 0).key, train_key(a1, 1).key);
    }

    #[test]
    fn tf32_is_in_the_train_key_only_when_on() {
        let (off, on) = (pipeline(""), pipeline("tf32 = true"));
        let (a_off, a_on) = (&off.experiments[0], &on.experiments[0]);
        assert!(!train_key(a_off, 0).config.to_string().contains("tf32"), "a key made before tf32 existed must hold");
        assert!(train_key(a_on, 0).config.to_string().contains("\"tf32\":true"));
        assert_ne!(train_key(a_off, 0).key, train_key(a_on, 0).key);
        assert_eq!(pipeline("tf32 = false").experiments[0].train, a_off.train);
    }

    /// A train key holds only its optimizer's own keys: an Adam run's key does not move with
    /// SGD's `momentum` (set in `[defaults]` by the shipped file), an SGD run's keeps it.
    #[test]
    fn a_train_key_holds_only_its_optimizers_keys() {
        let with = |defaults: &str, train: &str| {
            let text = format!(
                "[defaults.train]\n{defaults}\n[[experiment]]\nname = \"a\"\ndataset = \"mnist\"\n\
                 [experiment.train]\nepochs = 2\ncheckpoints = [0]\n{train}\n"
            );
            let p = Pipeline::parse(&text, Path::new("p.toml"), Path::new("/x")).unwrap();
            train_key(&p.experiments[0], 0)
        };
        let adam = "optimizer = \"adam\"";
        assert_eq!(with("momentum = 0.9", adam), with("momentum = 0.5\nnesterov = true", adam));
        assert!(!with("momentum = 0.9", adam).config.to_string().contains("momentum"));
        assert_ne!(with("momentum = 0.9", ""), with("momentum = 0.5", ""));
        assert!(with("momentum = 0.9", "").config.to_string().contains("\"momentum\":0.9"));
        assert_eq!(with("betas = [0.5, 0.9]", ""), with("", ""));
        assert_ne!(with("betas = [0.5, 0.9]", adam), with("", adam));
    }

    /// Only experiments that train on part of the split have a new reset key: their train subset
    /// is now drawn from the examples trained on.
    #[test]
    fn only_experiments_trained_on_part_of_the_split_get_a_new_reset_key() {
        let (whole, part) = (pipeline(""), pipeline("train_examples = 100"));
        assert!(!reset_key(&whole.experiments[0], 0).config.to_string().contains("train_subset_from"));
        assert!(reset_key(&part.experiments[0], 0).config.to_string().contains("train_subset_from"));
    }

    #[test]
    fn stamp_freshness_names_what_changed() {
        let dir = std::env::temp_dir().join(format!("layerlab-stamp-{}", std::process::id()));
        let p1 = pipeline("");
        let p2 = pipeline("[experiment.reset]\ndraws = 2");
        let k1 = reset_key(&p1.experiments[0], 0);
        assert_eq!(freshness(&dir, &k1), Freshness::Missing);
        Stamp::write(&dir, &k1, 1.5).unwrap();
        assert_eq!(freshness(&dir, &k1), Freshness::Fresh);
        match freshness(&dir, &reset_key(&p2.experiments[0], 0)) {
            Freshness::Stale(why) => assert!(why.contains("reset.draws"), "{why}"),
            other => panic!("expected stale, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
