//! Training: the optimizer over an executor's steps, learning-rate schedules, seeded data order
//! and augmentation, checkpoints at chosen epochs, and exact resume after a kill.
//!
//! The optimizer's buffers (SGD's momentum, see [`crate::optim`]) are saved with the weights each
//! epoch (`resume.safetensors`), so a killed run continues from its last finished epoch and ends
//! bit-identical to an unbroken one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::batches::EpochBatches;
use crate::checkpoint::{self, CheckpointMeta};
use crate::data::Split;
use crate::device;
use crate::eval::{Accumulator, EvalSet};
use crate::exec::{self, Trainer};
use crate::kernels::KernelOptions;
use crate::model::{Architecture, State};
use crate::optim::{self, OptimizerState, StepAt};
use crate::progress;
use crate::random;
use crate::table::{Column, Table};
use layerlab_pipeline::{paths, Schedule, TrainConfig};

/// The learning rate at a step (0-based), following the configured schedule and warm-up.
pub fn learning_rate(cfg: &TrainConfig, step: u64, steps_per_epoch: u64) -> f64 {
    let total = (cfg.epochs as u64 * steps_per_epoch).max(1);
    let warmup = cfg.warmup_epochs as u64 * steps_per_epoch;
    let epoch = (step / steps_per_epoch.max(1)) as u32;
    let base = match cfg.schedule {
        Schedule::Cosine => cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos()),
        Schedule::Step => cfg.lr * cfg.lr_gamma.powi(cfg.lr_milestones.iter().filter(|&&m| epoch >= m).count() as i32),
        Schedule::Constant => cfg.lr,
    };
    if step < warmup {
        base * (step + 1) as f64 / warmup as f64
    } else {
        base
    }
}

/// One row of `history.parquet`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: u32,
    pub step: u64,
    pub lr: f64,
    pub train_loss: Option<f64>,
    pub train_error: Option<f64>,
    pub test_loss: f64,
    pub test_error: f64,
    /// Wall time of the epoch's training steps alone (null at epoch 0).
    #[serde(default)]
    pub train_seconds: Option<f64>,
    /// Wall time of the whole epoch, evaluation and checkpoint included.
    pub seconds: f64,
}

/// Everything a training run needs.
pub struct TrainJob<'a> {
    pub experiment: &'a str,
    pub seed: u64,
    pub arch: &'a Architecture,
    pub cfg: &'a TrainConfig,
    pub train: &'a Split,
    pub test: &'a Split,
    /// `train/` output folder.
    pub out_dir: &'a Path,
    /// The stage key: a resume file with another key is ignored.
    pub key: &'a str,
    pub config_hash: &'a str,
    pub checkpoint_epochs: &'a [u32],
    /// Extra provenance for the history table.
    pub table_metadata: Vec<(String, String)>,
    pub device: &'a Device,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub history: Vec<EpochRecord>,
    pub resumed_from: Option<u32>,
    pub examples_per_second: f64,
}

const RESUME_FILE: &str = "resume.safetensors";

fn resume_path(out_dir: &Path) -> PathBuf {
    out_dir.join(RESUME_FILE)
}

struct ResumePoint {
    epoch: u32,
    step: u64,
    state: State,
    optimizer: OptimizerState,
    history: Vec<EpochRecord>,
}

/// The resume file: the weights under `model/`, the optimizer's buffers under their
/// [`crate::optim::state_key`] (`momentum/fc1.weight`), the epoch, step and history in the metadata.
fn save_resume(
    path: &Path,
    key: &str,
    trainer: &dyn Trainer,
    epoch: u32,
    step: u64,
    history: &[EpochRecord],
) -> Result<()> {
    let mut tensors = std::collections::BTreeMap::new();
    for (k, v) in trainer.state()? {
        tensors.insert(format!("model/{k}"), v);
    }
    tensors.extend(trainer.optimizer_state()?);
    let meta = HashMap::from([
        ("format".to_string(), "layerlab-resume-1".to_string()),
        ("key".to_string(), key.to_string()),
        ("epoch".to_string(), epoch.to_string()),
        ("step".to_string(), step.to_string()),
        ("history".to_string(), encode_history(history)?),
    ]);
    checkpoint::save_tensors(path, &tensors, meta)
}

