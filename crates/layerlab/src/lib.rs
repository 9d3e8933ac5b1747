//! layerlab: which layers of a trained network matter.
//!
//! The library behind the stage binaries: datasets, models and their units, training, checkpoints,
//! resets, evaluation and tables. The stage binaries only parse flags and call [`stages`].
//! `docs/modules.md` maps each concept to the module that owns it.

pub mod aggregate;
pub mod backward;
pub mod batches;
pub mod batchnorm;
pub mod checkpoint;
pub mod cnn;
pub mod data;
pub mod device;
pub mod eval;
pub mod exec;
pub mod import;
pub mod init;
pub mod kernels;
pub mod mlp;
pub mod model;
pub mod network;
pub mod optim;
pub mod progress;
pub mod random;
pub mod reset;
pub mod resident;
pub mod safetensors_io;
pub mod stages;
pub mod table;
pub mod train;

#[cfg(test)]
pub(crate) mod test_support;

pub use layerlab_pipeline as pipeline;
pub use layerlab_pipeline::{cache, config, fsutil, paths};
