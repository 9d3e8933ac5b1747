//! Runs a network over a split in evaluation mode and returns loss and error.

use std::cell::OnceCell;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::cnn::{Activations, CnnForward};
use crate::data::Split;
use crate::mlp::{MlpForward, MlpPlan};
use crate::model::{loss_and_correct, push_scaled_pixels, Architecture, BnMode, State};
use crate::resident::ResidentSplit;
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

/// The mean losses and correct counts of batches, as scalar tensors on their device, read back in
/// one transfer. The values are the ones a per-batch read gives, summed in the same order, so
/// metrics are the same bits either way.
#[derive(Default)]
pub struct PendingMetrics {
    losses: Vec<Tensor>,
    correct: Vec<Tensor>,
    examples: Vec<usize>,
}

impl PendingMetrics {
    /// A batch of `examples`: its mean loss (f32 scalar) and its correct count (f32 scalar).
    pub fn push(&mut self, loss: &Tensor, correct: &Tensor, examples: usize) {
        self.losses.push(loss.detach());
        self.correct.push(correct.detach());
        self.examples.push(examples);
    }

    /// Each batch's mean loss, errors and examples, in the order they were pushed.
    pub fn read(&self) -> Result<Vec<(f64, usize, usize)>> {
        if self.losses.is_empty() {
            return Ok(Vec::new());
        }
        let both = Tensor::stack(&[Tensor::stack(&self.losses, 0)?, Tensor::stack(&self.correct, 0)?], 0)?;
        let both = both.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(self
            .examples
            .iter()
            .zip(both[0].iter().zip(&both[1]))
            .map(|(&n, (&loss, &correct))| (loss as f64, n - correct as usize, n))
            .collect())
    }

    /// The mean loss and error over every batch.
    pub fn metrics(&self) -> Result<Metrics> {
        let mut acc = Accumulator::default();
        for (loss, errors, n) in self.read()? {
            acc.add(loss, errors, n);
        }
        Ok(acc.metrics())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_metrics_equal_the_per_batch_reads() {
        let batches = [(0.75f32, 3.0f32, 4usize), (1.5, 0.0, 2), (0.125, 5.0, 5)];
        let mut pending = PendingMetrics::default();
        let mut acc = Accumulator::default();
        for (loss, correct, n) in batches {
            pending.push(&Tensor::new(loss, &Device::Cpu).unwrap(), &Tensor::new(correct, &Device::Cpu).unwrap(), n);
            acc.add(loss as f64, n - correct as usize, n);
        }
        assert_eq!(pending.read().unwrap(), vec![(0.75, 1, 4), (1.5, 2, 2), (0.125, 0, 5)]);
        assert_eq!(pending.metrics().unwrap(), acc.metrics());
        assert_eq!(PendingMetrics::default().metrics().unwrap().examples, 0);
    }
}
