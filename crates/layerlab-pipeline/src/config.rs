//! `pipeline.toml`: parsed into typed, validated settings with shared defaults.
//!
//! The file has a `[defaults]` table and one `[[experiment]]` table per experiment. Every section of
//! an experiment (`model`, `train`, `reset`, `aggregate`) may leave keys out: they come from
//! `[defaults]`, then from the built-in values below. Unknown keys are refused with their line.
//!
//! A `[[sweep]]` declares a grid of experiments: a base experiment (by name, or inline) and axes
//! over its settings. It expands here into ordinary experiments (see [`Sweep`]), so that every
//! stage, key and stamp treats a sweep point like any other experiment.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::settings::{
    Arch, BnStats, ComputePath, DataSource, Dataset, OptimizerKind, OwnDataset, ResetMode, Schedule, WeightInit,
};

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
            /// The keys this table sets, in declaration order.
            #[allow(dead_code)]
            fn keys_set(&self) -> Vec<&'static str> {
                let mut set = Vec::new();
                $(if self.$field.is_some() { set.push(stringify!($field)); })*
                set
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
        /// `fcn`, `vgg11`, `vgg13`, `vgg16`, `vgg19`, `resnet18`, `resnet34`, `resnet50` or `resnet101`.
        arch: Arch = Arch::Fcn,
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
        init: WeightInit = WeightInit::Pytorch,
    }
}

impl ModelConfig {
    /// The `[model]` keys that `arch` reads; the others hold their values unused (`depth` and
    /// `width` are the FCN's, `width_mult` the CNNs', `batch_norm` VGG's). The report lists only
    /// these; the cache key keeps every key, so that old keys hold.
    pub fn keys_read(&self) -> &'static [&'static str] {
        match self.arch {
            Arch::Fcn => &["arch", "depth", "width", "pad_to", "init"],
            Arch::Vgg11 | Arch::Vgg13 | Arch::Vgg16 | Arch::Vgg19 => {
                &["arch", "width_mult", "batch_norm", "pad_to", "init"]
            }
            Arch::Resnet18 | Arch::Resnet34 | Arch::Resnet50 | Arch::Resnet101 => {
                &["arch", "width_mult", "pad_to", "init"]
            }
        }
    }
}

