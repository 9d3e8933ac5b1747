//! A fast training path for convolutional networks (VGG with or without BatchNorm, ResNet):
//! forward pass, backward pass and the SGD update on f32 buffers with layerlab's own kernels
//! ([`crate::kernels`]), without candle's autograd.
//!
//! Why: with every layer already one of our kernels, a candle autograd step of VGG-11-BN at
//! width 0.25 still spent as long outside the convolutions as in them (`docs/performance.md`,
//! "Step 4"). candle's backward pass gives every activation's gradient a fresh zero tensor and adds
//! the layer's gradient into it (two more passes over every activation), and keeps the whole
//! graph of tensors alive. Here the forward pass records what each layer's backward pass needs
//! (its input, or its output for a ReLU) and nothing else, each gradient is written once, and
//! the optimizer updates the weights in place.
//!
//! The maths is the general path's (`model::Architecture::forward` with `BnMode::Train`,
//! `loss.backward()`, then the SGD of `train.rs`); `tests::matches_candle_autograd` checks the
//! two against each other, and every kernel splits its work into pieces fixed by the shapes, so
//! results do not depend on the thread count (`tests::results_do_not_depend_on_the_thread_count`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::batchnorm::{self, EPS as BN_EPS};
use crate::kernels::conv2d::{self, Geom};
use crate::kernels::gemm::matmul;
use crate::kernels::{layers, norm};
use crate::mlp::cross_entropy;
use crate::model::{Architecture, Layer, State, TensorSpec};
use crate::optim::{state_key, update_in_pieces, Optimizer, OptimizerState, StepAt};

/// Values of an elementwise pass handed to one task.
const VALUES_PER_TASK: usize = 1 << 14;

/// Activations of a batch: values and their [n, c, h, w] shape (a flat vector is [n, f, 1, 1]).
/// The values are shared, not copied, between the layer that reads them, the tape that keeps them
/// for the backward pass and a residual block's two branches.
struct Act {
    values: Arc<Vec<f32>>,
    dims: [usize; 4],
    /// Whether the values depend on a trained tensor (the input images do not: the first
    /// convolution's input gradient is never computed).
    needs_grad: bool,
}

/// What one layer's backward pass needs, recorded by the forward pass (a max-pool: where each
/// window's maximum lay, not its input).
enum Saved {
    Pad { pad: usize, dims: [usize; 4] },
    Flatten,
    Linear { name: String, x: Act },
    Conv { name: String, geom: Geom, bias: bool, x: Act },
    BatchNorm { name: String, relu: bool, x: Act, kept: norm::Kept },
    Relu { y: Arc<Vec<f32>> },
    MaxPool2 { dims: [usize; 4], needs_grad: bool, at: Vec<u8> },
    GlobalAvgPool { dims: [usize; 4] },
    Residual { main: Vec<Saved>, shortcut: Vec<Saved>, y: Arc<Vec<f32>> },
}

impl Saved {
    /// The kind of layer that saved this, as [`LayerTimes`] counts it.
    fn kind(&self) -> &'static str {
        match self {
            Saved::Pad { .. } => kind::PAD,
            Saved::Flatten => kind::FLATTEN,
            Saved::Linear { .. } => kind::LINEAR,
            Saved::Conv { .. } => kind::CONVOLUTION,
            Saved::BatchNorm { .. } => kind::BATCHNORM,
            Saved::Relu { .. } => kind::RELU,
            Saved::MaxPool2 { .. } => kind::MAX_POOL,
            Saved::GlobalAvgPool { .. } => kind::GLOBAL_AVG_POOL,
            Saved::Residual { .. } => kind::RESIDUAL,
        }
    }
}

/// A BatchNorm's batch statistics: its name, the batch mean and biased batch variance per
/// channel, and the number of values each was taken over.
type BatchStats = (String, Vec<f32>, Vec<f32>, usize);

/// The tensors a forward pass reads, by state_dict name.
trait Weights {
    fn tensor(&self, name: &str) -> Result<&[f32]>;
}

impl Weights for BTreeMap<String, Vec<f32>> {
    fn tensor(&self, name: &str) -> Result<&[f32]> {
        self.get(name).map(Vec::as_slice).with_context(|| format!("tensor '{name}' is missing"))
    }
}

/// One trained tensor: its values, the optimizer's buffers and its last gradient.
struct Param {
    shape: Vec<usize>,
    value: Vec<f32>,
    /// In the order of [`Optimizer::buffers`].
    buffers: Vec<Vec<f32>>,
    grad: Vec<f32>,
}

/// Training state of the CNN fast path.
pub struct CnnTrainer {
    arch: Architecture,
    params: BTreeMap<String, Param>,
    optimizer: Box<dyn Optimizer>,
    /// BatchNorm running statistics: values and shape.
    buffers: BTreeMap<String, (Vec<f32>, Vec<usize>)>,
    /// Where the steps' time goes, once [`CnnTrainer::time_layers`] switched it on.
    times: Option<LayerTimes>,
}

