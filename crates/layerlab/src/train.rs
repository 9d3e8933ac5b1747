//! Training: SGD with momentum and weight decay, learning-rate schedules, seeded data order and
//! augmentation, checkpoints at chosen epochs, and exact resume after a kill.
//!
//! The optimizer follows `torch.optim.SGD`: g ← ∇ + λθ; b ← μb + g; θ ← θ − η(g + μb if Nesterov
//! else b). Its momentum buffers are saved with the weights each epoch (`resume.safetensors`), so a
//! killed run continues from its last finished epoch and ends bit-identical to an unbroken one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointMeta};
use crate::cnn::CnnTrainer;
use crate::data::Split;
use crate::device;
use crate::eval::{self, Accumulator, EvalSet, PendingMetrics};
use crate::kernels::pixels::{source_pixel, Shift};
use crate::mlp::MlpTrainer;
use crate::model::{images_to_tensor, loss_and_correct, push_scaled_pixels, Architecture, BnMode, State};
use crate::progress;
use crate::random;
use crate::resident::ResidentSplit;
use crate::sgd::Sgd;
use crate::table::{Column, Table};
use layerlab_pipeline::{paths, ComputePath, Schedule, TrainConfig};

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

/// Random crop (zero padding 4) and horizontal flip of u8 images [n, c, h, w], in place: each
/// image's [`Shift`] drawn from `rng` in turn, each pixel taken by [`source_pixel`] (the rule the
/// batch gather of the candle path follows too).
pub fn augment(pixels: &mut [u8], shape: [usize; 4], rng: &mut impl RngCore) {
    let [n, c, h, w] = shape;
    let size = c * h * w;
    let mut scratch = vec![0u8; size];
    for img in pixels.chunks_exact_mut(size).take(n) {
        let shift = Shift::draw(rng);
        for ch in 0..c {
            let plane = &img[ch * h * w..][..h * w];
            for y in 0..h {
                for x in 0..w {
                    scratch[ch * h * w + y * w + x] = source_pixel(y, x, h, w, shift).map_or(0, |i| plane[i]);
                }
            }
        }
        img.copy_from_slice(&scratch);
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

/// SGD over candle `Var`s, for the autograd path.
pub struct Optimizer {
    /// Trainable tensors, by name, in a fixed order.
    params: Vec<(String, Var)>,
    momentum: BTreeMap<String, Tensor>,
    /// BatchNorm running statistics and other non-trained tensors.
    buffers: BTreeMap<String, Tensor>,
    /// Gradients from [`crate::backward`] (a GPU's steps) rather than candle's autograd; with
    /// the loss op's output gradient, made once on the device.
    taped: Option<Tensor>,
}

impl Optimizer {
    fn new(
        arch: &Architecture,
        state: &State,
        momentum: Option<BTreeMap<String, Tensor>>,
        device: &Device,
    ) -> Result<Optimizer> {
        let mut params = Vec::new();
        let mut buffers = BTreeMap::new();
        let mut buf = BTreeMap::new();
        for (_, spec) in arch.tensor_specs() {
            let t = state.get(&spec.name).with_context(|| format!("missing tensor {}", spec.name))?;
            if spec.trainable {
                params.push((spec.name.clone(), Var::from_tensor(t)?));
                let m = match &momentum {
                    Some(m) => m
                        .get(&spec.name)
                        .with_context(|| format!("resume file lacks momentum for {}", spec.name))?
                        .clone(),
                    None => t.zeros_like()?,
                };
                buf.insert(spec.name.clone(), m);
            } else {
                buffers.insert(spec.name.clone(), t.clone());
            }
        }
        let taped = if crate::backward::used_on(device) { Some(Optimizer::upstream(device)?) } else { None };
        Ok(Optimizer { params, momentum: buf, buffers, taped })
    }

    /// The loss op's output gradient for the loss alone: [1, 0].
    fn upstream(device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(&[1f32, 0.0], device)?)
    }

    fn state(&self) -> State {
        let mut s: State = self.buffers.clone();
        for (name, v) in &self.params {
            s.insert(name.clone(), v.as_tensor().clone());
        }
        s
    }

    /// Plain tensors, detached from any graph.
    fn detached_state(&self) -> State {
        self.state().into_iter().map(|(k, v)| (k, v.detach())).collect()
    }

    /// The SGD update of every parameter that has a gradient in `grad_of`.
    fn step<'g>(
        &mut self,
        grad_of: impl Fn(&str, &Var) -> Option<&'g Tensor>,
        lr: f64,
        cfg: &TrainConfig,
    ) -> Result<()> {
        let updates: Vec<(&str, &Var, &Tensor)> =
            self.params.iter().filter_map(|(name, var)| grad_of(name, var).map(|g| (name.as_str(), var, g))).collect();
        Sgd::of(cfg).update_vars(lr, &updates, &mut self.momentum)
    }
}