section! {
    /// Training: optimizer, schedule, checkpoints.
    TrainConfig / PartialTrain {
        epochs: u32 = 40,
        batch_size: u32 = 128,
        /// The learning rate (PyTorch's default for Adam and AdamW, 0.001, when they are chosen
        /// and `lr` is not set).
        lr: f64 = 0.01,
        /// `constant`, `step`, `cosine`.
        schedule: Schedule = Schedule::Constant,
        /// Step schedule: multiply the rate by `lr_gamma` at each of these epochs.
        lr_milestones: Vec<u32> = Vec::new(),
        lr_gamma: f64 = 0.1,
        /// Linear warm-up from 0 over this many epochs (0: none).
        warmup_epochs: u32 = 0,
        /// `sgd`, `adam` or `adamw`, with PyTorch's semantics and defaults. In the key only when
        /// not `sgd`, so that earlier keys hold.
        #[serde(skip_serializing_if = "OptimizerKind::is_sgd")]
        optimizer: OptimizerKind = OptimizerKind::Sgd,
        /// SGD only.
        momentum: f64 = 0.9,
        /// SGD only.
        nesterov: bool = false,
        /// Adam and AdamW only: the decay rates of the gradient's running mean and of its
        /// square's. In the key only when changed.
        #[serde(skip_serializing_if = "is_default_betas")]
        betas: [f64; 2] = DEFAULT_BETAS,
        /// Adam and AdamW only: added to the denominator. In the key only when changed.
        #[serde(skip_serializing_if = "is_default_eps")]
        eps: f64 = DEFAULT_EPS,
        /// L2 weight decay for SGD and Adam (added to the gradient), decoupled for AdamW (the
        /// weights shrink by lr · weight_decay). AdamW's default is PyTorch's, 0.01.
        weight_decay: f64 = 0.0,
        /// Random crop with padding 4 and horizontal flip.
        augment: bool = false,
        /// The fraction of training labels replaced by uniform random classes, seeded by the
        /// training seed and fixed for the whole run (1: the random-label setting). Test labels
        /// are untouched. In the key only when not 0, so that earlier keys hold.
        #[serde(skip_serializing_if = "is_zero")]
        label_noise: f64 = 0.0,
        /// Epochs whose weights are kept; 0 is the initialization. The last epoch is always kept.
        checkpoints: Vec<u32> = vec![0, 1, 2, 3, 5, 10, 20, 40],
        /// Train on the first N training examples only (tests and quick looks); absent: all.
        train_examples: Option<u32> = None,
        /// Evaluate on the first N test examples only; absent: the whole test set.
        test_examples: Option<u32> = None,
        eval_batch_size: u32 = 1000,
        /// How networks are computed on the CPU: `fast` (layerlab's own paths for fully connected
        /// and convolutional networks) or `autograd` (candle's ops, the path a GPU takes, to
        /// cross-check a result). A GPU always takes candle's path.
        /// Left out of the key's JSON at its default, so that keys made before it existed hold.
        #[serde(skip_serializing_if = "ComputePath::is_fast")]
        compute: ComputePath = ComputePath::Fast,
        /// On a GPU: let matrix products (cuBLAS) and convolutions (cuDNN) use TF32, which rounds
        /// their inputs to 10-bit mantissas, for speed. Off: f32 throughout, as on the CPU. No
        /// effect on the CPU. In the key (left out at its default, so that earlier keys hold).
        #[serde(skip_serializing_if = "is_false")]
        tf32: bool = false,
        /// A folder of checkpoints trained elsewhere (one safetensors file per kept epoch, 0
        /// included; `seed-<S>/` subfolders for several seeds), imported instead of training.
        /// Relative to the pipeline file's folder; resolved when the file is read. The key holds
        /// the files' sha256, not the path.
        #[serde(skip_serializing_if = "Option::is_none")]
        import: Option<String> = None,
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The joint set of the units robust on their own at τ = 0, which reset-eval finds and adds.
pub const ROBUST_SET: &str = "robust";
/// The built-in joint sets' names besides the suffixes (`from-<unit>`), refused as the name of a
/// configured set.
pub const RESERVED_SET_NAMES: [&str; 2] = ["all-but-first", ROBUST_SET];

/// PyTorch's Adam and AdamW defaults.
const DEFAULT_BETAS: [f64; 2] = [0.9, 0.999];
const DEFAULT_EPS: f64 = 1e-8;
const ADAM_DEFAULT_LR: f64 = 1e-3;
const ADAMW_DEFAULT_WEIGHT_DECAY: f64 = 1e-2;

fn is_default_betas(b: &[f64; 2]) -> bool {
    *b == DEFAULT_BETAS
}

fn is_default_eps(e: &f64) -> bool {
    *e == DEFAULT_EPS
}

impl PartialTrain {
    /// The keys set here that only another optimizer than `optimizer` reads.
    fn foreign_optimizer_keys(&self, optimizer: OptimizerKind) -> Vec<&'static str> {
        let set = self.keys_set();
        let others = OptimizerKind::ALL.iter().filter(|&&o| o != optimizer).flat_map(|o| o.own_keys());
        let mut foreign: Vec<&'static str> =
            others.filter(|k| !optimizer.own_keys().contains(k) && set.contains(k)).copied().collect();
        foreign.sort_unstable();
        foreign.dedup();
        foreign
    }

    /// PyTorch's defaults of the chosen optimizer where they differ from SGD's: Adam's and
    /// AdamW's learning rate, AdamW's weight decay; only where the settings leave them out.
    fn with_optimizer_defaults(mut self) -> PartialTrain {
        match self.optimizer.unwrap_or(OptimizerKind::Sgd) {
            OptimizerKind::Sgd => {}
            OptimizerKind::Adam => {
                self.lr = self.lr.or(Some(ADAM_DEFAULT_LR));
            }
            OptimizerKind::Adamw => {
                self.lr = self.lr.or(Some(ADAM_DEFAULT_LR));
                self.weight_decay = self.weight_decay.or(Some(ADAMW_DEFAULT_WEIGHT_DECAY));
            }
        }
        self
    }
}

section! {
    /// The study: which resets, how many draws, how BatchNorm statistics are treated.
    ResetConfig / PartialReset {
        /// Any of `reinit`, `rerandomize`, `joint`, `joint-rerandomize`, `growth`.
        modes: Vec<ResetMode> = ResetMode::ALL.to_vec(),
        /// Re-randomization draws per unit.
        draws: u32 = 5,
        /// Any of `with-layer`, `keep`, `recalibrate`.
        bn_stats: Vec<BnStats> = vec![BnStats::WithLayer],
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

impl ResetConfig {
    /// Whether reset-eval adds the joint set of the units robust alone (`robust`): it needs each
    /// unit's own re-initialization (`reinit`) and joint resets (`joint` or `joint-rerandomize`).
    pub fn finds_robust_set(&self) -> bool {
        self.modes.contains(&ResetMode::Reinit)
            && (self.modes.contains(&ResetMode::Joint) || self.modes.contains(&ResetMode::JointRerandomize))
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
    /// A catalogue name or a `[[dataset]]`'s.
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

/// `[[dataset]]`: a dataset of the user's own, in files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialOwnDataset {
    name: toml::Spanned<String>,
    classes: usize,
    /// `.npz` or `.safetensors`, relative to the pipeline file.
    train: String,
    test: String,
}

impl PartialOwnDataset {
    fn resolve(self, base: &Path, taken: &[Arc<OwnDataset>]) -> Result<OwnDataset> {
        let name = self.name.into_inner();
        if !valid_name(&name) {
            bail!("the name must be non-empty and use only letters, digits, '-' and '_'");
        }
        if name.parse::<Dataset>().is_ok() {
            bail!(
                "'{name}' is the name of a dataset layerlab fetches itself ({}): give yours another",
                Dataset::names()
            );
        }
        if taken.iter().any(|d| d.name == name) {
            bail!("dataset '{name}' is declared twice");
        }
        if !(2..=256).contains(&self.classes) {
            bail!("classes = {} must be from 2 to 256 (labels are stored as one byte)", self.classes);
        }
        for (key, file) in [("train", &self.train), ("test", &self.test)] {
            if !(file.ends_with(".npz") || file.ends_with(".safetensors")) {
                bail!("{key} = \"{file}\" must be a .npz or .safetensors file (arrays `images` and `labels`)");
            }
        }
        Ok(OwnDataset { name, classes: self.classes, train: base.join(&self.train), test: base.join(&self.test) })
    }
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
    /// The user's own datasets.
    #[serde(default)]
    dataset: Vec<PartialOwnDataset>,
    #[serde(default)]
    experiment: Vec<PartialExperiment>,
    #[serde(default)]
    sweep: Vec<PartialSweep>,
    #[serde(default)]
    executor: ExecutorConfig,
}

/// Where `run-all` runs the stages. Not part of any key: both executors give the same bytes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    /// `local` (this machine, the default) or `slurm` (one `sbatch` job per stage).
    #[serde(default)]
    pub kind: ExecutorKind,
    /// Slurm partition (`--partition`); absent: the cluster's default.
    pub partition: Option<String>,
    /// Slurm account (`--account`).
    pub account: Option<String>,
    /// Wall-time limit of each job, in any form `sbatch --time` takes (`30`, `2:00:00`, `1-0`).
    pub time: Option<String>,
    /// CPUs of each job (`--cpus-per-task`); also the stage's compute threads.
    #[serde(default = "one")]
    pub cpus_per_task: u32,
    /// GPUs of each job (`--gpus-per-task`); 0 asks for none.
    #[serde(default)]
    pub gpus_per_task: u32,
    /// Memory of each job (`--mem`, e.g. `8G`).
    pub mem: Option<String>,
    /// Further `sbatch` arguments, passed as they are (e.g. `["--qos=short"]`).
    #[serde(default)]
    pub sbatch_flags: Vec<String>,
}

impl Default for ExecutorConfig {
    fn default() -> ExecutorConfig {
        ExecutorConfig {
            kind: ExecutorKind::Local,
            partition: None,
            account: None,
            time: None,
            cpus_per_task: 1,
            gpus_per_task: 0,
            mem: None,
            sbatch_flags: Vec::new(),
        }
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutorKind {
    #[default]
    Local,
    Slurm,
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<ExecutorKind, String> {
        match s {
            "local" => Ok(ExecutorKind::Local),
            "slurm" => Ok(ExecutorKind::Slurm),
            other => Err(format!("unknown executor '{other}' (executors: local, slurm)")),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialSweep {
    name: toml::Spanned<String>,
    /// An experiment's name, or an inline experiment table (without `name`).
    base: toml::Value,
    /// Short text for the sweep's report.
    description: Option<String>,
    /// Dotted setting name → the values it takes, in the file's order.
    axes: toml::Spanned<toml::Table>,
}

/// One experiment with every setting resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Experiment {
    pub name: String,
    pub dataset: DataSource,
    pub description: String,
    pub seeds: Vec<u64>,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub reset: ResetConfig,
    pub aggregate: AggregateConfig,
    /// The sweep this experiment is a point of, with the point's axis values; `None` for an
    /// experiment declared by hand.
    pub sweep: Option<SweepPoint>,
}

/// Where an expanded experiment sits in its sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    pub sweep: String,
    /// (axis, value) in the sweep's axis order.
    pub values: Vec<(String, AxisValue)>,
}

/// One value an axis takes: a TOML scalar, or a list of scalars (for list settings).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AxisValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    List(Vec<AxisValue>),
}

impl AxisValue {
    fn from_toml(value: &toml::Value) -> Result<AxisValue> {
        Ok(match value {
            toml::Value::Integer(i) => AxisValue::Int(*i),
            toml::Value::Float(f) => AxisValue::Float(*f),
            toml::Value::Boolean(b) => AxisValue::Bool(*b),
            toml::Value::String(s) => AxisValue::Text(s.clone()),
            toml::Value::Array(items) => {
                AxisValue::List(items.iter().map(AxisValue::from_toml).collect::<Result<_>>()?)
            }
            other => bail!("{other} is not a value an axis can take (numbers, strings, booleans, or lists of them)"),
        })
    }

    /// How the value appears in point names: `3`, `0.05`, `cosine`, `true`, `keep+recalibrate`.
    pub fn label(&self) -> String {
        match self {
            AxisValue::Int(i) => i.to_string(),
            AxisValue::Float(f) => f.to_string(),
            AxisValue::Bool(b) => b.to_string(),
            AxisValue::Text(s) => s.clone(),
            AxisValue::List(items) => items.iter().map(AxisValue::label).collect::<Vec<_>>().join("+"),
        }
    }
}

/// A grid of experiments: every combination of the axes' values applied to the base experiment.
///
/// Point names are `<sweep>.<axis>-<value>` for each axis in the file's order, where `<axis>` is the
/// setting's last part (`model.depth` → `depth`, or the whole dotted name with `_` for `.` when
/// two axes end alike): `fcn-depth.depth-3.width-256`. Names depend only on a point's own values,
/// so adding a value to an axis adds points and leaves the others' names (and caches) alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sweep {
    pub name: String,
    pub description: String,
    /// (dotted setting, values) in the file's order.
    pub axes: Vec<(String, Vec<AxisValue>)>,
    /// The expanded experiments' names, first axis varying slowest.
    pub points: Vec<String>,
}

/// The whole pipeline file, resolved.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file it was read from.
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub datasets_dir: PathBuf,
    /// The user's own datasets (`[[dataset]]`), in the file's order.
    pub own_datasets: Vec<Arc<OwnDataset>>,
    /// Experiment or sweep names.
    pub default_experiments: Vec<String>,
    /// Every experiment: those declared by hand, then every sweep's points.
    pub experiments: Vec<Experiment>,
    pub sweeps: Vec<Sweep>,
    pub executor: ExecutorConfig,
}

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
        let mut own_datasets: Vec<Arc<OwnDataset>> = Vec::new();
        for dataset in raw.dataset {
            let line = line_of(text, dataset.name.span().start);
            let name = dataset.name.get_ref().clone();
            let resolved = dataset
                .resolve(base, &own_datasets)
                .map_err(|e| anyhow::anyhow!("{file}, dataset '{name}' (line {line}): {e}"))?;
            own_datasets.push(Arc::new(resolved));
        }
        let mut experiments: Vec<Experiment> = Vec::new();
        for exp in raw.experiment {
            let line = line_of(text, exp.name.span().start);
            let name = exp.name.get_ref().clone();
            let resolved = exp
                .resolve(&defaults, &own_datasets)
                .and_then(|r| r.validate().map(|()| r))
                .map_err(|e| anyhow::anyhow!("{file}, experiment '{name}' (line {line}): {e}"))?;
            if experiments.iter().any(|x: &Experiment| x.name == resolved.name) {
                bail!("{file}, line {line}: experiment '{}' is defined twice", resolved.name);
            }
            experiments.push(resolved);
        }
        let mut sweeps: Vec<Sweep> = Vec::new();
        if !raw.sweep.is_empty() {
            // Sweeps copy their base experiment's table as written, so the file is read once more
            // as plain TOML (it parsed above, so this cannot fail).
            let doc: toml::Table = toml::from_str(text)?;
            for sweep in raw.sweep {
                let line = line_of(text, sweep.name.span().start);
                let name = sweep.name.get_ref().clone();
                let taken = experiments.iter().any(|e| e.name == name) || sweeps.iter().any(|s| s.name == name);
                if taken {
                    bail!("{file}, line {line}: sweep '{name}' has the name of another experiment or sweep");
                }
                let (sweep, points) = expand_sweep(sweep, &doc, &defaults, &own_datasets)
                    .map_err(|e| anyhow::anyhow!("{file}, sweep '{name}' (line {line}): {e:#}"))?;
                experiments.extend(points);
                sweeps.push(sweep);
            }
        }
        if experiments.is_empty() {
            bail!("{file}: no [[experiment]] defined");
        }
        let default_experiments = raw.default_experiments.unwrap_or_else(|| vec![experiments[0].name.clone()]);
        for name in &default_experiments {
            if !experiments.iter().any(|e| &e.name == name) && !sweeps.iter().any(|s| &s.name == name) {
                bail!("{file}: default_experiments names '{name}', which is not an experiment or a sweep");
            }
        }
        // An imported run's folder is relative to the pipeline file, like every path in it.
        for e in &mut experiments {
            if let Some(dir) = &e.train.import {
                e.train.import = Some(base.join(dir).to_string_lossy().into_owned());
            }
        }
        let data_dir = base.join(raw.data_dir.as_deref().unwrap_or("data"));
        let datasets_dir = match raw.datasets_dir {
            Some(d) => base.join(d),
            None => data_dir.join("datasets"),
        };
        if raw.executor.cpus_per_task == 0 {
            bail!("{file}: executor.cpus_per_task must be at least 1");
        }
        Ok(Pipeline {
            path: path.to_path_buf(),
            data_dir,
            datasets_dir,
            own_datasets,
            default_experiments,
            experiments,
            sweeps,
            executor: raw.executor,
        })
    }

    pub fn experiment(&self, name: &str) -> Result<&Experiment> {
        self.experiments.iter().find(|e| e.name == name).with_context(|| {
            let known: Vec<_> = self.experiments.iter().map(|e| e.name.as_str()).collect();
            format!("{}: no experiment named '{name}' (known: {})", self.path.display(), known.join(", "))
        })
    }

    pub fn sweep(&self, name: &str) -> Result<&Sweep> {
        self.sweeps.iter().find(|s| s.name == name).with_context(|| {
            let known: Vec<_> = self.sweeps.iter().map(|s| s.name.as_str()).collect();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            format!("{}: no sweep named '{name}' (sweeps: {known})", self.path.display())
        })
    }

    /// The experiments a name stands for: the experiment itself, or every point of a sweep.
    pub fn select(&self, name: &str) -> Result<Vec<&Experiment>> {
        if let Some(sweep) = self.sweeps.iter().find(|s| s.name == name) {
            return sweep.points.iter().map(|p| self.experiment(p)).collect();
        }
        self.experiments.iter().find(|e| e.name == name).map(|e| vec![e]).with_context(|| {
            let mut known: Vec<_> =
                self.experiments.iter().filter(|e| e.sweep.is_none()).map(|e| e.name.as_str()).collect();
            known.extend(self.sweeps.iter().map(|s| s.name.as_str()));
            format!("{}: no experiment or sweep named '{name}' (known: {})", self.path.display(), known.join(", "))
        })
    }
}

impl PartialExperiment {
    /// Fills what the experiment leaves out from `[defaults]`, then from the built-in values.
    /// The experiment with `[defaults]` and the built-in values filled in. A key of one
    /// optimizer set in the experiment itself while it uses another is refused (`[defaults]`
    /// may hold every optimizer's keys: each experiment reads its own).
    fn resolve(self, defaults: &PartialDefaults, own_datasets: &[Arc<OwnDataset>]) -> Result<Experiment> {
        let dataset = match self.dataset.parse::<Dataset>() {
            Ok(d) => DataSource::Catalogue(d),
            Err(_) => match own_datasets.iter().find(|d| d.name == self.dataset) {
                Some(own) => DataSource::Own(Arc::clone(own)),
                None => bail!(
                    "unknown dataset '{}' (known: {}; declare your own with [[dataset]])",
                    self.dataset,
                    OwnDataset::names_with_catalogue(own_datasets)
                ),
            },
        };
        let train = self.train.clone().over(defaults.train.clone());
        let optimizer = train.optimizer.unwrap_or(OptimizerKind::Sgd);
        let foreign = self.train.foreign_optimizer_keys(optimizer);
        if !foreign.is_empty() {
            let keys = foreign.iter().map(|k| format!("train.{k}")).collect::<Vec<_>>().join(", ");
            bail!(
                "{keys}: not a setting of train.optimizer = \"{optimizer}\" (it reads {})",
                optimizer.own_keys().iter().map(|k| format!("train.{k}")).collect::<Vec<_>>().join(", ")
            );
        }
        // As for the optimizer: `[defaults.model]` may hold every architecture's keys, but a key
        // the experiment's own architecture does not read is a mistake (`resnet50` with `depth`).
        let model = self.model.clone().over(defaults.model.clone()).resolve();
        let reads = model.keys_read();
        let foreign: Vec<String> =
            self.model.keys_set().into_iter().filter(|k| !reads.contains(k)).map(|k| format!("model.{k}")).collect();
        if !foreign.is_empty() {
            bail!(
                "{}: not a setting of model.arch = \"{}\" (it reads {})",
                foreign.join(", "),
                model.arch,
                reads.iter().filter(|&&k| k != "arch").map(|k| format!("model.{k}")).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(Experiment {
            dataset,
            description: self.description.unwrap_or_default(),
            seeds: self.seeds.or(defaults.seeds.clone()).unwrap_or_else(|| vec![0]),
            model,
            train: train.with_optimizer_defaults().resolve(),
            reset: self.reset.over(defaults.reset.clone()).resolve(),
            aggregate: self.aggregate.over(defaults.aggregate.clone()).resolve(),
            name: self.name.into_inner(),
            sweep: None,
        })
    }
}

/// The sections a sweep axis may reach into, besides `dataset`.
const AXIS_SECTIONS: &[&str] = &["model", "train", "reset", "aggregate"];

/// A sweep's axes checked and its points built: each point is the base table with the point's
/// values set, read and validated as an experiment.
fn expand_sweep(
    raw: PartialSweep,
    doc: &toml::Table,
    defaults: &PartialDefaults,
    own_datasets: &[Arc<OwnDataset>],
) -> Result<(Sweep, Vec<Experiment>)> {
    let sweep_name = raw.name.into_inner();
    if !valid_name(&sweep_name) {
        bail!("the name must be non-empty and use only letters, digits, '-' and '_'");
    }
    let mut base = match &raw.base {
        toml::Value::String(name) => {
            let found = doc
                .get("experiment")
                .and_then(toml::Value::as_array)
                .and_then(|list| list.iter().find(|e| e.get("name").and_then(toml::Value::as_str) == Some(name)));
            let Some(toml::Value::Table(table)) = found else {
                bail!("base = \"{name}\" is not an experiment of this file");
            };
            table.clone()
        }
        toml::Value::Table(table) => table.clone(),
        _ => bail!("base must be an experiment's name or an inline experiment table"),
    };
    base.remove("name");
    let base_description = match base.remove("description") {
        Some(toml::Value::String(s)) => s,
        _ => String::new(),
    };

    let mut axes: Vec<(String, Vec<AxisValue>, Vec<toml::Value>)> = Vec::new();
    if raw.axes.get_ref().is_empty() {
        bail!("axes is empty: give at least one setting and its values");
    }
    for (key, values) in raw.axes.get_ref() {
        let parts: Vec<&str> = key.split('.').collect();
        let reachable = match parts.as_slice() {
            ["dataset"] => true,
            [section, _, ..] => AXIS_SECTIONS.contains(section),
            _ => false,
        };
        if !reachable {
            let why = match key.as_str() {
                "seeds" => " (seeds stay a list on the base experiment)".to_string(),
                _ => format!(
                    " (axes are `dataset` or `<section>.<key>` with section one of {})",
                    AXIS_SECTIONS.join(", ")
                ),
            };
            bail!("axis '{key}' is not a setting a sweep can vary{why}");
        }
        let Some(list) = values.as_array().filter(|l| !l.is_empty()) else {
            bail!("axis '{key}' must be a non-empty list of values");
        };
        let parsed = list
            .iter()
            .map(AxisValue::from_toml)
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("axis '{key}'"))?;
        for (i, v) in parsed.iter().enumerate() {
            let label = v.label();
            if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c)) {
                bail!("axis '{key}': value {} cannot be part of a name (letters, digits, '-', '_', '.', '+')", list[i]);
            }
            if parsed[..i].iter().any(|w| w.label() == label) {
                bail!("axis '{key}' lists {} twice", list[i]);
            }
        }
        axes.push((key.clone(), parsed, list.clone()));
    }
    let labels: Vec<String> = axes
        .iter()
        .map(|(key, _, _)| {
            let last = key.rsplit('.').next().unwrap_or(key);
            let clash = axes.iter().filter(|(k, _, _)| k.rsplit('.').next() == Some(last)).count() > 1;
            if clash {
                key.replace('.', "_")
            } else {
                last.to_string()
            }
        })
        .collect();

    // Each axis alone first, so that a setting that does not exist or a value of the wrong type is
    // blamed on its axis.
    for (key, _, raw_values) in &axes {
        let mut table = base.clone();
        set_dotted(&mut table, key, raw_values[0].clone())?;
        point_experiment(table, "check", defaults, own_datasets).with_context(|| format!("axis '{key}'"))?;
    }

    let mut experiments = Vec::new();
    let mut indices = vec![0usize; axes.len()];
    'points: loop {
        let mut table = base.clone();
        let mut name = sweep_name.clone();
        let mut values = Vec::new();
        for (a, (key, parsed, raw_values)) in axes.iter().enumerate() {
            set_dotted(&mut table, key, raw_values[indices[a]].clone())?;
            let value = &parsed[indices[a]];
            let _ = write!(name, ".{}-{}", labels[a], value.label());
            values.push((key.clone(), value.clone()));
        }
        let shown: Vec<String> = values.iter().map(|(k, v)| format!("{k} = {}", v.label())).collect();
        let shown = shown.join(", ");
        let mut exp =
            point_experiment(table, &name, defaults, own_datasets).with_context(|| format!("point {shown}"))?;
        exp.sweep = Some(SweepPoint { sweep: sweep_name.clone(), values });
        exp.validate().with_context(|| format!("point '{name}' ({shown})"))?;
        let about = raw.description.clone().unwrap_or_else(|| base_description.clone());
        exp.description = if about.is_empty() { shown } else { format!("{about} ({shown})") };
        experiments.push(exp);
        // The next combination, last axis fastest.
        for a in (0..axes.len()).rev() {
            indices[a] += 1;
            if indices[a] < axes[a].1.len() {
                continue 'points;
            }
            indices[a] = 0;
        }
        break;
    }
    let sweep = Sweep {
        name: sweep_name,
        description: raw.description.unwrap_or(base_description),
        axes: axes.into_iter().map(|(k, v, _)| (k, v)).collect(),
        points: experiments.iter().map(|e| e.name.clone()).collect(),
    };
    Ok((sweep, experiments))
}

