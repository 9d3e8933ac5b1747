//! `pipeline.toml`: parsed into typed, validated settings with shared defaults.
//!
//! The file has a `[defaults]` table and one `[[experiment]]` table per experiment. Every section of
//! an experiment (`model`, `train`, `reset`, `aggregate`) may leave keys out: they come from
//! `[defaults]`, then from the built-in values below. Unknown keys are refused with their line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Declares a settings section twice: a `Partial*` form where every key may be missing (what the
/// file holds) and a resolved form with every value filled in.
macro_rules! section {
    ($(#[$meta:meta])* $name:ident / $partial:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty = $default:expr,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty,)* }

        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $partial { $($field: Option<$ty>,)* }

        impl $partial {
            /// Keys set here win over `base`.
            fn over(self, base: $partial) -> $partial {
                $partial { $($field: self.$field.or(base.$field),)* }
            }
            fn resolve(self) -> $name {
                $name { $($field: self.$field.unwrap_or_else(|| $default),)* }
            }
        }

        /// Every key at its default.
        impl Default for $name {
            fn default() -> $name {
                $partial::default().resolve()
            }
        }
    };
}

section! {
    /// The network: architecture and size.
    ModelConfig / PartialModel {
        /// `fcn`, `vgg11`, `vgg13`, `vgg16`, `vgg19`, `resnet18` or `resnet34`.
        arch: String = "fcn".to_string(),
        /// FCN: number of hidden layers.
        depth: u32 = 3,
        /// FCN: units per hidden layer.
        width: u32 = 256,
        /// VGG and ResNet: channel multiplier (1.0 is the standard network).
        width_mult: f64 = 1.0,
        /// VGG: BatchNorm after every convolution (ResNet always has it).
        batch_norm: bool = true,
        /// Zero-pad inputs to this size (28×28 datasets to 32 for the CNNs); 0 keeps them as they are.
        pad_to: u32 = 0,
        /// `pytorch` (U(−1/√fan_in, 1/√fan_in) for Linear and Conv) or `kaiming-normal`.
        init: String = "pytorch".to_string(),
    }
}

section! {
    /// Training: optimizer, schedule, checkpoints.
    TrainConfig / PartialTrain {
        epochs: u32 = 40,
        batch_size: u32 = 128,
        lr: f64 = 0.01,
        /// `constant`, `step`, `cosine`.
        schedule: String = "constant".to_string(),
        /// Step schedule: multiply the rate by `lr_gamma` at each of these epochs.
        lr_milestones: Vec<u32> = Vec::new(),
        lr_gamma: f64 = 0.1,
        /// Linear warm-up from 0 over this many epochs (0: none).
        warmup_epochs: u32 = 0,
        momentum: f64 = 0.9,
        nesterov: bool = false,
        weight_decay: f64 = 0.0,
        /// Random crop with padding 4 and horizontal flip.
        augment: bool = false,
        /// Epochs whose weights are kept; 0 is the initialization. The last epoch is always kept.
        checkpoints: Vec<u32> = vec![0, 1, 2, 3, 5, 10, 20, 40],
        /// Train on the first N training examples only (tests and quick looks); absent: all.
        train_examples: Option<u32> = None,
        /// Evaluate on the first N test examples only; absent: the whole test set.
        test_examples: Option<u32> = None,
        eval_batch_size: u32 = 1000,
    }
}

section! {
    /// The study: which resets, how many draws, how BatchNorm statistics are treated.
    ResetConfig / PartialReset {
        /// Any of `reinit`, `rerandomize`, `joint`.
        modes: Vec<String> = vec!["reinit".into(), "rerandomize".into(), "joint".into()],
        /// Re-randomization draws per unit.
        draws: u32 = 5,
        /// Any of `with-layer`, `keep`, `recalibrate`.
        bn_stats: Vec<String> = vec!["with-layer".into()],
        /// Training batches (of `batch_size`) used to recompute BatchNorm statistics.
        recalibrate_batches: u32 = 50,
        /// Size of the fixed, seeded training subset on which train_error is measured.
        train_subset: u32 = 10_000,
        /// Named joint sets: name → unit names. Built in as well: `all-but-first` and every suffix.
        joint_sets: BTreeMap<String, Vec<String>> = BTreeMap::new(),
        /// Add the suffix sets `from-<unit>` (unit d to the output).
        joint_suffixes: bool = true,
        /// Compute the activations entering a reset unit once per batch and share them among its
        /// variants. Off only to measure what it saves: the numbers are the same either way.
        prefix_reuse: bool = true,
    }
}

section! {
    /// Combining seeds and classifying units.
    AggregateConfig / PartialAggregate {
        /// A unit is robust when its mean test error is at most this far above the baseline
        /// (a fraction: 0.05 is 5 percentage points).
        tolerance: f64 = 0.05,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialDefaults {
    seeds: Option<Vec<u64>>,
    #[serde(default)]
    model: PartialModel,
    #[serde(default)]
    train: PartialTrain,
    #[serde(default)]
    reset: PartialReset,
    #[serde(default)]
    aggregate: PartialAggregate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialExperiment {
    name: toml::Spanned<String>,
    dataset: String,
    /// Short text for the report.
    description: Option<String>,
    seeds: Option<Vec<u64>>,
    #[serde(default)]
    model: PartialModel,
    #[serde(default)]
    train: PartialTrain,
    #[serde(default)]
    reset: PartialReset,
    #[serde(default)]
    aggregate: PartialAggregate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialPipeline {
    /// Where outputs go, relative to the pipeline file's folder.
    data_dir: Option<String>,
    /// Where datasets are kept; defaults to `<data_dir>/datasets`.
    datasets_dir: Option<String>,
    /// Experiments that `run-all` runs when none is named.
    default_experiments: Option<Vec<String>>,
    #[serde(default)]
    defaults: PartialDefaults,
    #[serde(default)]
    experiment: Vec<PartialExperiment>,
}

/// One experiment with every setting resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Experiment {
    pub name: String,
    pub dataset: String,
    pub description: String,
    pub seeds: Vec<u64>,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub reset: ResetConfig,
    pub aggregate: AggregateConfig,
}

/// The whole pipeline file, resolved.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file it was read from.
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub datasets_dir: PathBuf,
    pub default_experiments: Vec<String>,
    pub experiments: Vec<Experiment>,
}

pub const DATASETS: &[&str] = &["mnist", "fashion-mnist", "cifar10"];
pub const ARCHS: &[&str] = &["fcn", "vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34"];
pub const MODES: &[&str] = &["reinit", "rerandomize", "joint"];
pub const BN_STATS: &[&str] = &["with-layer", "keep", "recalibrate"];
pub const SCHEDULES: &[&str] = &["constant", "step", "cosine"];
pub const INITS: &[&str] = &["pytorch", "kaiming-normal"];

impl Pipeline {
    /// Reads and validates a pipeline file. Paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<Pipeline> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read pipeline file {}", path.display()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Pipeline::parse(&text, path, &base)
    }

    /// Parses pipeline text; `path` is only used in messages, `base` anchors relative paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Pipeline> {
        let file = path.display();
        let raw: PartialPipeline =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: {}", describe_toml_error(text, &e)))?;
        let defaults = raw.defaults;
        let mut experiments = Vec::new();
        for exp in raw.experiment {
            let line = line_of(text, exp.name.span().start);
            let name = exp.name.into_inner();
            let resolved = Experiment {
                dataset: exp.dataset,
                description: exp.description.unwrap_or_default(),
                seeds: exp.seeds.or(defaults.seeds.clone()).unwrap_or_else(|| vec![0]),
                model: exp.model.over(defaults.model.clone()).resolve(),
                train: exp.train.over(defaults.train.clone()).resolve(),
                reset: exp.reset.over(defaults.reset.clone()).resolve(),
                aggregate: exp.aggregate.over(defaults.aggregate.clone()).resolve(),
                name,
            };
            resolved
                .validate()
                .map_err(|e| anyhow::anyhow!("{file}, experiment '{}' (line {line}): {e}", resolved.name))?;
            if experiments.iter().any(|x: &Experiment| x.name == resolved.name) {
                bail!("{file}, line {line}: experiment '{}' is defined twice", resolved.name);
            }
            experiments.push(resolved);
        }
        if experiments.is_empty() {
            bail!("{file}: no [[experiment]] defined");
        }
        let default_experiments = raw.default_experiments.unwrap_or_else(|| vec![experiments[0].name.clone()]);
        for name in &default_experiments {
            if !experiments.iter().any(|e| &e.name == name) {
                bail!("{file}: default_experiments names '{name}', which is not an experiment");
            }
        }
        let data_dir = base.join(raw.data_dir.as_deref().unwrap_or("data"));
        let datasets_dir = match raw.datasets_dir {
            Some(d) => base.join(d),
            None => data_dir.join("datasets"),
        };
        Ok(Pipeline { path: path.to_path_buf(), data_dir, datasets_dir, default_experiments, experiments })
    }

    pub fn experiment(&self, name: &str) -> Result<&Experiment> {
        self.experiments.iter().find(|e| e.name == name).with_context(|| {
            let known: Vec<_> = self.experiments.iter().map(|e| e.name.as_str()).collect();
            format!("{}: no experiment named '{name}' (known: {})", self.path.display(), known.join(", "))
        })
    }
}

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        bail!("{key} = \"{value}\" is not one of: {}", allowed.join(", "))
    }
}