/// The history as JSON in the resume file's metadata. serde_json writes the shortest decimal that
/// reads back as the same f64, and reads it back exactly with its `float_roundtrip` feature (on in
/// the workspace), so a resumed run's `history.parquet` equals an unbroken run's bit for bit.
fn encode_history(history: &[EpochRecord]) -> Result<String> {
    Ok(serde_json::to_string(history)?)
}

fn decode_history(text: &str) -> Result<Vec<EpochRecord>> {
    Ok(serde_json::from_str(text)?)
}

fn load_resume(path: &Path, key: &str, arch: &Architecture, device: &Device) -> Result<Option<ResumePoint>> {
    if !path.exists() {
        return Ok(None);
    }
    let fault = || format!("resume file {} is damaged; delete it to start this run over", path.display());
    let (tensors, meta) = checkpoint::load_tensors(path, device).with_context(fault)?;
    if meta.get("key").map(String::as_str) != Some(key) {
        // Written for other settings: not ours to continue.
        return Ok(None);
    }
    let epoch: u32 = meta.get("epoch").and_then(|e| e.parse().ok()).with_context(fault)?;
    let step: u64 = meta.get("step").and_then(|e| e.parse().ok()).with_context(fault)?;
    let history = meta.get("history").and_then(|h| decode_history(h).ok()).with_context(fault)?;
    let mut state = State::new();
    let mut optimizer = OptimizerState::new();
    for (k, v) in tensors {
        match k.strip_prefix("model/") {
            Some(name) => {
                state.insert(name.to_string(), v);
            }
            None => {
                optimizer.insert(k, v);
            }
        }
    }
    arch.check_state(&state).with_context(fault)?;
    Ok(Some(ResumePoint { epoch, step, state, optimizer, history }))
}

/// Trains, writing checkpoints and `history.parquet` into `job.out_dir`.
pub fn run(job: &TrainJob<'_>, initial: State) -> Result<TrainSummary> {
    let cfg = job.cfg;
    let n_train = job.train.limited_len(job.cfg.train_examples);
    let n_test = job.test.limited_len(job.cfg.test_examples);
    let bs = cfg.batch_size as usize;
    let steps_per_epoch = n_train.div_ceil(bs) as u64;
    let ckpt_dir = job.out_dir.join("checkpoints");
    let resume = resume_path(job.out_dir);

    let executor = exec::choose(job.arch, job.device, cfg.compute, KernelOptions::with_tf32(cfg.tf32));
    let optimizer = || optim::from_settings(cfg);
    let (mut trainer, mut history, start_epoch, mut step, resumed_from) =
        match load_resume(&resume, job.key, job.arch, job.device)? {
            Some(r) => {
                tracing::info!("resuming {} seed {} after epoch {}", job.experiment, job.seed, r.epoch);
                let trainer = executor.trainer(&r.state, optimizer(), Some(&r.optimizer))?;
                (trainer, r.history, r.epoch + 1, r.step, Some(r.epoch))
            }
            None => {
                // A fresh start: checkpoints of earlier settings must not mix with these.
                if ckpt_dir.exists() {
                    std::fs::remove_dir_all(&ckpt_dir)
                        .with_context(|| format!("cannot clear {}", ckpt_dir.display()))?;
                }
                (executor.trainer(&initial, optimizer(), None)?, Vec::new(), 0, 0, None)
            }
        };
    std::fs::create_dir_all(&ckpt_dir).with_context(|| format!("cannot create {}", ckpt_dir.display()))?;

    let meta = |epoch: u32, step: u64| CheckpointMeta {
        experiment: job.experiment.into(),
        seed: job.seed,
        epoch,
        step,
        architecture: job.arch.name.clone(),
        config_hash: job.config_hash.into(),
    };

    let test_set = EvalSet::new(job.test, (0..n_test).collect(), cfg.eval_batch_size as usize);
    let test_metrics = |state: &State| {
        executor
            .evaluate(state, &test_set)
            .map_err(|e| device::name_memory_settings(e, &[("train.eval_batch_size", cfg.eval_batch_size)]))
    };
    // candle's executor trains from a copy of the training examples on its device.
    trainer
        .prepare(job.train, n_train)
        .map_err(|e| device::name_memory_settings(e, &[("train.train_examples", n_train as u32)]))
        .context("uploading the training examples")?;
    if start_epoch == 0 {
        let t0 = Instant::now();
        let state = trainer.state()?;
        let m = test_metrics(&state)?;
        checkpoint::save(&paths::checkpoint_in(&ckpt_dir, 0), &state, &meta(0, 0))?;
        history.push(EpochRecord {
            epoch: 0,
            step: 0,
            lr: learning_rate(cfg, 0, steps_per_epoch),
            train_loss: None,
            train_error: None,
            test_loss: m.loss,
            test_error: m.error,
            train_seconds: None,
            seconds: t0.elapsed().as_secs_f64(),
        });
        tracing::info!("epoch 0: test error {:.4} (initialization)", m.error);
    }

    let mut train_seconds = 0.0;
    let mut trained_examples = 0usize;
    for epoch in start_epoch.max(1)..=cfg.epochs {
        let t0 = Instant::now();
        let bar = progress::bar(steps_per_epoch, &format!("epoch {epoch}/{}", cfg.epochs));
        let plan = EpochPlan { job, epoch, steps_per_epoch };
        let (acc, lr) = plan.run(trainer.as_mut(), n_train, &mut step, &bar)?;
        bar.finish_and_clear();
        let train_time = t0.elapsed().as_secs_f64();
        train_seconds += train_time;
        trained_examples += n_train;
        let state = trainer.state()?;
        let m = test_metrics(&state)?;
        let tm = acc.metrics();
        history.push(EpochRecord {
            epoch,
            step,
            lr,
            train_loss: Some(tm.loss),
            train_error: Some(tm.error),
            test_loss: m.loss,
            test_error: m.error,
            train_seconds: Some(train_time),
            seconds: t0.elapsed().as_secs_f64(),
        });
        if job.checkpoint_epochs.contains(&epoch) {
            checkpoint::save(&paths::checkpoint_in(&ckpt_dir, epoch), &state, &meta(epoch, step))?;
        }
        if epoch < cfg.epochs {
            save_resume(&resume, job.key, trainer.as_ref(), epoch, step, &history)?;
        }
        tracing::info!(
            "epoch {epoch}/{}: train loss {:.4} error {:.4}, test loss {:.4} error {:.4}, {:.0} ex/s",
            cfg.epochs,
            tm.loss,
            tm.error,
            m.loss,
            m.error,
            n_train as f64 / train_time
        );
    }
    write_history(&job.out_dir.join("history.parquet"), job.experiment, job.seed, &history, &job.table_metadata)?;
    if resume.exists() {
        std::fs::remove_file(&resume).with_context(|| format!("cannot remove {}", resume.display()))?;
    }
    let examples_per_second = if train_seconds > 0.0 { trained_examples as f64 / train_seconds } else { 0.0 };
    Ok(TrainSummary { history, resumed_from, examples_per_second })
}

