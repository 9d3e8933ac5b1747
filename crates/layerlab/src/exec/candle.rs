//! candle's executor: every network on candle tensors, on any device. On a GPU it is the only
//! executor; on the CPU (`train.compute = "autograd"`) it is the reference the host executors
//! are tested against.
//!
//! Examples live on the device ([`crate::resident`]): a training epoch's order and augmentation
//! go up once, each step gathers its batch there, and losses come back in one read per epoch or
//! evaluation ([`PendingMetrics`]). A GPU's steps take their gradients from [`crate::backward`]
//! (a taped backward pass); elsewhere from candle's autograd.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};

use super::{BatchMetrics, Executor, Trainer};
use crate::batches::EpochBatches;
use crate::batchnorm::CalibrationTensorSums;
use crate::data::Split;
use crate::eval::{EvalSet, Metrics, PendingMetrics};
use crate::kernels::pixels::Shift;
use crate::kernels::KernelOptions;
use crate::model::{images_to_tensor, loss_and_correct, Architecture, BnMode, State};
use crate::optim::{state_key, Optimizer, OptimizerState, StepAt};
use crate::resident::ResidentSplit;

/// A network on candle tensors on `device`, through the GPU kernels `kernels` allows.
pub struct Candle<'a> {
    pub arch: &'a Architecture,
    pub device: Device,
    pub kernels: KernelOptions,
}

