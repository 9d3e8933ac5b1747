//! Runs a network over a split in evaluation mode and returns loss and error.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::cnn::{Activations, CnnForward};
use crate::data::Split;
use crate::mlp::{MlpForward, MlpPlan};
use crate::model::{images_to_tensor, loss_and_errors, push_scaled_pixels, Architecture, BnMode, State};
use layerlab_pipeline::ComputePath;

/// Mean loss and error rate over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub loss: f64,
    pub error: f64,
    pub examples: usize,
}

/// One batch of a split as tensors: inputs [n, c, h, w] (f32, pixels / 255) and labels (u32).
pub fn batch_tensors(split: &Split, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let size = split.image_size();
    let mut pixels = Vec::with_capacity(indices.len() * size);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        pixels.extend_from_slice(&split.images[i * size..(i + 1) * size]);
        labels.push(split.labels[i] as u32);
    }
    let x = images_to_tensor(&pixels, split.batch_dims(indices.len()), device)?;
    let y = Tensor::from_vec(labels, indices.len(), device)?;
    Ok((x, y))
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

/// Evaluates `state` on the examples `indices` of `split` in batches.
pub fn evaluate(
    arch: &Architecture,
    state: &State,
    split: &Split,
    indices: &[usize],
    batch: usize,
    device: &Device,
    path: ComputePath,
) -> Result<Metrics> {
    let mut acc = Accumulator::default();
    if let Some(plan) = fast_plan(arch, device, path) {
        let mut net = MlpForward::new(&plan, state)?;
        let mut x = Vec::new();
        for chunk in indices.chunks(batch.max(1)) {
            let labels = batch_f32(split, chunk, &mut x);
            let (loss, errors) = net.loss_and_errors(&x, &labels);
            acc.add(loss, errors, chunk.len());
        }
        return Ok(acc.metrics());
    }
    if cnn_fast(arch, device, path) {
        let net = CnnForward::new(arch, state)?;
        for chunk in indices.chunks(batch.max(1)) {
            let (input, labels) = batch_activations(split, chunk)?;
            let (loss, errors) = net.loss_and_errors_from(&input, &labels, 0)?;
            acc.add(loss, errors, chunk.len());
        }
        return Ok(acc.metrics());
    }
    for chunk in indices.chunks(batch.max(1)) {
        let (x, y) = batch_tensors(split, chunk, device)?;
        let logits = arch.forward(state, &x, BnMode::Eval)?;
        let (loss, errors) = loss_and_errors(&logits, &y)?;
        acc.add(loss.to_scalar::<f32>()? as f64, errors, chunk.len());
    }
    Ok(acc.metrics())
}