/// One epoch's steps.
struct EpochPlan<'a> {
    job: &'a TrainJob<'a>,
    epoch: u32,
    steps_per_epoch: u64,
}

impl EpochPlan<'_> {
    fn learning_rate(&self, step: u64) -> f64 {
        learning_rate(self.job.cfg, step, self.steps_per_epoch)
    }

    fn diverged(&self, loss: f64, step: u64) -> anyhow::Error {
        let lr = self.learning_rate(step);
        anyhow!("training diverged: loss is {loss} at epoch {}, step {step} (lr {lr:.3e}); lower train.lr", self.epoch)
    }

    fn step_failed(&self, e: anyhow::Error) -> anyhow::Error {
        device::name_memory_settings(e, &[("train.batch_size", self.job.cfg.batch_size)])
    }

    /// The epoch's steps on the first `n_train` training examples in the epoch's order, each
    /// augmented from the epoch's stream: the batches' mean losses and errors, and the last
    /// step's rate. `step` counts on.
    fn run(
        &self,
        trainer: &mut dyn Trainer,
        n_train: usize,
        step: &mut u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<(Accumulator, f64)> {
        let (job, cfg) = (self.job, self.job.cfg);
        let mut aug_rng = random::augment_rng(job.seed, self.epoch);
        let order = random::epoch_order(n_train, job.seed, self.epoch);
        let augmentation: Option<&mut dyn rand_core::RngCore> = if cfg.augment { Some(&mut aug_rng) } else { None };
        let batches = EpochBatches::new(job.train, order, cfg.batch_size as usize, augmentation);
        let first_step = *step;
        let schedule = |s: u64| StepAt { lr: self.learning_rate(s), number: s + 1 };
        let metrics =
            trainer.epoch(&batches, first_step, &schedule, &mut || bar.inc(1)).map_err(|e| self.step_failed(e))?;
        let mut acc = Accumulator::default();
        for (k, m) in metrics.iter().enumerate() {
            if !m.loss.is_finite() {
                return Err(self.diverged(m.loss, first_step + k as u64));
            }
            acc.add(m.loss, m.errors, m.examples);
        }
        *step += metrics.len() as u64;
        let lr = if metrics.is_empty() { 0.0 } else { self.learning_rate(*step - 1) };
        Ok((acc, lr))
    }
}