impl Executor for Candle<'_> {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn evaluate(&self, state: &State, set: &EvalSet<'_>) -> Result<Metrics> {
        let state = self.arch.for_evaluation(state)?;
        let mut pending = PendingMetrics::default();
        for batch in set.device_batches(&self.device)? {
            let (x, y, n) = batch?;
            let logits = self.arch.forward(&state, &x, BnMode::Eval, &self.kernels)?;
            let (loss, correct) = loss_and_correct(&logits, &y)?;
            pending.push(&loss, &correct, n);
        }
        pending.metrics()
    }

    fn evaluate_variants(
        &self,
        trained: &State,
        entry: usize,
        variants: &mut [State],
        sets: &[&EvalSet<'_>],
        calibration: Option<&EvalSet<'_>>,
        on_progress: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<Metrics>>> {
        let (arch, kernels) = (self.arch, &self.kernels);
        // Each state is prepared for evaluation once (`Architecture::for_evaluation`).
        let trained = &arch.for_evaluation(trained)?;
        if let Some(cal) = calibration {
            let mut prefixes = Vec::new();
            for batch in cal.device_batches(&self.device)? {
                let (x, _, _) = batch?;
                prefixes.push(arch.forward_range(trained, &x, 0, entry, BnMode::Eval, kernels)?);
            }
            for v in variants.iter_mut() {
                recalibrate(arch, v, &prefixes, entry, kernels)?;
            }
        }
        let prepared = variants.iter().map(|v| arch.for_evaluation(v)).collect::<Result<Vec<_>>>()?;
        let mut results = Vec::with_capacity(sets.len());
        for set in sets {
            let mut pending: Vec<PendingMetrics> = variants.iter().map(|_| PendingMetrics::default()).collect();
            for batch in set.device_batches(&self.device)? {
                let (x, y, n) = batch?;
                let prefix = arch.forward_range(trained, &x, 0, entry, BnMode::Eval, kernels)?;
                for (state, p) in prepared.iter().zip(pending.iter_mut()) {
                    let logits = arch.forward_range(state, &prefix, entry, arch.layers.len(), BnMode::Eval, kernels)?;
                    let (loss, correct) = loss_and_correct(&logits, &y)?;
                    p.push(&loss, &correct, n);
                }
            }
            results.push(pending.iter().map(PendingMetrics::metrics).collect::<Result<_>>()?);
            on_progress();
        }
        Ok(results)
    }

    fn trainer(
        &self,
        state: &State,
        optimizer: Box<dyn Optimizer>,
        resumed: Option<&OptimizerState>,
    ) -> Result<Box<dyn Trainer>> {
        Ok(Box::new(CandleTrainer::new(self.arch, state, optimizer, resumed, &self.device, self.kernels)?))
    }
}

/// Running statistics recomputed as a cumulative average over calibration batches (PyTorch's
/// `momentum=None`), for every BatchNorm in layers `from..`; `prefixes` are the batches'
/// activations entering layer `from`.
fn recalibrate(
    arch: &Architecture,
    state: &mut State,
    prefixes: &[Tensor],
    from: usize,
    kernels: &KernelOptions,
) -> Result<()> {
    let mut sums = CalibrationTensorSums::default();
    for x in prefixes {
        let mut updates = Vec::new();
        arch.forward_range(state, x, from, arch.layers.len(), BnMode::Calibrate(&mut updates), kernels)?;
        for (name, t) in updates {
            sums.add(name, t)?;
        }
    }
    state.extend(sums.means(prefixes.len())?);
    Ok(())
}

/// Training on candle `Var`s.
pub struct CandleTrainer {
    arch: Architecture,
    device: Device,
    /// Trainable tensors, by name, in a fixed order.
    params: Vec<(String, Var)>,
    optimizer: Box<dyn Optimizer>,
    optimizer_state: OptimizerState,
    /// BatchNorm running statistics and other non-trained tensors.
    buffers: BTreeMap<String, Tensor>,
    /// Gradients from [`crate::backward`] (a GPU's steps) rather than candle's autograd; with
    /// the loss op's output gradient, made once on the device.
    taped: Option<Tensor>,
    /// The training examples on the device, from [`Trainer::prepare`].
    resident: Option<ResidentSplit>,
    kernels: KernelOptions,
}

impl CandleTrainer {
    pub fn new(
        arch: &Architecture,
        state: &State,
        optimizer: Box<dyn Optimizer>,
        resumed: Option<&OptimizerState>,
        device: &Device,
        kernels: KernelOptions,
    ) -> Result<CandleTrainer> {
        let mut params = Vec::new();
        let mut buffers = BTreeMap::new();
        let mut optimizer_state = OptimizerState::new();
        for (_, spec) in arch.tensor_specs() {
            let t = state.get(&spec.name).with_context(|| format!("missing tensor {}", spec.name))?;
            if spec.trainable {
                params.push((spec.name.clone(), Var::from_tensor(t)?));
                for buffer in optimizer.buffers() {
                    let key = state_key(buffer, &spec.name);
                    let b = match resumed {
                        Some(r) => r.get(&key).with_context(|| format!("the resume file lacks {key}"))?.clone(),
                        None => t.zeros_like()?,
                    };
                    optimizer_state.insert(key, b);
                }
            } else {
                buffers.insert(spec.name.clone(), t.clone());
            }
        }
        let taped =
            if crate::backward::used_on(device, &kernels) { Some(CandleTrainer::upstream(device)?) } else { None };
        Ok(CandleTrainer {
            arch: arch.clone(),
            device: device.clone(),
            params,
            optimizer,
            optimizer_state,
            buffers,
            taped,
            resident: None,
            kernels,
        })
    }

    /// The loss op's output gradient for the loss alone: [1, 0].
    fn upstream(device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(&[1f32, 0.0], device)?)
    }

    /// Takes the gradients from [`crate::backward`] on any device (a GPU's trainer does by
    /// default): for tests on the CPU.
    pub fn use_taped_backward(&mut self) -> Result<()> {
        self.taped = Some(CandleTrainer::upstream(&self.device)?);
        Ok(())
    }

    fn current_state(&self) -> State {
        let mut s: State = self.buffers.clone();
        for (name, v) in &self.params {
            s.insert(name.clone(), v.as_tensor().clone());
        }
        s
    }

    /// Plain tensors, detached from any graph.
    fn detached_state(&self) -> State {
        self.current_state().into_iter().map(|(k, v)| (k, v.detach())).collect()
    }

    /// The optimizer's update of every parameter that has a gradient in `grad_of`.
    fn update<'g>(&mut self, grad_of: impl Fn(&str, &Var) -> Option<&'g Tensor>, at: StepAt) -> Result<()> {
        let updates: Vec<(&str, &Var, &Tensor)> =
            self.params.iter().filter_map(|(name, var)| grad_of(name, var).map(|g| (name.as_str(), var, g))).collect();
        self.optimizer.update_vars(at, &updates, &mut self.optimizer_state, &self.kernels)
    }
}