/// Sets `a.b.c` in a table, making the tables on the way.
fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let (path, last) = match key.rsplit_once('.') {
        Some((path, last)) => (path.split('.').collect::<Vec<_>>(), last),
        None => (Vec::new(), key),
    };
    let mut at = table;
    for part in path {
        let entry = at.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("axis '{key}': '{part}' is not a table in the base experiment"),
        };
    }
    at.insert(last.to_string(), value);
    Ok(())
}

/// Reads a point's table as an `[[experiment]]` would be read, with the same checks of unknown
/// keys and types.
fn point_experiment(
    mut table: toml::Table,
    name: &str,
    defaults: &PartialDefaults,
    own_datasets: &[Arc<OwnDataset>],
) -> Result<Experiment> {
    table.insert("name".into(), toml::Value::String(name.into()));
    // Through TOML text, so that the reader is the very one `[[experiment]]` tables go through.
    let text = toml::to_string(&table).context("cannot write the point's settings as TOML")?;
    let partial: PartialExperiment = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    partial.resolve(defaults, own_datasets)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Experiment {
    fn validate(&self) -> Result<()> {
        // Sweep points' names are made here, with '.' between the sweep and each axis value.
        if self.sweep.is_none() && !valid_name(&self.name) {
            bail!("name must be non-empty and use only letters, digits, '-' and '_'");
        }
        if self.reset.bn_stats.is_empty() {
            bail!("reset.bn_stats is empty: name at least one of {}", BnStats::names());
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
        if let Some(b) = t.betas.iter().find(|b| !(b.is_finite() && (0.0..1.0).contains(*b))) {
            bail!("train.betas = {:?}: each must be in [0, 1), got {b}", t.betas);
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            bail!("train.eps = {} must be a positive number", t.eps);
        }
        if !(t.label_noise.is_finite() && (0.0..=1.0).contains(&t.label_noise)) {
            bail!("train.label_noise = {} must be a fraction in [0, 1]", t.label_noise);
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
        if m.arch == Arch::Fcn && (m.width == 0 || m.width > 1 << 16 || m.depth > 1000) {
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
            if RESERVED_SET_NAMES.contains(&set.as_str()) {
                bail!("reset.joint_sets.{set}: '{set}' is the name of a built-in set; choose another");
            }
        }
        let modes = &self.reset.modes;
        if modes.contains(&ResetMode::Growth) && !modes.contains(&ResetMode::Reinit) {
            bail!("reset.modes: `growth` needs `reinit` (its order is each unit's own damage when re-initialized)");
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

    /// docs/gpu.toml runs the shipped CNN experiments with three seeds: everything else must be
    /// pipeline.toml's, or its results would not be the shipped experiments'.
    #[test]
    fn the_gpu_file_holds_the_shipped_cnn_experiments_with_three_seeds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let shipped = Pipeline::load(&root.join("pipeline.toml")).unwrap();
        let gpu = Pipeline::load(&root.join("docs/gpu.toml")).unwrap();
        for name in ["vgg11-fmnist", "resnet18-fmnist"] {
            let (a, b) = (shipped.experiment(name).unwrap(), gpu.experiment(name).unwrap());
            assert_eq!(b.seeds, [0, 1, 2], "{name}");
            assert_eq!((&a.dataset, &a.description), (&b.dataset, &b.description), "{name}");
            assert_eq!(
                (&a.model, &a.train, &a.reset, &a.aggregate),
                (&b.model, &b.train, &b.reset, &b.aggregate),
                "{name}"
            );
        }
    }

    #[test]
    fn every_model_key_is_read_by_some_architecture_and_each_named_key_exists() {
        let keys = |m: &ModelConfig| -> Vec<String> {
            serde_json::to_value(m).unwrap().as_object().unwrap().keys().cloned().collect()
        };
        let mut read = std::collections::BTreeSet::new();
        for &arch in Arch::ALL {
            let m = ModelConfig { arch, ..ModelConfig::default() };
            let all = keys(&m);
            for k in m.keys_read() {
                assert!(all.iter().any(|a| a == k), "{arch:?} reads '{k}', which [model] lacks");
                read.insert(k.to_string());
            }
        }
        assert_eq!(read.into_iter().collect::<Vec<_>>(), {
            let mut all = keys(&ModelConfig::default());
            all.sort();
            all
        });
        let fcn = ModelConfig::default().keys_read();
        assert!(!fcn.contains(&"batch_norm") && !fcn.contains(&"width_mult"));
    }

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

    /// Adam and AdamW take PyTorch's defaults (lr 0.001; AdamW's weight decay 0.01) where the
    /// settings leave them out, and keys set in `[defaults]` for SGD do not count against them.
    #[test]
    fn adam_and_adamw_take_pytorchs_defaults() {
        let with = |optimizer: &str, more: &str| {
            let text = MINIMAL
                .replace("[defaults.train]\nlr = 0.05", "[defaults.train]\nmomentum = 0.9")
                .replace("epochs = 3", &format!("epochs = 3\noptimizer = \"{optimizer}\"\n{more}"));
            parse(&text).map(|p| p.experiments[0].train.clone())
        };
        let adam = with("adam", "").unwrap();
        assert_eq!((adam.optimizer, adam.lr, adam.weight_decay), (OptimizerKind::Adam, 1e-3, 0.0));
        assert_eq!((adam.betas, adam.eps), ([0.9, 0.999], 1e-8));
        let adamw = with("adamw", "").unwrap();
        assert_eq!((adamw.optimizer, adamw.lr, adamw.weight_decay), (OptimizerKind::Adamw, 1e-3, 1e-2));
        let set = with("adamw", "lr = 0.01\nweight_decay = 0.0\nbetas = [0.8, 0.99]\neps = 1e-6").unwrap();
        assert_eq!((set.lr, set.weight_decay, set.betas, set.eps), (0.01, 0.0, [0.8, 0.99], 1e-6));
        let sgd = with("sgd", "").unwrap();
        assert_eq!((sgd.lr, sgd.weight_decay), (0.01, 0.0));
    }

    /// A model key the experiment's architecture does not read is refused with the line and
    /// what the architecture reads; `[defaults.model]` may hold every architecture's keys.
    #[test]
    fn a_model_setting_of_another_architecture_is_refused() {
        let with = |model: &str| parse(&format!("{MINIMAL}[experiment.model]\n{model}\n"));
        let err = format!("{:#}", with("arch = \"resnet50\"\ndepth = 4").unwrap_err());
        assert!(err.contains("experiment 'a' (line 8)"), "{err}");
        assert!(
            err.contains("model.depth: not a setting of model.arch = \"resnet50\" (it reads model.width_mult, model.pad_to, model.init)"),
            "{err}"
        );
        let err = format!("{:#}", with("width_mult = 0.5\nbatch_norm = false").unwrap_err());
        assert!(err.contains("model.width_mult, model.batch_norm: not a setting of model.arch = \"fcn\""), "{err}");
        let err = format!("{:#}", with("arch = \"resnet18\"\nbatch_norm = false").unwrap_err());
        assert!(err.contains("model.batch_norm: not a setting of model.arch = \"resnet18\""), "{err}");
        with("arch = \"vgg11\"\nbatch_norm = false\nwidth_mult = 0.5").unwrap();
        let defaults =
            MINIMAL.replace("[defaults.train]", "[defaults.model]\ndepth = 2\nwidth_mult = 0.5\n[defaults.train]");
        assert_ne!(defaults, MINIMAL);
        let p = parse(&format!("{defaults}[experiment.model]\narch = \"vgg11\"\n")).unwrap();
        assert_eq!((p.experiments[0].model.arch, p.experiments[0].model.width_mult), (Arch::Vgg11, 0.5));
    }

    /// An optimizer's own keys in an experiment that uses another are refused, with the file,
    /// the experiment's line and the keys; so are out-of-range betas and eps.
    #[test]
    fn an_optimizer_setting_on_the_wrong_optimizer_is_refused() {
        let with = |more: &str| {
            let text = MINIMAL.replace("epochs = 3", &format!("epochs = 3\n{more}"));
            format!("{:#}", parse(&text).unwrap_err())
        };
        let err = with("optimizer = \"adam\"\nmomentum = 0.5\nnesterov = true");
        assert!(err.contains("test.toml, experiment 'a' (line 8)"), "{err}");
        assert!(err.contains("train.momentum, train.nesterov: not a setting of train.optimizer = \"adam\""), "{err}");
        let err = with("betas = [0.9, 0.99]");
        assert!(err.contains("train.betas: not a setting of train.optimizer = \"sgd\""), "{err}");
        let err = with("optimizer = \"adamw\"\nbetas = [0.9, 1.0]");
        assert!(err.contains("train.betas = [0.9, 1.0]: each must be in [0, 1)"), "{err}");
        let err = with("label_noise = 1.5");
        assert!(err.contains("experiment 'a' (line 8): train.label_noise = 1.5 must be a fraction in [0, 1]"), "{err}");
        let err = with("optimizer = \"adam\"\neps = 0.0");
        assert!(err.contains("train.eps = 0 must be a positive number"), "{err}");
        let err = with("optimizer = \"rmsprop\"");
        assert!(err.contains("line 12") && err.contains("`sgd`, `adam`, `adamw`"), "{err}");
    }

    /// Keys made before the optimizer settings existed hold: at SGD, the train key's JSON names
    /// none of them.
    #[test]
    fn sgd_keys_leave_the_optimizer_settings_out() {
        let p = parse(MINIMAL).unwrap();
        let json = serde_json::to_string(&p.experiments[0].train).unwrap();
        for key in ["optimizer", "betas", "eps", "label_noise"] {
            assert!(!json.contains(&format!("\"{key}\"")), "{json}");
        }
        let text = MINIMAL.replace("epochs = 3", "epochs = 3\noptimizer = \"adam\"");
        let json = serde_json::to_string(&parse(&text).unwrap().experiments[0].train).unwrap();
        assert!(json.contains("\"optimizer\":\"adam\""), "{json}");
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

    /// `[[dataset]]`: paths relative to the pipeline file, experiments name it like a catalogue
    /// dataset; bad declarations and unknown names are refused with the line and the fault.
    #[test]
    fn own_datasets_are_declared_and_named() {
        let own =
            "[[dataset]]\nname = \"digits\"\nclasses = 10\ntrain = \"d/train.npz\"\ntest = \"d/test.safetensors\"\n";
        let text = format!("{own}{}", MINIMAL.replace("dataset = \"mnist\"", "dataset = \"digits\""));
        let p = parse(&text).unwrap();
        let DataSource::Own(d) = &p.experiments[0].dataset else { panic!("not the own dataset") };
        assert_eq!((d.name.as_str(), d.classes), ("digits", 10));
        assert_eq!(
            (d.train.as_path(), d.test.as_path()),
            (Path::new("/base/d/train.npz"), Path::new("/base/d/test.safetensors"))
        );
        assert_eq!(serde_json::to_value(&p.experiments[0].dataset).unwrap(), "digits");
        for (change, fault) in [
            ("name = \"digits\"", "'mnist' is the name of a dataset layerlab fetches itself"),
            ("classes = 10", "classes = 1 must be from 2 to 256"),
            ("train = \"d/train.npz\"", "train = \"d/train.csv\" must be a .npz or .safetensors file"),
        ] {
            let replacement = match change {
                "name = \"digits\"" => "name = \"mnist\"",
                "classes = 10" => "classes = 1",
                _ => "train = \"d/train.csv\"",
            };
            let err = format!("{:#}", parse(&format!("{}{MINIMAL}", own.replace(change, replacement))).unwrap_err());
            assert!(err.contains("(line 2)") && err.contains(fault), "{err}");
        }
        let err = format!("{:#}", parse(&format!("{own}{own}{MINIMAL}")).unwrap_err());
        assert!(err.contains("dataset 'digits' is declared twice"), "{err}");
        let err = format!("{:#}", parse(&format!("{own}{}", MINIMAL.replace("\"mnist\"", "\"digit\""))).unwrap_err());
        assert!(err.contains("unknown dataset 'digit' (known: mnist, fashion-mnist, cifar10, digits"), "{err}");
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
        let text = format!("{MINIMAL}[experiment.reset.joint_sets]\nrobust = [\"fc1\"]\n");
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains("reset.joint_sets.robust") && err.contains("built-in set"), "{err}");
        let text = format!("{MINIMAL}[experiment.reset]\nmodes = [\"rerandomize\", \"growth\"]\n");
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains("experiment 'a' (line") && err.contains("`growth` needs `reinit`"), "{err}");
        let text = MINIMAL.replace("epochs = 3", "epochs = -3");
        assert!(parse(&text).is_err());
    }

    const SWEEP: &str = r#"
[[experiment]]
name = "fcn"
dataset = "mnist"
seeds = [0, 1]
[experiment.model]
depth = 3
[experiment.train]
epochs = 3
checkpoints = [0, 1]

[[sweep]]
name = "grid"
base = "fcn"
axes = { "model.depth" = [1, 2], "train.lr" = [0.1, 0.05, 0.01] }
"#;

    #[test]
    fn sweep_expands_into_named_points_in_axis_order() {
        let p = parse(SWEEP).unwrap();
        let sweep = p.sweep("grid").unwrap();
        assert_eq!(
            sweep.points,
            [
                "grid.depth-1.lr-0.1",
                "grid.depth-1.lr-0.05",
                "grid.depth-1.lr-0.01",
                "grid.depth-2.lr-0.1",
                "grid.depth-2.lr-0.05",
                "grid.depth-2.lr-0.01"
            ]
        );
        let point = p.experiment("grid.depth-2.lr-0.05").unwrap();
        assert_eq!(point.model.depth, 2);
        assert_eq!(point.train.lr, 0.05);
        // Everything else comes from the base experiment, then the defaults.
        assert_eq!(point.train.epochs, 3);
        assert_eq!(point.seeds, vec![0, 1]);
        assert_eq!(point.train.batch_size, 128);
        let values = &point.sweep.as_ref().unwrap().values;
        assert_eq!(values[0], ("model.depth".to_string(), AxisValue::Int(2)));
        assert_eq!(p.select("grid").unwrap().len(), 6);
        assert_eq!(p.select("fcn").unwrap()[0].name, "fcn");
        // Points are experiments like any other, with the base's unchanged settings.
        assert_eq!(p.experiment("fcn").unwrap().model.depth, 3);
    }

    #[test]
    fn adding_a_value_keeps_the_other_points() {
        let a = parse(SWEEP).unwrap();
        let b = parse(&SWEEP.replace("[1, 2]", "[1, 2, 5]")).unwrap();
        for point in &a.sweep("grid").unwrap().points {
            assert_eq!(a.experiment(point).unwrap(), b.experiment(point).unwrap());
        }
        assert_eq!(b.sweep("grid").unwrap().points.len(), 9);
    }

    #[test]
    fn inline_base_and_clashing_axis_names() {
        let text = r#"
[[sweep]]
name = "s"
axes = { "train.lr" = [0.1, 0.05], "train.lr_gamma" = [0.5], "reset.bn_stats" = [["keep", "recalibrate"]] }
[sweep.base]
dataset = "fashion-mnist"
[sweep.base.train]
epochs = 2
checkpoints = [0]
"#;
        let p = parse(text).unwrap();
        assert_eq!(p.sweep("s").unwrap().points[1], "s.lr-0.05.lr_gamma-0.5.bn_stats-keep+recalibrate");
        let e = p.experiment("s.lr-0.05.lr_gamma-0.5.bn_stats-keep+recalibrate").unwrap();
        assert_eq!((e.train.lr, e.train.lr_gamma), (0.05, 0.5));
        assert_eq!(e.reset.bn_stats, [BnStats::Keep, BnStats::Recalibrate]);
        assert_eq!(p.default_experiments, ["s.lr-0.1.lr_gamma-0.5.bn_stats-keep+recalibrate"]);
    }

    #[test]
    fn sweep_errors_name_the_sweep_the_axis_and_the_line() {
        let err = |text: &str| format!("{:#}", parse(text).unwrap_err());
        let e = err(&SWEEP.replace("\"model.depth\"", "\"model.dept\""));
        assert!(e.contains("sweep 'grid' (line 13)") && e.contains("axis 'model.dept'") && e.contains("dept"), "{e}");
        let e = err(&SWEEP.replace("[1, 2]", "[1, \"two\"]"));
        assert!(e.contains("axis 'model.depth'") || e.contains("model.depth = two"), "{e}");
        let e = err(&SWEEP.replace("\"model.depth\"", "\"seeds\""));
        assert!(e.contains("axis 'seeds'") && e.contains("list on the base"), "{e}");
        let e = err(&SWEEP.replace("base = \"fcn\"", "base = \"nope\""));
        assert!(e.contains("sweep 'grid'") && e.contains("nope"), "{e}");
        let e = err(&SWEEP.replace("[1, 2]", "[1, 1]"));
        assert!(e.contains("lists 1 twice"), "{e}");
        let e = err(&SWEEP.replace("[1, 2]", "[]"));
        assert!(e.contains("non-empty list"), "{e}");
        // A point that fails validation is named with its values.
        let e = err(&SWEEP.replace("\"train.lr\" = [0.1, 0.05, 0.01]", "\"train.epochs\" = [3, 0]"));
        assert!(e.contains("grid.depth-1.epochs-0") && e.contains("train.epochs = 0"), "{e}");
        let e = err(&SWEEP.replace("name = \"grid\"", "name = \"fcn\""));
        assert!(e.contains("sweep 'fcn' has the name of another"), "{e}");
        let e = err(&format!("{SWEEP}unknown = 1\n"));
        assert!(e.contains("unknown"), "{e}");
    }

    #[test]
    fn empty_file_is_refused() {
        assert!(format!("{:#}", parse("").unwrap_err()).contains("no [[experiment]]"));
    }
}