/// How training steps are computed: the fast path for fully connected networks (see
/// [`crate::mlp`]), the fast path for convolutional networks on the CPU (see [`crate::cnn`]), or
/// candle autograd (other devices, and every network with `train.compute = "autograd"`).
pub enum Engine {
    Autograd(Optimizer),
    Mlp { trainer: MlpTrainer, inputs: Vec<f32> },
    Cnn(CnnTrainer),
}

impl Engine {
    pub fn new(
        arch: &Architecture,
        state: &State,
        momentum: Option<BTreeMap<String, Tensor>>,
        device: &Device,
        path: ComputePath,
    ) -> Result<Engine> {
        match crate::eval::fast_plan(arch, device, path) {
            Some(plan) => {
                Ok(Engine::Mlp { trainer: MlpTrainer::new(&plan, state, momentum.as_ref())?, inputs: Vec::new() })
            }
            None if crate::eval::cnn_fast(arch, device, path) => {
                Ok(Engine::Cnn(CnnTrainer::new(arch, state, momentum.as_ref())?))
            }
            None => Ok(Engine::Autograd(Optimizer::new(arch, state, momentum, device)?)),
        }
    }

    /// Takes the candle path's gradients from [`crate::backward`] on any device (a GPU's
    /// engine does by default): for tests on the CPU.
    #[cfg(test)]
    pub(crate) fn use_taped_backward(&mut self, device: &Device) -> Result<()> {
        let Engine::Autograd(opt) = self else { bail!("only the candle path has a backward pass to choose") };
        opt.taped = Some(Optimizer::upstream(device)?);
        Ok(())
    }

    /// The weights and buffers, detached from any graph. On the candle path they share the
    /// `Var`s' memory, which the next step's SGD update writes in place (on a GPU through raw
    /// addresses, see `kernels::cuda::sgd_update_all`): read them, or copy them, before the next
    /// step. Every caller here does (a checkpoint, an evaluation, the resume file).
    pub fn state(&self, device: &Device) -> Result<State> {
        match self {
            Engine::Autograd(opt) => Ok(opt.detached_state()),
            Engine::Mlp { trainer, .. } => trainer.state(device),
            Engine::Cnn(trainer) => trainer.state(device),
        }
    }

    pub fn momentum(&self, device: &Device) -> Result<BTreeMap<String, Tensor>> {
        match self {
            Engine::Autograd(opt) => Ok(opt.momentum.clone()),
            Engine::Mlp { trainer, .. } => trainer.momentum(device),
            Engine::Cnn(trainer) => trainer.momentum(device),
        }
    }