impl Trainer for CandleTrainer {
    /// Puts the examples on the device, once.
    fn prepare(&mut self, split: &Split, examples: usize) -> Result<()> {
        if self.resident.is_none() {
            self.resident = Some(ResidentSplit::upload(split, &(0..examples).collect::<Vec<_>>(), &self.device)?);
        }
        Ok(())
    }

    fn step(&mut self, pixels: &[u8], shape: [usize; 4], labels: &[u32], at: StepAt) -> Result<(f64, usize)> {
        let x = images_to_tensor(pixels, shape, &self.device)?;
        let y = Tensor::from_vec(labels.to_vec(), shape[0], &self.device)?;
        let (loss, correct) = self.step_on_device(&x, &y, at)?;
        Ok((loss.to_scalar::<f32>()? as f64, shape[0] - correct.to_scalar::<f32>()? as usize))
    }

    /// The epoch from the examples held on the device ([`Trainer::prepare`]): the order and
    /// augmentation go up once, each step gathers its batch there, and the losses come back in
    /// one read at the end.
    fn epoch(
        &mut self,
        batches: &EpochBatches<'_>,
        first_step: u64,
        schedule: &dyn Fn(u64) -> StepAt,
        on_step: &mut dyn FnMut(),
    ) -> Result<Vec<BatchMetrics>> {
        if self.resident.is_none() {
            self.prepare(batches.split, batches.order.len())?;
        }
        let n = batches.order.len();
        let shifts: Vec<u32> = match &batches.shifts {
            Some(shifts) => shifts.iter().map(|s| s.packed()).collect(),
            None => vec![Shift::NONE.packed(); n],
        };
        let positions: Vec<u32> = batches.order.iter().map(|&i| i as u32).collect();
        let positions = Tensor::from_vec(positions, n, &self.device)?;
        let shifts = Tensor::from_vec(shifts, n, &self.device)?;
        let mut pending = PendingMetrics::default();
        for (k, range) in batches.ranges().enumerate() {
            let len = range.len();
            let data = self.resident.as_ref().context("the training examples are not on the device")?;
            let (x, y) = data.batch(&positions.narrow(0, range.start, len)?, &shifts.narrow(0, range.start, len)?)?;
            let (loss, correct) = self.step_on_device(&x, &y, schedule(first_step + k as u64))?;
            pending.push(&loss, &correct, len);
            on_step();
        }
        // The epoch's one read: it waits for the device to finish the steps.
        Ok(pending
            .read()?
            .into_iter()
            .map(|(loss, errors, examples)| BatchMetrics { loss, errors, examples })
            .collect())
    }

    /// The weights and buffers, detached from any graph. They share the `Var`s' memory, which
    /// the next step's update may write in place (on a GPU through raw addresses, see
    /// `kernels::cuda::sgd_update_all`): read them, or copy them, before the next step. Every
    /// caller here does (a checkpoint, an evaluation, the resume file).
    fn state(&self) -> Result<State> {
        Ok(self.detached_state())
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        Ok(self.optimizer_state.clone())
    }

    fn steps_on_device(&self) -> bool {
        true
    }

    /// A non-finite loss is the caller's to find when it reads the loss (the update is made
    /// anyway: training stops there).
    fn step_on_device(&mut self, x: &Tensor, y: &Tensor, at: StepAt) -> Result<(Tensor, Tensor)> {
        let (arch, kernels) = (&self.arch, &self.kernels);
        let mut bn_updates = Vec::new();
        let (loss, correct) = match self.taped.clone() {
            Some(upstream) => {
                let (loss, correct, grads) =
                    arch.loss_and_gradients(&self.detached_state(), x, y, &upstream, &mut bn_updates, kernels)?;
                self.update(|name, _| grads.get(name), at)?;
                (loss, correct)
            }
            None => {
                let logits = arch.forward(&self.current_state(), x, BnMode::Train(&mut bn_updates), kernels)?;
                let (loss, correct) = loss_and_correct(&logits, y)?;
                let grads = loss.backward()?;
                self.update(|_, var| grads.get(var.as_tensor()), at)?;
                (loss, correct)
            }
        };
        for (name, t) in bn_updates {
            self.buffers.insert(name, t.detach());
        }
        Ok((loss.detach(), correct))
    }
}