/// Writes `history.parquet`. An imported run knows no learning rate: its records hold NaN there,
/// written as nulls.
pub fn write_history(
    path: &Path,
    experiment: &str,
    seed: u64,
    history: &[EpochRecord],
    metadata: &[(String, String)],
) -> Result<()> {
    let n = history.len();
    let col_i = |f: &dyn Fn(&EpochRecord) -> i64| Column::Int(history.iter().map(|r| Some(f(r))).collect());
    let col_f = |f: &dyn Fn(&EpochRecord) -> Option<f64>| Column::Float(history.iter().map(f).collect());
    let table = Table::new()
        .col("experiment", Column::Text(vec![Some(experiment.to_string()); n]))
        .col("seed", Column::Int(vec![Some(seed as i64); n]))
        .col("epoch", col_i(&|r| r.epoch as i64))
        .col("step", col_i(&|r| r.step as i64));
    // Trained runs keep the column non-nullable, as their tables always had it.
    let table = if history.iter().any(|r| r.lr.is_nan()) {
        table.nullable("lr", col_f(&|r| (!r.lr.is_nan()).then_some(r.lr)))
    } else {
        table.col("lr", col_f(&|r| Some(r.lr)))
    };
    table
        .nullable("train_loss", col_f(&|r| r.train_loss))
        .nullable("train_error", col_f(&|r| r.train_error))
        .col("test_loss", col_f(&|r| Some(r.test_loss)))
        .col("test_error", col_f(&|r| Some(r.test_error)))
        .nullable("train_seconds", col_f(&|r| r.train_seconds))
        .col("seconds", col_f(&|r| Some(r.seconds)))
        .write(path, metadata)
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;
    use rand_core::{RngCore, SeedableRng};

    use super::*;
    use crate::batches::augment;
    use layerlab_pipeline::ComputePath;

    fn cfg() -> TrainConfig {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            lr: 0.1,
            schedule: Schedule::Constant,
            lr_milestones: vec![],
            lr_gamma: 0.1,
            warmup_epochs: 0,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            augment: false,
            checkpoints: vec![0],
            train_examples: None,
            test_examples: None,
            eval_batch_size: 1000,
            compute: ComputePath::Fast,
            tf32: false,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn schedules_match_their_formulas() {
        let c = TrainConfig { schedule: Schedule::Cosine, ..cfg() };
        assert_eq!(learning_rate(&c, 0, 10), 0.1);
        assert!((learning_rate(&c, 50, 10) - 0.05).abs() < 1e-12);
        assert!(learning_rate(&c, 99, 10) < 1e-3);
        let s = TrainConfig { schedule: Schedule::Step, lr_milestones: vec![3, 6], ..cfg() };
        assert_eq!(learning_rate(&s, 29, 10), 0.1);
        assert!((learning_rate(&s, 30, 10) - 0.01).abs() < 1e-12);
        assert!((learning_rate(&s, 60, 10) - 0.001).abs() < 1e-12);
        let w = TrainConfig { warmup_epochs: 1, ..cfg() };
        assert!((learning_rate(&w, 0, 10) - 0.01).abs() < 1e-12);
        assert_eq!(learning_rate(&w, 10, 10), 0.1);
    }

    /// The candle path trains from its device copy of the examples: batches gathered, augmented
    /// and scaled by one op, losses read once an epoch. Fed the same batches from the host, one
    /// upload and one read per step, it must end at the same bits, history included.
    #[test]
    fn training_from_resident_examples_equals_host_batches_step_by_step() {
        use layerlab_pipeline::{Arch, ModelConfig};
        let model = ModelConfig { arch: Arch::Fcn, depth: 2, width: 16, ..ModelConfig::default() };
        let arch = Architecture::build(&model, [1, 12, 12], 10).unwrap();
        let mut rng = random::rng(11);
        let mut split = |n: usize| crate::data::Split {
            images: (0..n * 144).map(|_| rng.next_u32() as u8).collect(),
            labels: (0..n).map(|_| (rng.next_u32() % 10) as u8).collect(),
            channels: 1,
            height: 12,
            width: 12,
        };
        let (train, test) = (split(20), split(10));
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 8,
            lr: 0.05,
            augment: true,
            weight_decay: 1e-3,
            checkpoints: vec![2],
            eval_batch_size: 4,
            compute: ComputePath::Autograd,
            ..cfg()
        };
        let (seed, dev) = (6, Device::Cpu);
        let initial = arch.initial_state(seed, &dev).unwrap();
        let out = tempfile::tempdir().unwrap();
        let job = TrainJob {
            experiment: "resident",
            seed,
            arch: &arch,
            cfg: &cfg,
            train: &train,
            test: &test,
            out_dir: out.path(),
            key: "k",
            config_hash: "h",
            checkpoint_epochs: &[2],
            table_metadata: Vec::new(),
            device: &dev,
        };
        let summary = run(&job, initial.clone()).unwrap();
        let (trained, _) =
            checkpoint::load(&paths::checkpoint_in(&out.path().join("checkpoints"), 2), &arch, &dev).unwrap();

        let candle = exec::candle::Candle { arch: &arch, device: dev.clone(), kernels: KernelOptions::default() };
        let mut trainer = exec::Executor::trainer(&candle, &initial, optim::from_settings(&cfg), None).unwrap();
        let (mut step, mut losses) = (0, Vec::new());
        for epoch in 1..=2 {
            let mut aug_rng = random::augment_rng(seed, epoch);
            let mut acc = Accumulator::default();
            for chunk in random::epoch_order(20, seed, epoch).chunks(8) {
                let mut pixels: Vec<u8> = chunk.iter().flat_map(|&i| train.images[i * 144..][..144].to_vec()).collect();
                let labels: Vec<u32> = chunk.iter().map(|&i| train.labels[i] as u32).collect();
                augment(&mut pixels, [chunk.len(), 1, 12, 12], &mut aug_rng);
                let at = StepAt { lr: learning_rate(&cfg, step, 3), number: step + 1 };
                let (loss, errors) = trainer.step(&pixels, [chunk.len(), 1, 12, 12], &labels, at).unwrap();
                acc.add(loss, errors, chunk.len());
                step += 1;
            }
            losses.push(acc.metrics());
        }
        let host = trainer.state().unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for (name, t) in &host {
            assert_eq!(bits(t), bits(&trained[name]), "{name}: resident training differs from host batches");
        }
        for (record, m) in summary.history[1..].iter().zip(&losses) {
            assert_eq!(record.train_loss, Some(m.loss), "epoch {}", record.epoch);
            assert_eq!(record.train_error, Some(m.error), "epoch {}", record.epoch);
        }
        // And the test metrics are those of an evaluation from host batches.
        let host_test = exec::choose(&arch, &dev, ComputePath::Fast, KernelOptions::default())
            .evaluate(&host, &EvalSet::new(&test, (0..10).collect(), 4))
            .unwrap();
        assert!(
            (summary.history[2].test_loss - host_test.loss).abs() < 1e-6,
            "{} {}",
            summary.history[2].test_loss,
            host_test.loss
        );
    }

    #[test]
    fn history_survives_the_resume_file_bit_for_bit() {
        // Losses of every magnitude, as f64 bit patterns drawn from a seeded generator: the
        // shortest decimal of some of them reads back one ulp off without exact parsing.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut value = || {
            let mantissa = rng.next_u64() >> 12;
            let exponent = 1023 - 40 + (rng.next_u32() % 48) as u64;
            f64::from_bits((exponent << 52) | mantissa)
        };
        let history: Vec<EpochRecord> = (0..2000)
            .map(|epoch| EpochRecord {
                epoch,
                step: epoch as u64 * 469,
                lr: value(),
                train_loss: Some(value()),
                train_error: Some(value()),
                test_loss: value(),
                test_error: value(),
                train_seconds: (epoch % 2 == 0).then(&mut value),
                seconds: value(),
            })
            .collect();
        let back = decode_history(&encode_history(&history).unwrap()).unwrap();
        let bits = |h: &[EpochRecord]| -> Vec<u64> {
            h.iter()
                .flat_map(|r| [r.lr, r.train_loss.unwrap(), r.train_error.unwrap(), r.test_loss, r.test_error])
                .map(f64::to_bits)
                .collect()
        };
        assert_eq!(bits(&back), bits(&history));
        assert_eq!(back, history);
    }
}