    /// One SGD step on u8 images [n, c, h, w]; the batch's mean loss and errors before the update.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        arch: &Architecture,
        pixels: &[u8],
        shape: [usize; 4],
        labels: Vec<u32>,
        lr: f64,
        cfg: &TrainConfig,
        device: &Device,
    ) -> Result<(f64, usize)> {
        match self {
            Engine::Mlp { trainer, inputs } => {
                inputs.clear();
                push_scaled_pixels(pixels, inputs);
                trainer.step(inputs, &labels, lr, cfg)
            }
            Engine::Cnn(trainer) => {
                let mut inputs = Vec::with_capacity(pixels.len());
                push_scaled_pixels(pixels, &mut inputs);
                trainer.step(inputs, shape, &labels, lr, cfg)
            }
            Engine::Autograd(_) => {
                let x = images_to_tensor(pixels, shape, device)?;
                let y = Tensor::from_vec(labels, shape[0], device)?;
                let (loss, correct) = self.step_on_device(arch, &x, &y, lr, cfg)?;
                Ok((loss.to_scalar::<f32>()? as f64, shape[0] - correct.to_scalar::<f32>()? as usize))
            }
        }
    }

    /// One SGD step of the candle path on a batch already on the device (inputs f32 [n, c, h, w],
    /// labels u32 [n]): the batch's mean loss and correct count, as f32 scalars left on the
    /// device. Nothing is read back, so a GPU's host can queue the next step at once. A
    /// non-finite loss is the caller's to find when it reads the loss (the update is made anyway:
    /// training stops there).
    pub fn step_on_device(
        &mut self,
        arch: &Architecture,
        x: &Tensor,
        y: &Tensor,
        lr: f64,
        cfg: &TrainConfig,
    ) -> Result<(Tensor, Tensor)> {
        let Engine::Autograd(opt) = self else {
            bail!("step_on_device is the candle path's; this engine runs on the CPU's fast path")
        };
        let mut bn_updates = Vec::new();
        let (loss, correct) = match &opt.taped {
            Some(upstream) => {
                let (loss, correct, grads) =
                    arch.loss_and_gradients(&opt.detached_state(), x, y, upstream, &mut bn_updates)?;
                opt.step(|name, _| grads.get(name), lr, cfg)?;
                (loss, correct)
            }
            None => {
                let logits = arch.forward(&opt.state(), x, BnMode::Train(&mut bn_updates))?;
                let (loss, correct) = loss_and_correct(&logits, y)?;
                let grads = loss.backward()?;
                opt.step(|_, var| grads.get(var.as_tensor()), lr, cfg)?;
                (loss, correct)
            }
        };
        for (name, t) in bn_updates {
            opt.buffers.insert(name, t.detach());
        }
        Ok((loss.detach(), correct))
    }
}

const RESUME_FILE: &str = "resume.safetensors";

fn resume_path(out_dir: &Path) -> PathBuf {
    out_dir.join(RESUME_FILE)
}

struct ResumePoint {
    epoch: u32,
    step: u64,
    state: State,
    momentum: BTreeMap<String, Tensor>,
    history: Vec<EpochRecord>,
}

fn save_resume(
    path: &Path,
    key: &str,
    engine: &Engine,
    device: &Device,
    epoch: u32,
    step: u64,
    history: &[EpochRecord],
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (k, v) in engine.state(device)? {
        tensors.insert(format!("model/{k}"), v);
    }
    for (k, v) in engine.momentum(device)? {
        tensors.insert(format!("momentum/{k}"), v);
    }
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
    let mut momentum = BTreeMap::new();
    for (k, v) in tensors {
        if let Some(name) = k.strip_prefix("model/") {
            state.insert(name.to_string(), v);
        } else if let Some(name) = k.strip_prefix("momentum/") {
            momentum.insert(name.to_string(), v);
        }
    }
    arch.check_state(&state).with_context(fault)?;
    Ok(Some(ResumePoint { epoch, step, state, momentum, history }))
}

