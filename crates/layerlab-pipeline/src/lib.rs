//! The light part of layerlab, shared by the stage binaries and `cargo xtask`: the pipeline file,
//! the data-folder layout, stage keys and stamps, atomic writes and the run lock. No candle, no arrow.

pub mod cache;
pub mod config;
pub mod fsutil;
pub mod lock;
pub mod paths;
pub mod settings;

pub use cache::{Stage, StageKey, Stamp};
pub use config::{
    AggregateConfig, AxisValue, ExecutorConfig, ExecutorKind, Experiment, ModelConfig, Pipeline, ResetConfig, Sweep,
    SweepPoint, TrainConfig, ROBUST_SET,
};
pub use paths::Layout;
pub use settings::{
    Arch, BnStats, ComputePath, DataSource, Dataset, OptimizerKind, OwnDataset, ResetMode, RowMode, Schedule,
    WeightInit,
};

/// The layerlab version written into every table and stamp.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