impl Experiment {
    fn validate(&self) -> Result<()> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("name must be non-empty and use only letters, digits, '-' and '_'");
        }
        one_of("dataset", &self.dataset, DATASETS)?;
        one_of("model.arch", &self.model.arch, ARCHS)?;
        one_of("model.init", &self.model.init, INITS)?;
        one_of("train.schedule", &self.train.schedule, SCHEDULES)?;
        for m in &self.reset.modes {
            one_of("reset.modes", m, MODES)?;
        }
        for b in &self.reset.bn_stats {
            one_of("reset.bn_stats", b, BN_STATS)?;
        }
        if self.reset.bn_stats.is_empty() {
            bail!("reset.bn_stats is empty: name at least one of {}", BN_STATS.join(", "));
        }
        if self.seeds.is_empty() {
            bail!("seeds is empty");
        }
        let t = &self.train;
        if t.epochs == 0 || t.epochs > 100_000 {
            bail!("train.epochs = {} is out of range (1 ..= 100000)", t.epochs);
        }
        if t.batch_size == 0 || t.batch_size > 1 << 20 {
            bail!("train.batch_size = {} is out of range", t.batch_size);
        }
        if t.eval_batch_size == 0 || t.eval_batch_size > 1 << 20 {
            bail!("train.eval_batch_size = {} is out of range", t.eval_batch_size);
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            bail!("train.lr = {} must be a positive number", t.lr);
        }
        if !(t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum)) {
            bail!("train.momentum = {} must be in [0, 1)", t.momentum);
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            bail!("train.weight_decay = {} must be ≥ 0", t.weight_decay);
        }
        if !t.checkpoints.contains(&0) {
            bail!("train.checkpoints must contain 0 (the initialization)");
        }
        if let Some(e) = t.checkpoints.iter().find(|&&e| e > t.epochs) {
            bail!("train.checkpoints names epoch {e}, after the last epoch ({})", t.epochs);
        }
        if t.train_examples == Some(0) || t.test_examples == Some(0) {
            bail!("train.train_examples and train.test_examples must be positive when set");
        }
        let m = &self.model;
        if m.arch == "fcn" && (m.width == 0 || m.width > 1 << 16 || m.depth > 1000) {
            bail!("model.width must be in 1 ..= 65536 and model.depth at most 1000");
        }
        if !(m.width_mult.is_finite() && m.width_mult > 0.0 && m.width_mult <= 16.0) {
            bail!("model.width_mult = {} must be in (0, 16]", m.width_mult);
        }
        if m.pad_to > 1024 {
            bail!("model.pad_to = {} is too large", m.pad_to);
        }
        if self.reset.draws > 1000 {
            bail!("reset.draws = {} is too many (at most 1000)", self.reset.draws);
        }
        if self.reset.train_subset == 0 {
            bail!("reset.train_subset must be positive");
        }
        for (set, units) in &self.reset.joint_sets {
            if units.is_empty() {
                bail!("reset.joint_sets.{set} names no unit");
            }
        }
        let tol = self.aggregate.tolerance;
        if !(tol.is_finite() && (0.0..=1.0).contains(&tol)) {
            bail!("aggregate.tolerance = {tol} must be a fraction in [0, 1]");
        }
        Ok(())
    }

    /// The checkpoint epochs actually kept: the configured list plus the last epoch, sorted.
    pub fn checkpoint_epochs(&self) -> Vec<u32> {
        let mut epochs = self.train.checkpoints.clone();
        epochs.push(self.train.epochs);
        epochs.sort_unstable();
        epochs.dedup();
        epochs
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The line of a TOML error, its text (so that the key at fault is named) and the fault.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let mut out = String::new();
    if let Some(span) = e.span() {
        let line = line_of(text, span.start);
        let _ = write!(out, "line {line}: ");
        let source = text.lines().nth(line - 1).unwrap_or("").trim();
        if !source.is_empty() {
            let shown: String = source.chars().take(80).collect();
            let more = if shown.len() < source.len() { "…" } else { "" };
            let _ = write!(out, "`{shown}{more}`: ");
        }
    }
    let _ = write!(out, "{}", e.message());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline> {
        Pipeline::parse(text, Path::new("test.toml"), Path::new("/base"))
    }

    const MINIMAL: &str = r#"
[defaults]
seeds = [0, 1]
[defaults.train]
lr = 0.05

[[experiment]]
name = "a"
dataset = "mnist"
[experiment.train]
epochs = 3
checkpoints = [0, 1]
"#;

    #[test]
    fn defaults_then_builtins_fill_missing_keys() {
        let p = parse(MINIMAL).unwrap();
        let e = &p.experiments[0];
        assert_eq!(e.seeds, vec![0, 1]);
        assert_eq!(e.train.lr, 0.05);
        assert_eq!(e.train.epochs, 3);
        assert_eq!(e.train.batch_size, 128);
        assert_eq!(e.checkpoint_epochs(), vec![0, 1, 3]);
        assert_eq!(p.data_dir, Path::new("/base/data"));
        assert_eq!(p.datasets_dir, Path::new("/base/data/datasets"));
        assert_eq!(p.default_experiments, vec!["a".to_string()]);
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let text = MINIMAL.replace("epochs = 3", "epochs = 3\nlearning_rate = 2");
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("line 12"), "{err}");
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn wrong_type_is_refused_with_its_line() {
        let text = MINIMAL.replace("epochs = 3", "epochs = \"three\"");
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains("line 11"), "{err}");
    }

    #[test]
    fn semantic_errors_name_experiment_and_key() {
        let text = MINIMAL.replace("checkpoints = [0, 1]", "checkpoints = [1, 2]");
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains("experiment 'a' (line 8)") && err.contains("must contain 0"), "{err}");
        let text = MINIMAL.replace("dataset = \"mnist\"", "dataset = \"imagenet\"");
        assert!(format!("{:#}", parse(&text).unwrap_err()).contains("imagenet"));
        let text = format!("{MINIMAL}[experiment.model]\narch = \"alexnet\"\n");
        assert!(format!("{:#}", parse(&text).unwrap_err()).contains("alexnet"));
        let text = format!("{MINIMAL}[experiment.reset.joint_sets]\nempty = []\n");
        assert!(format!("{:#}", parse(&text).unwrap_err()).contains("names no unit"));
        let text = MINIMAL.replace("epochs = 3", "epochs = -3");
        assert!(parse(&text).is_err());
    }

    #[test]
    fn empty_file_is_refused() {
        assert!(format!("{:#}", parse("").unwrap_err()).contains("no [[experiment]]"));
    }
}