/// Seconds spent in each kind of layer, forward and backward, over the training steps taken
/// since [`CnnTrainer::time_layers`]: the whole step, not each kernel alone (`layerlab-bench
/// profile` prints both), so that what happens between the convolutions shows too.
#[derive(Debug, Clone, Default)]
pub struct LayerTimes {
    pub steps: usize,
    /// By (kind of layer, "forward" or "backward"); a residual block counts only its own sum and
    /// ReLU, its branches' layers count as themselves.
    pub seconds: BTreeMap<(&'static str, &'static str), f64>,
}

impl LayerTimes {
    fn add(&mut self, kind: &'static str, pass: &'static str, started: Instant) {
        *self.seconds.entry((kind, pass)).or_default() += started.elapsed().as_secs_f64();
    }
}

/// The kind of a layer, as [`LayerTimes`] counts it.
fn kind_of(layer: &Layer) -> &'static str {
    match layer {
        Layer::Pad(_) => kind::PAD,
        Layer::Flatten => kind::FLATTEN,
        Layer::Linear { .. } => kind::LINEAR,
        Layer::Conv { .. } => kind::CONVOLUTION,
        Layer::BatchNorm { .. } => kind::BATCHNORM,
        Layer::Relu => kind::RELU,
        Layer::MaxPool2 => kind::MAX_POOL,
        Layer::GlobalAvgPool => kind::GLOBAL_AVG_POOL,
        Layer::Residual { .. } => kind::RESIDUAL,
    }
}

/// The kinds of layer [`LayerTimes`] tells apart.
mod kind {
    pub(super) const PAD: &str = "pad";
    pub(super) const FLATTEN: &str = "flatten";
    pub(super) const LINEAR: &str = "linear";
    pub(super) const CONVOLUTION: &str = "convolution";
    pub(super) const BATCHNORM: &str = "batchnorm (+ relu)";
    pub(super) const RELU: &str = "relu";
    pub(super) const MAX_POOL: &str = "max-pool";
    pub(super) const GLOBAL_AVG_POOL: &str = "global average pool";
    pub(super) const RESIDUAL: &str = "residual sum + relu";
}

fn values(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>().with_context(|| format!("cannot read {what}"))
}

