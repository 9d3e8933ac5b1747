//! Runs a network over a split in evaluation mode and returns loss and error.

use std::cell::OnceCell;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::cnn::{Activations, CnnForward};
use crate::data::Split;
use crate::mlp::{MlpForward, MlpPlan};
use crate::model::{loss_and_correct, push_scaled_pixels, Architecture, BnMode, State};
use crate::resident::{PendingMetrics, ResidentSplit};
use layerlab_pipeline::ComputePath;

/// Mean loss and error rate over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub loss: f64,
    pub error: f64,
    pub examples: usize,
}

/// The examples a measurement is taken on, and how they are batched.
pub struct EvalSet<'a> {
    pub split: &'a Split,
    pub indices: Vec<usize>,
    pub batch: usize,
    /// The examples held on the device of the candle path, uploaded at first use.
    resident: OnceCell<Resident>,
}

/// A [`ResidentSplit`] with its evaluation positions and (no) shifts.
pub(crate) struct Resident {
    pub data: ResidentSplit,
    pub positions: Tensor,
    pub shifts: Tensor,
}

impl<'a> EvalSet<'a> {
    pub fn new(split: &'a Split, indices: Vec<usize>, batch: usize) -> EvalSet<'a> {
        EvalSet { split, indices, batch: batch.max(1), resident: OnceCell::new() }
    }

    /// The set's examples on `device`, uploaded once (a set is measured on one device).
    pub(crate) fn resident(&self, device: &Device) -> Result<&Resident> {
        if let Some(r) = self.resident.get() {
            anyhow::ensure!(r.data.device().same_device(device), "an evaluation set was used on two devices");
            return Ok(r);
        }
        let data = ResidentSplit::upload(self.split, &self.indices, device)?;
        let (positions, shifts) = data.in_order()?;
        Ok(self.resident.get_or_init(|| Resident { data, positions, shifts }))
    }

    /// The set's batches on `device`, in order, each made when the iteration reaches it:
    /// (inputs, labels, examples).
    pub(crate) fn device_batches<'s>(
        &'s self,
        device: &Device,
    ) -> Result<impl Iterator<Item = Result<(Tensor, Tensor, usize)>> + 's> {
        let r = self.resident(device)?;
        let len = self.indices.len();
        Ok((0..len).step_by(self.batch).map(move |start| {
            let n = self.batch.min(len - start);
            let (x, y) = r.data.batch(&r.positions.narrow(0, start, n)?, &r.shifts.narrow(0, start, n)?)?;
            Ok((x, y, n))
        }))
    }
}

/// The fully connected fast path's plan, when it applies (see [`crate::mlp`]): where training,
/// evaluation and the reset grid choose their compute path (with [`cnn_fast`] for training
/// convolutional networks).
pub fn fast_plan(arch: &Architecture, device: &Device, path: ComputePath) -> Option<MlpPlan> {
    if device.is_cpu() && path == ComputePath::Fast {
        MlpPlan::of(arch)
    } else {
        None
    }
}

/// Whether a network runs on the CNN fast path (see [`crate::cnn`]): networks with convolutions on
/// the CPU under `train.compute = "fast"`. Training, evaluation and the reset grid alike.
pub fn cnn_fast(arch: &Architecture, device: &Device, path: ComputePath) -> bool {
    path == ComputePath::Fast && crate::cnn::applies(arch, device)
}

/// One batch as f32 inputs (pixels / 255, into `x`) and its labels.
pub fn batch_f32(split: &Split, indices: &[usize], x: &mut Vec<f32>) -> Vec<u32> {
    let size = split.image_size();
    x.clear();
    for &i in indices {
        push_scaled_pixels(&split.images[i * size..(i + 1) * size], x);
    }
    indices.iter().map(|&i| split.labels[i] as u32).collect()
}

/// One batch as the CNN fast path's input activations, and its labels.
pub fn batch_activations(split: &Split, indices: &[usize]) -> Result<(Activations, Vec<u32>)> {
    let mut x = Vec::with_capacity(indices.len() * split.image_size());
    let labels = batch_f32(split, indices, &mut x);
    Ok((Activations::input(x, split.batch_dims(indices.len()))?, labels))
}

/// Sums loss × count and errors over batches, so that the result is a mean over examples.
#[derive(Debug, Default, Clone, Copy)]
pub struct Accumulator {
    loss_sum: f64,
    errors: usize,
    examples: usize,
}

impl Accumulator {
    pub fn add(&mut self, mean_loss: f64, errors: usize, examples: usize) {
        self.loss_sum += mean_loss * examples as f64;
        self.errors += errors;
        self.examples += examples;
    }
    pub fn metrics(&self) -> Metrics {
        let n = self.examples.max(1) as f64;
        Metrics { loss: self.loss_sum / n, error: self.errors as f64 / n, examples: self.examples }
    }
}

/// Evaluates `state` on the examples of `set`.
pub fn evaluate(
    arch: &Architecture,
    state: &State,
    set: &EvalSet<'_>,
    device: &Device,
    path: ComputePath,
) -> Result<Metrics> {
    let mut acc = Accumulator::default();
    let (split, batch) = (set.split, set.batch);
    if let Some(plan) = fast_plan(arch, device, path) {
        let mut net = MlpForward::new(&plan, state)?;
        let mut x = Vec::new();
        for chunk in set.indices.chunks(batch) {
            let labels = batch_f32(split, chunk, &mut x);
            let (loss, errors) = net.loss_and_errors(&x, &labels);
            acc.add(loss, errors, chunk.len());
        }
        return Ok(acc.metrics());
    }
    if cnn_fast(arch, device, path) {
        let net = CnnForward::new(arch, state)?;
        for chunk in set.indices.chunks(batch) {
            let (input, labels) = batch_activations(split, chunk)?;
            let (loss, errors) = net.loss_and_errors_from(&input, &labels, 0)?;
            acc.add(loss, errors, chunk.len());
        }
        return Ok(acc.metrics());
    }
    let state = arch.for_evaluation(state)?;
    let mut pending = PendingMetrics::default();
    for batch in set.device_batches(device)? {
        let (x, y, n) = batch?;
        let logits = arch.forward(&state, &x, BnMode::Eval)?;
        let (loss, correct) = loss_and_correct(&logits, &y)?;
        pending.push(&loss, &correct, n);
    }
    pending.metrics()
}