/// Trains, writing checkpoints and `history.parquet` into `job.out_dir`.
pub fn run(job: &TrainJob<'_>, initial: State) -> Result<TrainSummary> {
    let cfg = job.cfg;
    let n_train = job.cfg.train_examples.map_or(job.train.len(), |n| (n as usize).min(job.train.len()));
    let n_test = job.cfg.test_examples.map_or(job.test.len(), |n| (n as usize).min(job.test.len()));
    let bs = cfg.batch_size as usize;
    let steps_per_epoch = n_train.div_ceil(bs) as u64;
    let ckpt_dir = job.out_dir.join("checkpoints");
    let resume = resume_path(job.out_dir);

    let (mut engine, mut history, start_epoch, mut step, resumed_from) =
        match load_resume(&resume, job.key, job.arch, job.device)? {
            Some(r) => {
                tracing::info!("resuming {} seed {} after epoch {}", job.experiment, job.seed, r.epoch);
                let engine = Engine::new(job.arch, &r.state, Some(r.momentum), job.device, job.cfg.compute)?;
                (engine, r.history, r.epoch + 1, r.step, Some(r.epoch))
            }
            None => {
                // A fresh start: checkpoints of earlier settings must not mix with these.
                if ckpt_dir.exists() {
                    std::fs::remove_dir_all(&ckpt_dir)
                        .with_context(|| format!("cannot clear {}", ckpt_dir.display()))?;
                }
                (Engine::new(job.arch, &initial, None, job.device, job.cfg.compute)?, Vec::new(), 0, 0, None)
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
        eval::evaluate(job.arch, state, &test_set, job.device, cfg.compute)
            .map_err(|e| device::name_memory_settings(e, &[("train.eval_batch_size", cfg.eval_batch_size)]))
    };
    // The candle path trains from a copy of the training examples on its device.
    let resident = match &engine {
        Engine::Autograd(_) => Some(
            ResidentSplit::upload(job.train, &(0..n_train).collect::<Vec<_>>(), job.device)
                .map_err(|e| device::name_memory_settings(e, &[("train.train_examples", n_train as u32)]))
                .context("uploading the training examples")?,
        ),
        _ => None,
    };
    if start_epoch == 0 {
        let t0 = Instant::now();
        let state = engine.state(job.device)?;
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
        let plan = EpochPlan { job, epoch, order: random::epoch_order(n_train, job.seed, epoch), steps_per_epoch };
        let (acc, lr) = match &resident {
            Some(data) => plan.steps_on_device(&mut engine, data, &mut step, &bar)?,
            None => plan.steps_from_host(&mut engine, &mut step, &bar)?,
        };
        bar.finish_and_clear();
        let train_time = t0.elapsed().as_secs_f64();
        train_seconds += train_time;
        trained_examples += n_train;
        let state = engine.state(job.device)?;
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
            save_resume(&resume, job.key, &engine, job.device, epoch, step, &history)?;
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
    write_history(&job.out_dir.join("history.parquet"), &history, job)?;
    if resume.exists() {
        std::fs::remove_file(&resume).with_context(|| format!("cannot remove {}", resume.display()))?;
    }
    let examples_per_second = if train_seconds > 0.0 { trained_examples as f64 / train_seconds } else { 0.0 };
    Ok(TrainSummary { history, resumed_from, examples_per_second })
}

/// One epoch's steps: the examples in `order`, augmented from the epoch's stream.
struct EpochPlan<'a> {
    job: &'a TrainJob<'a>,
    epoch: u32,
    order: Vec<usize>,
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

    /// The steps of the candle path, from the examples held on its device: the epoch's order
    /// and augmentation go up once, each step gathers its batch there, and the losses come back
    /// in one read at the end. The batches' mean losses and errors, and the last step's rate.
    fn steps_on_device(
        &self,
        engine: &mut Engine,
        data: &ResidentSplit,
        step: &mut u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<(Accumulator, f64)> {
        let (job, cfg, n) = (self.job, self.job.cfg, self.order.len());
        let mut aug_rng = random::augment_rng(job.seed, self.epoch);
        let shifts: Vec<u32> = self
            .order
            .iter()
            .map(|_| if cfg.augment { Shift::draw(&mut aug_rng) } else { Shift::NONE }.packed())
            .collect();
        let positions: Vec<u32> = self.order.iter().map(|&i| i as u32).collect();
        let positions = Tensor::from_vec(positions, n, job.device)?;
        let shifts = Tensor::from_vec(shifts, n, job.device)?;
        let (first_step, mut lr) = (*step, 0.0);
        let mut pending = PendingMetrics::default();
        for start in (0..n).step_by(cfg.batch_size as usize) {
            lr = self.learning_rate(*step);
            let len = (cfg.batch_size as usize).min(n - start);
            let (x, y) = data
                .batch(&positions.narrow(0, start, len)?, &shifts.narrow(0, start, len)?)
                .map_err(|e| self.step_failed(e))?;
            let (loss, correct) = engine.step_on_device(job.arch, &x, &y, lr, cfg).map_err(|e| self.step_failed(e))?;
            pending.push(&loss, &correct, len);
            *step += 1;
            bar.inc(1);
        }
        // The epoch's one read: it waits for the device to finish the steps.
        let mut acc = Accumulator::default();
        for (k, (loss, errors, len)) in pending.read().map_err(|e| self.step_failed(e))?.into_iter().enumerate() {
            if !loss.is_finite() {
                return Err(self.diverged(loss, first_step + k as u64));
            }
            acc.add(loss, errors, len);
        }
        Ok((acc, lr))
    }

    /// The steps of the CPU's fast paths, each batch gathered and augmented on the host.
    fn steps_from_host(
        &self,
        engine: &mut Engine,
        step: &mut u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<(Accumulator, f64)> {
        let (job, cfg) = (self.job, self.job.cfg);
        let [c, h, w] = [job.train.channels, job.train.height, job.train.width];
        let size = c * h * w;
        let mut aug_rng = random::augment_rng(job.seed, self.epoch);
        let (mut acc, mut lr) = (Accumulator::default(), 0.0);
        for chunk in self.order.chunks(cfg.batch_size as usize) {
            lr = self.learning_rate(*step);
            let mut pixels = Vec::with_capacity(chunk.len() * size);
            let mut labels = Vec::with_capacity(chunk.len());
            for &i in chunk {
                pixels.extend_from_slice(&job.train.images[i * size..(i + 1) * size]);
                labels.push(job.train.labels[i] as u32);
            }
            let shape = [chunk.len(), c, h, w];
            if cfg.augment {
                augment(&mut pixels, shape, &mut aug_rng);
            }
            let (loss, errors) =
                engine.step(job.arch, &pixels, shape, labels, lr, cfg, job.device).map_err(|e| self.step_failed(e))?;
            if !loss.is_finite() {
                return Err(self.diverged(loss, *step));
            }
            acc.add(loss, errors, chunk.len());
            *step += 1;
            bar.inc(1);
        }
        Ok((acc, lr))
    }
}

fn write_history(path: &Path, history: &[EpochRecord], job: &TrainJob<'_>) -> Result<()> {
    let n = history.len();
    let col_i = |f: &dyn Fn(&EpochRecord) -> i64| Column::Int(history.iter().map(|r| Some(f(r))).collect());
    let col_f = |f: &dyn Fn(&EpochRecord) -> Option<f64>| Column::Float(history.iter().map(f).collect());
    Table::new()
        .col("experiment", Column::Text(vec![Some(job.experiment.to_string()); n]))
        .col("seed", Column::Int(vec![Some(job.seed as i64); n]))
        .col("epoch", col_i(&|r| r.epoch as i64))
        .col("step", col_i(&|r| r.step as i64))
        .col("lr", col_f(&|r| Some(r.lr)))
        .nullable("train_loss", col_f(&|r| r.train_loss))
        .nullable("train_error", col_f(&|r| r.train_error))
        .col("test_loss", col_f(&|r| Some(r.test_loss)))
        .col("test_error", col_f(&|r| Some(r.test_error)))
        .nullable("train_seconds", col_f(&|r| r.train_seconds))
        .col("seconds", col_f(&|r| Some(r.seconds)))
        .write(path, &job.table_metadata)
}

#[cfg(test)]
mod tests {
    use rand_core::SeedableRng;

    use super::*;

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

    #[test]
    fn augmentation_keeps_pixels_and_shifts_them() {
        let shape = [1, 1, 8, 8];
        let original: Vec<u8> = (0..64).map(|v| v as u8 + 1).collect();
        let mut r = random::rng(3);
        let mut moved = false;
        for _ in 0..20 {
            let mut img = original.clone();
            augment(&mut img, shape, &mut r);
            // Every non-zero pixel is one of the originals.
            assert!(img.iter().all(|&p| p == 0 || original.contains(&p)));
            moved |= img != original;
        }
        assert!(moved);
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

        let mut engine = Engine::new(&arch, &initial, None, &dev, ComputePath::Autograd).unwrap();
        let (mut step, mut losses) = (0, Vec::new());
        for epoch in 1..=2 {
            let mut aug_rng = random::augment_rng(seed, epoch);
            let mut acc = Accumulator::default();
            for chunk in random::epoch_order(20, seed, epoch).chunks(8) {
                let mut pixels: Vec<u8> = chunk.iter().flat_map(|&i| train.images[i * 144..][..144].to_vec()).collect();
                let labels = chunk.iter().map(|&i| train.labels[i] as u32).collect();
                augment(&mut pixels, [chunk.len(), 1, 12, 12], &mut aug_rng);
                let lr = learning_rate(&cfg, step, 3);
                let (loss, errors) =
                    engine.step(&arch, &pixels, [chunk.len(), 1, 12, 12], labels, lr, &cfg, &dev).unwrap();
                acc.add(loss, errors, chunk.len());
                step += 1;
            }
            losses.push(acc.metrics());
        }
        let host = engine.state(&dev).unwrap();
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
        let host_test =
            eval::evaluate(&arch, &host, &EvalSet::new(&test, (0..10).collect(), 4), &dev, ComputePath::Fast).unwrap();
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