/// Every tensor of `arch` read from `state` as f32 values, checked against its shape.
fn state_values<'s>(
    arch: &'s Architecture,
    state: &'s State,
) -> impl Iterator<Item = Result<(&'s TensorSpec, Vec<f32>)>> + 's {
    arch.tensor_specs().map(|(_, spec)| {
        let t = state.get(&spec.name).with_context(|| format!("the weights lack {}", spec.name))?;
        let value = values(t, &spec.name)?;
        if value.len() != spec.shape.iter().product::<usize>() {
            bail!("{} has {} values, expected shape {:?}", spec.name, value.len(), spec.shape);
        }
        Ok((spec, value))
    })
}

impl CnnTrainer {
    /// From a state, with `optimizer` (and, when resuming, its buffers by
    /// [`crate::optim::state_key`]).
    pub fn new(
        arch: &Architecture,
        state: &State,
        optimizer: Box<dyn Optimizer>,
        resumed: Option<&OptimizerState>,
    ) -> Result<CnnTrainer> {
        let mut params = BTreeMap::new();
        let mut buffers = BTreeMap::new();
        for entry in state_values(arch, state) {
            let (spec, value) = entry?;
            if !spec.trainable {
                buffers.insert(spec.name.clone(), (value, spec.shape.clone()));
                continue;
            }
            let mut kept = Vec::with_capacity(optimizer.buffers().len());
            for buffer in optimizer.buffers() {
                let key = state_key(buffer, &spec.name);
                let values = match resumed {
                    Some(r) => values(r.get(&key).with_context(|| format!("the resume file lacks {key}"))?, &key)?,
                    None => vec![0.0; value.len()],
                };
                if values.len() != value.len() {
                    bail!("{key} has {} values, expected {}", values.len(), value.len());
                }
                kept.push(values);
            }
            let grad = vec![0.0; value.len()];
            params.insert(spec.name.clone(), Param { shape: spec.shape.clone(), value, buffers: kept, grad });
        }
        Ok(CnnTrainer { arch: arch.clone(), params, optimizer, buffers, times: None })
    }

    /// The weights and running statistics as tensors by state_dict name.
    pub fn state(&self, device: &Device) -> Result<State> {
        let mut s = State::new();
        for (name, p) in &self.params {
            s.insert(name.clone(), Tensor::from_vec(p.value.clone(), p.shape.clone(), device)?);
        }
        for (name, (v, shape)) in &self.buffers {
            s.insert(name.clone(), Tensor::from_vec(v.clone(), shape.clone(), device)?);
        }
        Ok(s)
    }

    /// The optimizer's buffers as tensors by [`crate::optim::state_key`].
    pub fn optimizer_state(&self, device: &Device) -> Result<OptimizerState> {
        let mut s = OptimizerState::new();
        for (name, p) in &self.params {
            for (buffer, values) in self.optimizer.buffers().iter().zip(&p.buffers) {
                s.insert(state_key(buffer, name), Tensor::from_vec(values.clone(), p.shape.clone(), device)?);
            }
        }
        Ok(s)
    }

    /// Times every layer of the steps from now on (see [`LayerTimes`]).
    pub fn time_layers(&mut self) {
        self.times = Some(LayerTimes::default());
    }

    /// Where the steps' time went since [`CnnTrainer::time_layers`].
    pub fn layer_times(&self) -> Option<&LayerTimes> {
        self.times.as_ref()
    }

    fn value(&self, name: &str) -> Result<&[f32]> {
        if let Some(p) = self.params.get(name) {
            return Ok(&p.value);
        }
        self.buffers.get(name).map(|(v, _)| v.as_slice()).with_context(|| format!("tensor '{name}' is missing"))
    }

    /// One training step on a batch `x` [n, c, h, w] (f32, already scaled); returns the batch's
    /// mean loss and errors before the update. A non-finite loss leaves the weights as they were.
    pub fn step(&mut self, x: Vec<f32>, dims: [usize; 4], labels: &[u32], at: StepAt) -> Result<(f64, usize)> {
        if x.len() != dims.iter().product::<usize>() || labels.len() != dims[0] {
            bail!("a batch of {} labels and {} values does not fit the shape {dims:?}", labels.len(), x.len());
        }
        let mut tape = Vec::new();
        let mut stats = Vec::new();
        let input = Act { values: Arc::new(x), dims, needs_grad: false };
        let mut times = self.times.take();
        let logits =
            forward(&self.arch, &self.arch.layers, self, input, Some(&mut tape), Some(&mut stats), times.as_mut());
        self.times = times;
        let logits = logits?;
        let classes = logits.dims[1] * logits.dims[2] * logits.dims[3];
        let mut grad = vec![0f32; logits.values.len()];
        let (loss, errors) = cross_entropy(&logits.values, labels, classes, Some(&mut grad));
        if !loss.is_finite() {
            return Ok((loss, errors));
        }
        self.backward(tape, grad)?;
        self.update(at);
        if let Some(t) = &mut self.times {
            t.steps += 1;
        }
        for (name, batch_mean, batch_var, count) in stats {
            self.update_running_stats(&name, &batch_mean, &batch_var, count)?;
        }
        Ok((loss, errors))
    }

    /// PyTorch's running statistics: an exponential average of the batch mean and the unbiased
    /// batch variance.
    fn update_running_stats(&mut self, name: &str, mean: &[f32], var: &[f32], count: usize) -> Result<()> {
        let unbiased = batchnorm::unbiased_factor(count) as f32;
        for (suffix, batch, factor) in [("running_mean", mean, 1.0f32), ("running_var", var, unbiased)] {
            let key = format!("{name}.{suffix}");
            let (running, _) = self.buffers.get_mut(&key).with_context(|| format!("tensor '{key}' is missing"))?;
            batchnorm::update_running_values(running, batch, factor);
        }
        Ok(())
    }

    /// Runs `tape` backwards from the gradient `dy` of its output; fills the gradients of the
    /// trained tensors it met and returns the gradient of its input (`None` where the input needs
    /// none).
    fn backward(&mut self, tape: Vec<Saved>, dy: Vec<f32>) -> Result<Option<Vec<f32>>> {
        let mut dy = Some(dy);
        for saved in tape.into_iter().rev() {
            let Some(g) = dy.take() else { break };
            let (started, layer_kind) = (Instant::now(), saved.kind());
            dy = match saved {
                Saved::Pad { pad, dims: [n, c, h, w] } => {
                    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
                    let mut out = vec![0f32; n * c * h * w];
                    for (dst, plane) in out.chunks_exact_mut(h * w).zip(g.chunks_exact(hp * wp)) {
                        for (dst, row) in dst.chunks_exact_mut(w).zip(plane.chunks_exact(wp).skip(pad)) {
                            dst.copy_from_slice(&row[pad..pad + w]);
                        }
                    }
                    Some(out)
                }
                Saved::Flatten => Some(g),
                Saved::Linear { name, x } => {
                    let [n, c, h, w] = x.dims;
                    let inputs = c * h * w;
                    let outputs = g.len() / n.max(1);
                    let weight = self.params.get_mut(&format!("{name}.weight")).context("linear weight")?;
                    // d weight [outputs, inputs] = gᵀ [outputs, n] · x [n, inputs]
                    matmul(
                        outputs,
                        inputs,
                        n,
                        &mut weight.grad,
                        inputs,
                        false,
                        &g,
                        (1, outputs),
                        &x.values,
                        (inputs, 1),
                    );
                    let dx = if x.needs_grad {
                        let mut dx = vec![0f32; n * inputs];
                        // dx [n, inputs] = g [n, outputs] · weight [outputs, inputs]
                        matmul(
                            n,
                            inputs,
                            outputs,
                            &mut dx,
                            inputs,
                            false,
                            &g,
                            (outputs, 1),
                            &weight.value,
                            (inputs, 1),
                        );
                        Some(dx)
                    } else {
                        None
                    };
                    let bias = self.params.get_mut(&format!("{name}.bias")).context("linear bias")?;
                    bias.grad.fill(0.0);
                    for row in g.chunks_exact(outputs) {
                        bias.grad.iter_mut().zip(row).for_each(|(b, v)| *b += v);
                    }
                    dx
                }
                Saved::Conv { name, geom, bias, x } => {
                    if bias {
                        let b = self.params.get_mut(&format!("{name}.bias")).context("conv bias")?;
                        b.grad = layers::channel_sum(&g, geom.n, geom.o, geom.ho * geom.wo);
                    }
                    let weight = self.params.get_mut(&format!("{name}.weight")).context("conv weight")?;
                    weight.grad = conv2d::grad_weight(&geom, &x.values, &g);
                    x.needs_grad.then(|| conv2d::grad_input(&geom, &g, &weight.value))
                }
                Saved::BatchNorm { name, relu, x, kept } => {
                    let [n, c, h, w] = x.dims;
                    let weight = self.value(&format!("{name}.weight"))?;
                    let (dx, dw, db) = norm::train_backward(&x.values, &g, (n, c, h * w), weight, &kept, BN_EPS, relu);
                    self.params.get_mut(&format!("{name}.weight")).context("BatchNorm weight")?.grad = dw;
                    self.params.get_mut(&format!("{name}.bias")).context("BatchNorm bias")?.grad = db;
                    x.needs_grad.then_some(dx)
                }
                Saved::Relu { y } => Some(layers::relu_grad_values(&y, &g)),
                Saved::MaxPool2 { dims: [n, c, h, w], needs_grad, at } => {
                    needs_grad.then(|| layers::max_pool2_grad_from(&at, &g, n * c, h, w))
                }
                Saved::GlobalAvgPool { dims: [n, c, h, w] } => {
                    let hw = h * w;
                    let mut out = vec![0f32; n * c * hw];
                    for (plane, &v) in out.chunks_exact_mut(hw).zip(&g) {
                        plane.fill(v / hw as f32);
                    }
                    Some(out)
                }
                Saved::Residual { main, shortcut, y } => {
                    let through = layers::relu_grad_values(&y, &g);
                    if let Some(t) = &mut self.times {
                        t.add(kind::RESIDUAL, "backward", started);
                    }
                    let from_main = self.backward(main, through.clone())?;
                    let from_short =
                        if shortcut.is_empty() { Some(through) } else { self.backward(shortcut, through)? };
                    let started = Instant::now();
                    let sum = match (from_main, from_short) {
                        (Some(mut a), Some(b)) => {
                            a.par_chunks_mut(VALUES_PER_TASK).zip(b.par_chunks(VALUES_PER_TASK)).for_each(|(a, b)| {
                                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                            });
                            Some(a)
                        }
                        (a, b) => a.or(b),
                    };
                    if let Some(t) = &mut self.times {
                        t.add(kind::RESIDUAL, "backward", started);
                    }
                    sum
                }
            };
            if let (Some(t), false) = (&mut self.times, layer_kind == kind::RESIDUAL) {
                t.add(layer_kind, "backward", started);
            }
        }
        Ok(dy)
    }

    /// The optimizer's update ([`crate::optim`]) of every trained tensor, in fixed pieces run in parallel.
    fn update(&mut self, at: StepAt) {
        let opt = self.optimizer.as_ref();
        for p in self.params.values_mut() {
            update_in_pieces(opt, at, &mut p.value, &mut p.buffers, &p.grad);
        }
    }
}

impl Weights for CnnTrainer {
    fn tensor(&self, name: &str) -> Result<&[f32]> {
        self.value(name)
    }
}

/// A convolutional network in evaluation mode on f32 buffers with layerlab's kernels: the
/// forward pass of [`CnnTrainer`] without its tape. Evaluation, the reset grid's prefix reuse
/// and BatchNorm recalibration run on it (chosen in [`crate::exec::choose`]), so that they
/// make no candle tensor per layer.
pub struct CnnForward<'a> {
    arch: &'a Architecture,
    weights: BTreeMap<String, Vec<f32>>,
}

