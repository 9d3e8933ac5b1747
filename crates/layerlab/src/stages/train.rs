//! The `train` stage: dataset + settings → checkpoints and `history.parquet`; or, with
//! `train.import`, a run trained elsewhere imported into the same files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::data::Split;
use crate::exec;
use crate::import;
use crate::kernels::KernelOptions;
use crate::model::Architecture;
use crate::random;
use crate::stages::StageContext;
use crate::table::{provenance, with_device};
use crate::train;
use layerlab_pipeline::cache::{self, Stage, Stamp};
use layerlab_pipeline::StageKey;

/// The most parameters a network may have: weights, gradients and momentum of more would not fit
/// in a workstation's memory, and the allocation would abort the process instead of failing.
const MAX_PARAMS: usize = 1 << 30;

/// What the stage did.
pub enum Outcome {
    UpToDate,
    Trained(train::TrainSummary),
    /// A run imported from `from` (`train.import`).
    Imported {
        epochs: usize,
        from: PathBuf,
        history: Vec<train::EpochRecord>,
    },
}

pub fn run(ctx: &StageContext, seed: u64) -> Result<Outcome> {
    ctx.check_seed(seed)?;
    let exp = &ctx.experiment;
    let (key, out_dir, fresh) = ctx.plan(Stage::Train, seed);
    if fresh {
        return Ok(Outcome::UpToDate);
    }
    let t0 = Instant::now();
    let (train_split, test_split) = ctx.datasets(seed)?;
    let arch = ctx.architecture(&train_split)?;
    let params: usize = arch.units.iter().map(|u| u.params()).sum();
    if params > MAX_PARAMS {
        anyhow::bail!(
            "{}, experiment '{}': the network {} has {params} parameters ({:.1} GB of f32 weights), too large \
             to train (at most {MAX_PARAMS}); lower model.width, model.depth or model.width_mult",
            ctx.pipeline.path.display(),
            exp.name,
            arch.name,
            params as f64 * 4e-9
        );
    }
    let (dev, device_name) = ctx.compute_device()?;
    if let Some(dir) = &exp.train.import {
        let splits = (&train_split, &test_split);
        return import(ctx, seed, &arch, (&dev, &device_name), splits, (Path::new(dir), &key, &out_dir), t0);
    }
    let initial = arch.initial_state(seed, &dev)?;
    // From here on the old results are being replaced: they must not look done.
    Stamp::remove(&out_dir)?;
    let config_json = key.config.to_string();
    let config_hash = key.config_hash();
    let job = train::TrainJob {
        experiment: &exp.name,
        seed,
        arch: &arch,
        cfg: &exp.train,
        train: &train_split,
        test: &test_split,
        out_dir: &out_dir,
        key: &key.key,
        config_hash: &config_hash,
        checkpoint_epochs: &exp.checkpoint_epochs(),
        table_metadata: with_device(provenance(&exp.name, &config_json, &config_hash), &device_name),
        device: &dev,
    };
    let summary = train::run(&job, initial)?;
    Stamp::write_on(&out_dir, &key, t0.elapsed().as_secs_f64(), Some(&device_name))?;
    Ok(Outcome::Trained(summary))
}

/// The stage for an imported run (`train.import`): every checkpoint of the seed's folder read and
/// checked first, then written as ours with the history layerlab measures on them.
fn import(
    ctx: &StageContext,
    seed: u64,
    arch: &Architecture,
    (dev, device_name): (&Device, &str),
    (train_split, test_split): (&Split, &Split),
    (dir, key, out_dir): (&Path, &StageKey, &Path),
    t0: Instant,
) -> Result<Outcome> {
    let exp = &ctx.experiment;
    let folder = cache::import_dir(dir, seed);
    let run = import::read_folder(&folder, arch, &exp.checkpoint_epochs(), dev)
        .with_context(|| format!("experiment '{}' seed {seed}: importing {}", exp.name, folder.display()))?;
    Stamp::remove(out_dir)?;
    let config_json = key.config.to_string();
    let config_hash = key.config_hash();
    let executor = exec::choose(arch, dev, exp.train.compute, KernelOptions::with_tf32(exp.train.tf32));
    let trained_examples = train_split.limited_len(exp.train.train_examples);
    let job = import::ImportJob {
        experiment: &exp.name,
        seed,
        arch,
        executor: &*executor,
        test: test_split,
        test_examples: test_split.limited_len(exp.train.test_examples),
        train: train_split,
        train_subset: random::train_subset(trained_examples, seed, exp.reset.train_subset as usize),
        eval_batch: exp.train.eval_batch_size as usize,
        out_dir,
        config_hash: &config_hash,
    };
    let history = import::write_run(&job, &run)?;
    let metadata = with_device(provenance(&exp.name, &config_json, &config_hash), device_name);
    train::write_history(&out_dir.join("history.parquet"), &exp.name, seed, &history, &metadata)?;
    Stamp::write_on(out_dir, key, t0.elapsed().as_secs_f64(), Some(device_name))?;
    Ok(Outcome::Imported { epochs: history.len(), from: folder, history })
}

/// Runs the stage and says in one line what it did.
pub fn describe(ctx: &StageContext, seed: u64) -> Result<String> {
    let name = &ctx.experiment.name;
    Ok(match run(ctx, seed)? {
        Outcome::UpToDate => format!("train {name} seed {seed}: up to date"),
        Outcome::Trained(s) => format!(
            "train {name} seed {seed}: final test error {:.4}, {:.0} examples/s{}",
            s.history.last().map(|r| r.test_error).unwrap_or(f64::NAN),
            s.examples_per_second,
            s.resumed_from.map(|e| format!(" (resumed after epoch {e})")).unwrap_or_default()
        ),
        Outcome::Imported { epochs, from, history } => format!(
            "train {name} seed {seed}: imported {epochs} checkpoints from {}; test error at the last, computed here: {:.4}",
            from.display(),
            history.last().map(|r| r.test_error).unwrap_or(f64::NAN),
        ),
    })
}