/// A batch of activations between top-level layers (for prefix reuse).
#[derive(Clone)]
pub struct Activations {
    values: Arc<Vec<f32>>,
    dims: [usize; 4],
}

impl Activations {
    /// Input images [n, c, h, w] (f32, already scaled).
    pub fn input(x: Vec<f32>, dims: [usize; 4]) -> Result<Activations> {
        if x.len() != dims.iter().product::<usize>() {
            bail!("{} input values do not fit the shape {dims:?}", x.len());
        }
        Ok(Activations { values: Arc::new(x), dims })
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }
}

impl<'a> CnnForward<'a> {
    pub fn new(arch: &'a Architecture, state: &State) -> Result<CnnForward<'a>> {
        let weights = state_values(arch, state)
            .map(|entry| entry.map(|(spec, value)| (spec.name.clone(), value)))
            .collect::<Result<_>>()?;
        Ok(CnnForward { arch, weights })
    }

    /// Top-level layers `from..to` on `x` (the activations at layer `from`).
    pub fn run(&self, x: &Activations, from: usize, to: usize) -> Result<Activations> {
        let input = Act { values: x.values.clone(), dims: x.dims, needs_grad: false };
        let y = forward(self.arch, &self.arch.layers[from..to], &self.weights, input, None, None, None)?;
        Ok(Activations { values: y.values, dims: y.dims })
    }

    /// Mean cross-entropy and wrong predictions of the layers from `from` on `x`.
    pub fn loss_and_errors_from(&self, x: &Activations, labels: &[u32], from: usize) -> Result<(f64, usize)> {
        let logits = self.run(x, from, self.arch.layers.len())?;
        let [n, c, h, w] = logits.dims;
        if n != labels.len() {
            bail!("{} labels for a batch of {n}", labels.len());
        }
        Ok(cross_entropy(&logits.values, labels, c * h * w, None))
    }

    /// Recomputes the running statistics of every BatchNorm in layers `from..` as the mean over
    /// `batches` (the activations at layer `from`) of each batch's mean and unbiased variance
    /// (PyTorch's `momentum=None`), computed as `reset.rs`'s candle path does; returns the new
    /// statistics by state_dict name.
    pub fn recalibrate(&mut self, batches: &[Activations], from: usize) -> Result<Vec<(String, Vec<f32>)>> {
        let mut sums = batchnorm::CalibrationSums::default();
        for x in batches {
            let mut stats = Vec::new();
            let input = Act { values: x.values.clone(), dims: x.dims, needs_grad: false };
            forward(self.arch, &self.arch.layers[from..], &self.weights, input, None, Some(&mut stats), None)?;
            for (name, mean, var, count) in stats {
                let unbiased = batchnorm::unbiased_factor(count) as f32;
                let var = var.iter().map(|v| v * unbiased).collect();
                sums.add(format!("{name}.running_mean"), mean);
                sums.add(format!("{name}.running_var"), var);
            }
        }
        let updated = sums.means(batches.len());
        for (name, mean) in &updated {
            self.weights.insert(name.clone(), mean.clone());
        }
        Ok(updated)
    }
}

/// Runs `layers` of `arch` on `x`. With `stats`, BatchNorm normalises with the batch statistics
/// (training and recalibration) and pushes each layer's (name, batch mean, biased batch
/// variance, count) there; without, it uses the running statistics (evaluation). With `tape`,
/// it records what the backward pass needs.
fn forward(
    arch: &Architecture,
    layers: &[Layer],
    weights: &impl Weights,
    mut x: Act,
    mut tape: Option<&mut Vec<Saved>>,
    mut stats: Option<&mut Vec<BatchStats>>,
    mut times: Option<&mut LayerTimes>,
) -> Result<Act> {
    let mut i = 0;
    while i < layers.len() {
        let [n, c, h, w] = x.dims;
        let (started, layer_kind) = (Instant::now(), kind_of(&layers[i]));
        x = match &layers[i] {
            Layer::Pad(pad) => {
                let (hp, wp) = (h + 2 * pad, w + 2 * pad);
                let mut out = vec![0f32; n * c * hp * wp];
                layers::pad_planes(&mut out, &x.values, h, w, *pad);
                record(&mut tape, || Saved::Pad { pad: *pad, dims: x.dims });
                Act { values: Arc::new(out), dims: [n, c, hp, wp], needs_grad: x.needs_grad }
            }
            Layer::Flatten => {
                record(&mut tape, || Saved::Flatten);
                Act { values: x.values, dims: [n, c * h * w, 1, 1], needs_grad: x.needs_grad }
            }
            Layer::Linear { name } => {
                let weight = weights.tensor(&format!("{name}.weight"))?;
                let bias = weights.tensor(&format!("{name}.bias"))?;
                let (inputs, outputs) = (c * h * w, bias.len());
                if weight.len() != inputs * outputs {
                    bail!("{name}: {inputs} inputs do not fit its weight of {} values", weight.len());
                }
                let mut out: Vec<f32> = (0..n).flat_map(|_| bias.iter().copied()).collect();
                // out [n, outputs] += x [n, inputs] · weightᵀ [inputs, outputs]
                matmul(n, outputs, inputs, &mut out, outputs, true, &x.values, (inputs, 1), weight, (1, inputs));
                let y = Act { values: Arc::new(out), dims: [n, outputs, 1, 1], needs_grad: true };
                record(&mut tape, || Saved::Linear { name: name.clone(), x });
                y
            }
            Layer::Conv { name, stride, padding, bias } => {
                let weight_name = format!("{name}.weight");
                let weight = weights.tensor(&weight_name)?;
                let shape = &arch.spec(&weight_name).context("conv weight")?.shape;
                let geom = Geom::new(&x.dims, shape, *padding, *stride)?;
                let b = if *bias { Some(weights.tensor(&format!("{name}.bias"))?) } else { None };
                let out = conv2d::forward(&geom, &x.values, weight, b);
                let y = Act { values: Arc::new(out), dims: [n, geom.o, geom.ho, geom.wo], needs_grad: true };
                record(&mut tape, || Saved::Conv { name: name.clone(), geom, bias: *bias, x });
                y
            }
            Layer::BatchNorm { name } => {
                let relu = matches!(layers.get(i + 1), Some(Layer::Relu));
                let weight = weights.tensor(&format!("{name}.weight"))?;
                let bias = weights.tensor(&format!("{name}.bias"))?;
                let dims = x.dims;
                let out = match stats.as_deref_mut() {
                    Some(stats) => {
                        let (out, kept) = norm::train_forward(&x.values, (n, c, h * w), weight, bias, BN_EPS, relu);
                        let mean = kept.stats.iter().map(|s| s.0 as f32).collect();
                        let var = kept.stats.iter().map(|s| s.1 as f32).collect();
                        stats.push((name.clone(), mean, var, n * h * w));
                        record(&mut tape, || Saved::BatchNorm { name: name.clone(), relu, x, kept });
                        out
                    }
                    None => {
                        let mean = weights.tensor(&format!("{name}.running_mean"))?;
                        let var = weights.tensor(&format!("{name}.running_var"))?;
                        let (scale, shift) = norm::eval_factors(mean, var, weight, bias, BN_EPS);
                        norm::affine(&x.values, c, h * w, &scale, &shift, relu)
                    }
                };
                if relu {
                    i += 1;
                }
                Act { values: Arc::new(out), dims, needs_grad: true }
            }
            Layer::Relu => {
                let out = Arc::new(layers::relu_values(&x.values));
                record(&mut tape, || Saved::Relu { y: out.clone() });
                Act { values: out, dims: x.dims, needs_grad: x.needs_grad }
            }
            Layer::MaxPool2 => {
                let (out, at) = layers::max_pool2_with_argmax(&x.values, n * c, h, w);
                record(&mut tape, || Saved::MaxPool2 { dims: x.dims, needs_grad: x.needs_grad, at });
                Act { values: Arc::new(out), dims: [n, c, h / 2, w / 2], needs_grad: x.needs_grad }
            }
            Layer::GlobalAvgPool => {
                let hw = h * w;
                let out = x.values.chunks_exact(hw).map(|p| p.iter().sum::<f32>() / hw as f32).collect();
                record(&mut tape, || Saved::GlobalAvgPool { dims: x.dims });
                Act { values: Arc::new(out), dims: [n, c, 1, 1], needs_grad: x.needs_grad }
            }
            Layer::Residual { main, shortcut } => {
                let copy = Act { values: x.values.clone(), dims: x.dims, needs_grad: x.needs_grad };
                let (mut main_tape, mut short_tape) = (Vec::new(), Vec::new());
                let recording = tape.is_some();
                let into_main = recording.then_some(&mut main_tape);
                let m = forward(arch, main, weights, copy, into_main, stats.as_deref_mut(), times.as_deref_mut())?;
                let into_short = recording.then_some(&mut short_tape);
                let s = forward(arch, shortcut, weights, x, into_short, stats.as_deref_mut(), times.as_deref_mut())?;
                let started = Instant::now();
                if m.dims != s.dims {
                    bail!("a residual block's branches disagree: {:?} and {:?}", m.dims, s.dims);
                }
                // The main branch's output is this block's alone: summed in place.
                let mut out = Arc::try_unwrap(m.values).unwrap_or_else(|shared| (*shared).clone());
                out.par_chunks_mut(VALUES_PER_TASK).zip(s.values.par_chunks(VALUES_PER_TASK)).for_each(|(o, s)| {
                    for (o, s) in o.iter_mut().zip(s) {
                        *o = (*o + s).max(0.0);
                    }
                });
                let out = Arc::new(out);
                record(&mut tape, || Saved::Residual { main: main_tape, shortcut: short_tape, y: out.clone() });
                if let Some(t) = times.as_deref_mut() {
                    t.add(kind::RESIDUAL, "forward", started);
                }
                Act { values: out, dims: m.dims, needs_grad: true }
            }
        };
        if let (Some(t), false) = (times.as_deref_mut(), layer_kind == kind::RESIDUAL) {
            t.add(layer_kind, "forward", started);
        }
        i += 1;
    }
    Ok(x)
}

/// Pushes what `saved` makes onto the tape, when there is one.
fn record(tape: &mut Option<&mut Vec<Saved>>, saved: impl FnOnce() -> Saved) {
    if let Some(tape) = tape.as_deref_mut() {
        tape.push(saved());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{candle::Candle, Executor};
    use crate::model::push_scaled_pixels;
    use crate::optim::Sgd;
    use layerlab_pipeline::{Arch, ModelConfig};

    /// VGG needs 32×32 images (five 2×2 poolings); ResNet runs on 16×16 ones.
    fn size(a: Arch) -> usize {
        if a == Arch::Vgg11 {
            32
        } else {
            16
        }
    }

    fn arch(a: Arch, batch_norm: bool) -> Architecture {
        let cfg = ModelConfig { arch: a, width_mult: 0.125, batch_norm, ..ModelConfig::default() };
        Architecture::build(&cfg, [3, size(a), size(a)], 10).unwrap()
    }

    fn batch(seed: u64, n: usize, size: usize) -> (Vec<u8>, Vec<u32>) {
        let mut r = crate::random::rng(seed);
        let pixels = (0..n * 3 * size * size).map(|_| (crate::random::unit_f64(&mut r) * 255.0) as u8).collect();
        let labels = (0..n).map(|_| (crate::random::unit_f64(&mut r) * 10.0) as u32).collect();
        (pixels, labels)
    }

    fn sgd(nesterov: bool) -> Box<Sgd> {
        Box::new(Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov })
    }

    fn at(lr: f64) -> StepAt {
        StepAt { lr, number: 1 }
    }

    fn flat(s: &State) -> BTreeMap<String, Vec<f32>> {
        s.iter().map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
    }

    /// Three steps on both paths from the same weights: losses, errors, weights, running
    /// statistics and momentum agree to float rounding.
    #[test]
    fn matches_candle_autograd() {
        let dev = Device::Cpu;
        for (a, bn, nesterov) in [
            (Arch::Vgg11, true, false),
            (Arch::Vgg11, false, true),
            (Arch::Resnet18, true, false),
            (Arch::Resnet50, true, false),
        ] {
            let arch = if a == Arch::Resnet50 {
                let cfg = ModelConfig { arch: a, width_mult: 0.25, batch_norm: bn, ..ModelConfig::default() };
                Architecture::build(&cfg, [3, 16, 16], 10).unwrap()
            } else {
                arch(a, bn)
            };
            let state = arch.initial_state(3, &dev).unwrap();
            let mut ours = CnnTrainer::new(&arch, &state, sgd(nesterov), None).unwrap();
            let candle = Candle { arch: &arch, device: dev.clone(), kernels: Default::default() };
            let mut theirs = candle.trainer(&state, sgd(nesterov), None).unwrap();
            // ResNet-50 one step only: fifty layers of BatchNorm on batches this small amplify
            // rounding about a thousandfold a step (measured: a 1e-6 relative change of fc.weight
            // moved the loss after three steps of one path by 0.2 %), so later steps compare
            // noise, not the two paths.
            let steps = if a == Arch::Resnet50 { 1 } else { 3 };
            for step in 0..steps {
                let n = if a == Arch::Resnet50 { 32 } else { 12 };
                let (pixels, labels) = batch(10 + step, n, size(a));
                let mut x = Vec::new();
                push_scaled_pixels(&pixels, &mut x);
                let dims = [n, 3, size(a), size(a)];
                let (l1, e1) = ours.step(x, dims, &labels, at(0.05)).unwrap();
                let (l2, e2) = theirs.step(&pixels, dims, &labels, at(0.05)).unwrap();
                assert!((l1 - l2).abs() < 1e-4 * l2.abs().max(1.0), "{a:?} step {step}: loss {l1} vs {l2}");
                assert_eq!(e1, e2, "{a:?} step {step}: errors");
            }
            let (s1, s2) = (flat(&ours.state(&dev).unwrap()), flat(&theirs.state().unwrap()));
            let (m1, m2) = (flat(&ours.optimizer_state(&dev).unwrap()), flat(&theirs.optimizer_state().unwrap()));
            assert_eq!(s1.keys().collect::<Vec<_>>(), s2.keys().collect::<Vec<_>>());
            for (what, x, y) in [("weights", &s1, &s2), ("momentum", &m1, &m2)] {
                for (name, a_v) in x {
                    let b_v = &y[name];
                    // A convolution bias followed by BatchNorm gets a zero gradient up to rounding
                    // noise (about 1e-7 a step), hence the floor under the scale.
                    let scale = b_v.iter().fold(1e-2f32, |m, v| m.max(v.abs()));
                    let diff = a_v.iter().zip(b_v).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                    assert!(diff <= 2e-4 * scale, "{a:?}: {what} {name} differs by {diff} (scale {scale})");
                }
            }
            // The steps moved the weights: the comparison above is not between two initial states.
            let init = flat(&state);
            assert!(s1.iter().any(|(k, v)| v != &init[k]), "{a:?}: no weight changed");
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let arch = arch(Arch::Resnet18, true);
        let dev = Device::Cpu;
        let state = arch.initial_state(5, &dev).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut t = CnnTrainer::new(&arch, &state, sgd(true), None).unwrap();
                for step in 0..2 {
                    let (pixels, labels) = batch(20 + step, 9, 16);
                    let mut x = Vec::new();
                    push_scaled_pixels(&pixels, &mut x);
                    t.step(x, [9, 3, 16, 16], &labels, at(0.1)).unwrap();
                }
                (flat(&t.state(&dev).unwrap()), flat(&t.optimizer_state(&dev).unwrap()))
            })
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(run(threads) == one, "{threads} threads changed the result");
        }
    }

    #[test]
    fn resumes_from_its_own_state_and_momentum() {
        let arch = arch(Arch::Vgg11, true);
        let dev = Device::Cpu;
        let state = arch.initial_state(7, &dev).unwrap();
        let step = |t: &mut CnnTrainer, seed: u64| {
            let (pixels, labels) = batch(seed, 6, 32);
            let mut x = Vec::new();
            push_scaled_pixels(&pixels, &mut x);
            t.step(x, [6, 3, 32, 32], &labels, at(0.1)).unwrap();
        };
        let mut straight = CnnTrainer::new(&arch, &state, sgd(false), None).unwrap();
        step(&mut straight, 1);
        step(&mut straight, 2);
        let mut first = CnnTrainer::new(&arch, &state, sgd(false), None).unwrap();
        step(&mut first, 1);
        let (s, m) = (first.state(&dev).unwrap(), first.optimizer_state(&dev).unwrap());
        let mut resumed = CnnTrainer::new(&arch, &s, sgd(false), Some(&m)).unwrap();
        step(&mut resumed, 2);
        assert!(flat(&resumed.state(&dev).unwrap()) == flat(&straight.state(&dev).unwrap()));
    }

    /// Timing the layers changes no result, counts its steps, and finds each kind of layer of
    /// the network in both passes (a residual block's own sum once, its branches' layers as
    /// themselves).
    #[test]
    fn layer_times_cover_every_kind_of_layer_and_change_nothing() {
        let dev = Device::Cpu;
        for a in [Arch::Vgg11, Arch::Resnet18] {
            let arch = arch(a, true);
            let state = arch.initial_state(9, &dev).unwrap();
            let (mut plain, mut timed) = (
                CnnTrainer::new(&arch, &state, sgd(false), None).unwrap(),
                CnnTrainer::new(&arch, &state, sgd(false), None).unwrap(),
            );
            timed.time_layers();
            for step in 0..2 {
                for t in [&mut plain, &mut timed] {
                    let (pixels, labels) = batch(30 + step, 4, size(a));
                    let mut x = Vec::new();
                    push_scaled_pixels(&pixels, &mut x);
                    t.step(x, [4, 3, size(a), size(a)], &labels, at(0.1)).unwrap();
                }
            }
            assert!(flat(&plain.state(&dev).unwrap()) == flat(&timed.state(&dev).unwrap()), "{a:?}");
            assert!(plain.layer_times().is_none());
            let times = timed.layer_times().unwrap();
            assert_eq!(times.steps, 2);
            let mut kinds: Vec<&str> = times.seconds.keys().map(|(kind, _)| *kind).collect();
            kinds.dedup();
            let want: &[&str] = match a {
                Arch::Vgg11 => &[kind::BATCHNORM, kind::CONVOLUTION, kind::FLATTEN, kind::LINEAR, kind::MAX_POOL],
                _ => &[kind::BATCHNORM, kind::CONVOLUTION, kind::GLOBAL_AVG_POOL, kind::LINEAR, kind::RESIDUAL],
            };
            assert_eq!(kinds, want, "{a:?}");
            for kind in want {
                assert!(
                    times.seconds.contains_key(&(*kind, "forward")) && times.seconds.contains_key(&(*kind, "backward"))
                );
            }
        }
    }
}
