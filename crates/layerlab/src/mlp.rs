//! A fast path for fully connected networks (Flatten, then Linear layers with ReLU between them):
//! forward pass, backward pass and the SGD update written directly on f32 buffers with `gemm`.
//!
//! Why: for a 784-256-256-256-10 network at batch 128 a candle autograd step spends most of its
//! time outside the matrix products (a graph of ~40 small tensors, each allocated, filled and
//! freed every step). Here every buffer is allocated once, the bias and ReLU are fused into the
//! passes over the products' outputs, and the optimizer updates the weights in place. The maths is
//! the same as the general path (`model::Architecture::forward` + `loss.backward()` + the SGD of
//! `train.rs`); `tests::matches_candle_autograd` checks the two against each other.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::kernels::gemm::matmul;
use crate::kernels::loss::RowSoftmax;
use crate::model::{Architecture, Layer, State};
use crate::optim::{state_key, update_in_pieces, Optimizer, OptimizerState, StepAt};

/// One Linear layer of the plan.
#[derive(Debug, Clone)]
struct Dense {
    /// Index of its Linear among the architecture's top-level layers.
    layer_index: usize,
    name: String,
    inputs: usize,
    outputs: usize,
    relu: bool,
}

/// The layers of a network that the fast path can run, or `None` when it has other layers.
#[derive(Debug, Clone)]
pub struct MlpPlan {
    layers: Vec<Dense>,
}

impl MlpPlan {
    /// `Some` for `[Flatten,] Linear, Relu, …, Linear` networks.
    pub fn of(arch: &Architecture) -> Option<MlpPlan> {
        let mut layers: Vec<Dense> = Vec::new();
        let mut features: usize = arch.input.iter().product();
        for (i, layer) in arch.layers.iter().enumerate() {
            match layer {
                Layer::Flatten if i == 0 => {}
                Layer::Linear { name } => {
                    let spec = arch.spec(&format!("{name}.weight"))?;
                    let [outputs, inputs] = spec.shape[..] else { return None };
                    if inputs != features {
                        return None;
                    }
                    layers.push(Dense { layer_index: i, name: name.clone(), inputs, outputs, relu: false });
                    features = outputs;
                }
                Layer::Relu => {
                    let last = layers.last_mut()?;
                    if last.relu {
                        return None;
                    }
                    last.relu = true;
                }
                Layer::Flatten
                | Layer::Pad(_)
                | Layer::Conv { .. }
                | Layer::BatchNorm { .. }
                | Layer::MaxPool2
                | Layer::GlobalAvgPool
                | Layer::Residual { .. } => return None,
            }
        }
        let last = layers.last()?;
        (!last.relu && last.outputs == arch.classes).then_some(MlpPlan { layers })
    }

    /// How many dense layers lie before top-level layer `layer` (where prefix reuse starts).
    pub fn dense_before(&self, layer: usize) -> usize {
        self.layers.iter().filter(|d| d.layer_index < layer).count()
    }

    fn inputs(&self) -> usize {
        self.layers[0].inputs
    }
    fn classes(&self) -> usize {
        self.layers.last().expect("a plan has layers").outputs
    }
}

/// Weights of one layer, row-major like PyTorch: weight [outputs, inputs], bias [outputs].
#[derive(Debug, Clone, Default)]
struct Params {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Params {
    fn zeros(d: &Dense) -> Params {
        Params { weight: vec![0.0; d.outputs * d.inputs], bias: vec![0.0; d.outputs] }
    }
    fn from_state(d: &Dense, state: &State, what: &str) -> Result<Params> {
        Params::from_state_named(d, state, what, |t| t.to_string())
    }
    /// From the tensors `key(tensor name)` of `state`.
    fn from_state_named(d: &Dense, state: &State, what: &str, key: impl Fn(&str) -> String) -> Result<Params> {
        let read = |suffix: &str, len: usize| -> Result<Vec<f32>> {
            let name = key(&format!("{}.{suffix}", d.name));
            let t = state.get(&name).with_context(|| format!("{what} lacks tensor '{name}'"))?;
            let v = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
            if v.len() != len {
                bail!("{what}: tensor '{name}' has {} values, expected {len}", v.len());
            }
            Ok(v)
        };
        Ok(Params { weight: read("weight", d.outputs * d.inputs)?, bias: read("bias", d.outputs)? })
    }
    fn insert_into(&self, d: &Dense, state: &mut State, device: &Device) -> Result<()> {
        let w = Tensor::from_slice(&self.weight, (d.outputs, d.inputs), device)?;
        let b = Tensor::from_slice(&self.bias, d.outputs, device)?;
        state.insert(format!("{}.weight", d.name), w);
        state.insert(format!("{}.bias", d.name), b);
        Ok(())
    }
}

/// Rows of an output handed to one task of the passes that write it.
const ROWS_PER_TASK: usize = 32;

/// [`matmul`] (row-major `dst`) with the output's rows split into tasks of [`ROWS_PER_TASK`] run on
/// rayon's threads. The split is the same whatever the number of threads, so every value is
/// computed by the same call in the same order: results do not depend on the thread count.
/// (Letting gemm split the work itself was slower at these sizes, and its split depends on the
/// thread count.)
fn matmul_rows(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    dst[..m * n].par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, dst)| {
        let first = task * ROWS_PER_TASK;
        let rows = dst.len() / n;
        matmul(rows, n, k, dst, n, accumulate, &lhs[first * lhs_rs..], (lhs_rs, lhs_cs), rhs, rhs_strides);
    });
}

/// Output columns of a product handed to one task.
///
/// Why columns, not rows: `gemm` packs its right-hand operand (a layer's weight, or the batch's
/// inputs) into panels on every call. Split by rows of the output, each task packed the whole
/// weight again (fc1's is 800 KB) for 32 rows of work; split by columns, each task packs only its
/// own columns, once. Measured on the 784-256-256-256-10 network at batch 128, 2 threads: the
/// forward pass 0.47 against 0.70 ms a step.
const COLUMNS_PER_TASK: usize = 64;

/// Matrix products whose output columns are split into fixed blocks of [`COLUMNS_PER_TASK`], each
/// computed by one task (single-threaded `gemm`) into a buffer of its own, kept between steps.
/// The split depends on the shapes only, so every value is computed by the same call in the same
/// order whatever the number of threads.
#[derive(Debug, Default)]
struct ColumnBlocks {
    blocks: Vec<Vec<f32>>,
    /// Columns of the last product.
    n: usize,
}

impl ColumnBlocks {
    /// Block j = `lhs` [m × k] · columns `j·C..` of `rhs` [k × n], row-major [m × its width].
    fn product(
        &mut self,
        (m, n, k): (usize, usize, usize),
        lhs: &[f32],
        lhs_strides: (usize, usize),
        rhs: &[f32],
        (rhs_rs, rhs_cs): (usize, usize),
    ) -> &Self {
        let count = n.div_ceil(COLUMNS_PER_TASK);
        if self.blocks.len() < count {
            self.blocks.resize_with(count, Vec::new);
        }
        self.n = n;
        self.blocks[..count].par_iter_mut().enumerate().for_each(|(j, block)| {
            let first = j * COLUMNS_PER_TASK;
            let width = COLUMNS_PER_TASK.min(n - first);
            block.resize(m * width, 0.0);
            matmul(m, width, k, block, width, false, lhs, lhs_strides, &rhs[first * rhs_cs..], (rhs_rs, rhs_cs));
        });
        self
    }

    /// Writes the last product into `dst` [m × n] (row-major) through `write(row, first column,
    /// dst piece, product piece)`, in tasks of [`ROWS_PER_TASK`] rows.
    fn write_into(&self, dst: &mut [f32], m: usize, write: impl Fn(usize, usize, &mut [f32], &[f32]) + Sync) {
        let n = self.n;
        dst[..m * n].par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, rows)| {
            for (i, row) in rows.chunks_exact_mut(n).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                for (j, block) in self.blocks[..n.div_ceil(COLUMNS_PER_TASK)].iter().enumerate() {
                    let first = j * COLUMNS_PER_TASK;
                    let width = COLUMNS_PER_TASK.min(n - first);
                    write(r, first, &mut row[first..first + width], &block[r * width..][..width]);
                }
            }
        });
    }
}

/// Forward pass of one layer: `out[b, o] = act(Σ_i x[b, i] · w[o, i] + bias[o])`.
fn dense_forward(d: &Dense, p: &Params, x: &[f32], batch: usize, products: &mut ColumnBlocks, out: &mut [f32]) {
    // x [batch × inputs] · wᵀ [inputs × outputs]
    let y = products.product((batch, d.outputs, d.inputs), x, (d.inputs, 1), &p.weight, (1, d.inputs));
    y.write_into(out, batch, |_, first, out, y| {
        let bias = &p.bias[first..first + out.len()];
        if d.relu {
            out.iter_mut().zip(y).zip(bias).for_each(|((o, y), b)| *o = (y + b).max(0.0));
        } else {
            out.iter_mut().zip(y).zip(bias).for_each(|((o, y), b)| *o = y + b);
        }
    });
}

/// Softmax cross-entropy over a batch of logits: the mean loss, the number of wrong argmax
/// predictions, and (when `grad` is given) d(mean loss)/d(logits).
pub(crate) fn cross_entropy(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    mut grad: Option<&mut [f32]>,
) -> (f64, usize) {
    let batch = labels.len();
    let mut loss = 0.0f64;
    let mut errors = 0;
    for (b, (row, &label)) in logits.chunks_exact(classes).zip(labels).enumerate() {
        let label = label as usize;
        let softmax = RowSoftmax::of(row);
        errors += usize::from(softmax.best != label);
        loss += f64::from(softmax.loss(row, label));
        if let Some(g) = grad.as_deref_mut() {
            softmax.grad(row, label, 1.0 / batch as f32, &mut g[b * classes..(b + 1) * classes]);
        }
    }
    (loss / batch.max(1) as f64, errors)
}

/// Mean loss and errors of a batch [batch × inputs] (f32, already scaled), in evaluation.
pub struct MlpForward {
    plan: MlpPlan,
    params: Vec<Params>,
    scratch: [Vec<f32>; 2],
    products: ColumnBlocks,
}

impl MlpForward {
    pub fn new(plan: &MlpPlan, state: &State) -> Result<MlpForward> {
        let params = plan.layers.iter().map(|d| Params::from_state(d, state, "the weights")).collect::<Result<_>>()?;
        Ok(MlpForward {
            plan: plan.clone(),
            params,
            scratch: [Vec::new(), Vec::new()],
            products: ColumnBlocks::default(),
        })
    }

    /// Logits of a batch, in a buffer owned by `self`.
    pub fn logits(&mut self, x: &[f32], batch: usize) -> &[f32] {
        self.run(x, batch, 0, self.plan.layers.len())
    }

    /// Runs dense layers `from..to` on `x` (the activations entering layer `from`, [batch × its
    /// inputs]) and returns their output, in a buffer owned by `self`.
    pub fn run(&mut self, x: &[f32], batch: usize, from: usize, to: usize) -> &[f32] {
        let widest = self.plan.layers.iter().map(|d| d.outputs).max().unwrap_or(0);
        for s in &mut self.scratch {
            s.resize(batch * widest.max(x.len() / batch.max(1)), 0.0);
        }
        if from >= to {
            // Nothing to run: the activations are the output (the baseline's logits, say).
            self.scratch[0][..x.len()].copy_from_slice(x);
            return &self.scratch[0][..x.len()];
        }
        let [a, b] = &mut self.scratch;
        let (mut input, mut output): (&mut Vec<f32>, &mut Vec<f32>) = (a, b);
        for i in from..to {
            let d = &self.plan.layers[i];
            let x_in: &[f32] = if i == from { x } else { &input[..batch * d.inputs] };
            dense_forward(d, &self.params[i], x_in, batch, &mut self.products, output);
            std::mem::swap(&mut input, &mut output);
        }
        &input[..batch * self.plan.layers[to - 1].outputs]
    }

    /// (mean loss, errors) of a batch.
    pub fn loss_and_errors(&mut self, x: &[f32], labels: &[u32]) -> (f64, usize) {
        self.loss_and_errors_from(x, labels, 0)
    }

    /// (mean loss, errors) of a batch whose activations entering dense layer `from` are `x`.
    pub fn loss_and_errors_from(&mut self, x: &[f32], labels: &[u32], from: usize) -> (f64, usize) {
        let classes = self.plan.classes();
        let logits = self.run(x, labels.len(), from, self.plan.layers.len());
        cross_entropy(logits, labels, classes, None)
    }
}

/// The optimizer's buffers of one layer's weight and of its bias, each in the order of
/// [`Optimizer::buffers`].
type LayerBuffers = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Training state of the fast path: weights, the optimizer and its buffers, gradients and
/// activations, all allocated once.
pub struct MlpTrainer {
    plan: MlpPlan,
    params: Vec<Params>,
    optimizer: Box<dyn Optimizer>,
    /// Per layer, the optimizer's buffers of its weight and of its bias.
    buffers: Vec<LayerBuffers>,
    grads: Vec<Params>,
    /// Output of every layer (after its ReLU), [batch × outputs].
    activations: Vec<Vec<f32>>,
    /// d loss / d (layer output) for the layer being differentiated and the one below.
    delta: [Vec<f32>; 2],
    products: ColumnBlocks,
}

impl MlpTrainer {
    /// From a state, with `optimizer` (and, when resuming, its buffers by
    /// [`crate::optim::state_key`]).
    pub fn new(
        plan: &MlpPlan,
        state: &State,
        optimizer: Box<dyn Optimizer>,
        resumed: Option<&OptimizerState>,
    ) -> Result<MlpTrainer> {
        let params: Vec<Params> =
            plan.layers.iter().map(|d| Params::from_state(d, state, "the weights")).collect::<Result<_>>()?;
        let mut buffers = Vec::with_capacity(plan.layers.len());
        for d in &plan.layers {
            let mut of_layer = (Vec::new(), Vec::new());
            for buffer in optimizer.buffers() {
                let p = match resumed {
                    Some(r) => {
                        Params::from_state_named(d, r, "the resume file's optimizer state", |t| state_key(buffer, t))?
                    }
                    None => Params::zeros(d),
                };
                of_layer.0.push(p.weight);
                of_layer.1.push(p.bias);
            }
            buffers.push(of_layer);
        }
        let grads = plan.layers.iter().map(Params::zeros).collect();
        Ok(MlpTrainer {
            plan: plan.clone(),
            params,
            optimizer,
            buffers,
            grads,
            activations: vec![Vec::new(); plan.layers.len()],
            delta: [Vec::new(), Vec::new()],
            products: ColumnBlocks::default(),
        })
    }

    /// The weights as tensors by state_dict name.
    pub fn state(&self, device: &Device) -> Result<State> {
        let mut s = State::new();
        for (d, p) in self.plan.layers.iter().zip(&self.params) {
            p.insert_into(d, &mut s, device)?;
        }
        Ok(s)
    }

    /// The optimizer's buffers as tensors by [`crate::optim::state_key`].
    pub fn optimizer_state(&self, device: &Device) -> Result<OptimizerState> {
        let mut s = OptimizerState::new();
        for (d, (weight, bias)) in self.plan.layers.iter().zip(&self.buffers) {
            for ((buffer, w), b) in self.optimizer.buffers().iter().zip(weight).zip(bias) {
                s.insert(
                    state_key(buffer, &format!("{}.weight", d.name)),
                    Tensor::from_slice(w, (d.outputs, d.inputs), device)?,
                );
                s.insert(state_key(buffer, &format!("{}.bias", d.name)), Tensor::from_slice(b, d.outputs, device)?);
            }
        }
        Ok(s)
    }

    /// One SGD step on a batch [batch × inputs] (f32, already scaled); returns the batch's mean
    /// loss and errors before the update.
    pub fn step(&mut self, x: &[f32], labels: &[u32], at: StepAt) -> Result<(f64, usize)> {
        let batch = labels.len();
        if x.len() != batch * self.plan.inputs() {
            bail!("a batch of {batch} examples has {} input values, expected {}", x.len(), batch * self.plan.inputs());
        }
        let n_layers = self.plan.layers.len();
        for (d, a) in self.plan.layers.iter().zip(&mut self.activations) {
            a.resize(batch * d.outputs, 0.0);
        }
        for i in 0..n_layers {
            let (below, rest) = self.activations.split_at_mut(i);
            let x_in: &[f32] = if i == 0 { x } else { &below[i - 1] };
            dense_forward(&self.plan.layers[i], &self.params[i], x_in, batch, &mut self.products, &mut rest[0]);
        }
        let classes = self.plan.classes();
        let [delta, delta_below] = &mut self.delta;
        let widest = self.plan.layers.iter().map(|d| d.outputs.max(d.inputs)).max().unwrap_or(0);
        delta.resize(batch * widest, 0.0);
        delta_below.resize(batch * widest, 0.0);
        let (loss, errors) =
            cross_entropy(&self.activations[n_layers - 1], labels, classes, Some(&mut delta[..batch * classes]));

        for i in (0..n_layers).rev() {
            let d = &self.plan.layers[i];
            let x_in: &[f32] = if i == 0 { x } else { &self.activations[i - 1] };
            let dz = &delta[..batch * d.outputs];
            let g = &mut self.grads[i];
            // dW [outputs × inputs] = dzᵀ [outputs × batch] · x [batch × inputs]
            // (Split by rows: here the rows' operand is the small one, dzᵀ.)
            matmul_rows((d.outputs, d.inputs, batch), &mut g.weight, false, dz, (1, d.outputs), x_in, (d.inputs, 1));
            g.bias.fill(0.0);
            for row in dz.chunks_exact(d.outputs) {
                for (gb, &v) in g.bias.iter_mut().zip(row) {
                    *gb += v;
                }
            }
            if i > 0 {
                // dx [batch × inputs] = dz [batch × outputs] · W [outputs × inputs], then through
                // the ReLU below (its output is positive exactly where its input was).
                let dx = &mut delta_below[..batch * d.inputs];
                let w = &self.params[i].weight;
                let products =
                    self.products.product((batch, d.inputs, d.outputs), dz, (d.outputs, 1), w, (d.inputs, 1));
                let below = &self.activations[i - 1];
                if self.plan.layers[i - 1].relu {
                    products.write_into(dx, batch, |r, first, dx, v| {
                        let a = &below[r * d.inputs + first..][..dx.len()];
                        // A select, not a branch: the signs of activations are as good as random.
                        dx.iter_mut().zip(v).zip(a).for_each(|((g, &v), &a)| *g = if a > 0.0 { v } else { 0.0 });
                    });
                } else {
                    products.write_into(dx, batch, |_, _, dx, v| dx.copy_from_slice(v));
                }
                std::mem::swap(delta, delta_below);
            }
        }
        self.update(at);
        Ok((loss, errors))
    }

    /// The optimizer's update ([`crate::optim`]) of every tensor, in fixed pieces run in parallel.
    fn update(&mut self, at: StepAt) {
        let opt = self.optimizer.as_ref();
        for ((p, (weight, bias)), g) in self.params.iter_mut().zip(&mut self.buffers).zip(&self.grads) {
            update_in_pieces(opt, at, &mut p.weight, weight, &g.weight);
            update_in_pieces(opt, at, &mut p.bias, bias, &g.bias);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::KernelOptions;
    use crate::model::{images_to_tensor, loss_and_errors, BnMode};
    use std::collections::BTreeMap;

    use crate::optim::Sgd;
    use candle_core::Var;
    use layerlab_pipeline::ModelConfig;

    fn fcn(depth: u32, width: u32) -> Architecture {
        let cfg = ModelConfig { arch: layerlab_pipeline::Arch::Fcn, depth, width, ..ModelConfig::default() };
        Architecture::build(&cfg, [1, 4, 4], 3).unwrap()
    }

    fn sgd(nesterov: bool, weight_decay: f64) -> Sgd {
        Sgd { momentum: 0.9, nesterov, weight_decay }
    }

    #[test]
    fn plans_only_fully_connected_networks() {
        let p = MlpPlan::of(&fcn(2, 5)).expect("an FCN has a plan");
        let shapes: Vec<_> = p.layers.iter().map(|d| (d.inputs, d.outputs, d.relu)).collect();
        assert_eq!(shapes, [(16, 5, true), (5, 5, true), (5, 3, false)]);
        let vgg = ModelConfig { arch: layerlab_pipeline::Arch::Vgg11, width_mult: 0.125, ..ModelConfig::default() };
        assert!(MlpPlan::of(&Architecture::build(&vgg, [3, 32, 32], 10).unwrap()).is_none());
    }

    /// Three SGD steps of the fast path against candle autograd with the same maths: narrow layers,
    /// and layers wider than one task's columns (`COLUMNS_PER_TASK`) with a batch that leaves a
    /// partial task of rows.
    #[test]
    fn matches_candle_autograd() {
        let dev = Device::Cpu;
        for (width, nesterov, wd, batch) in [(7, false, 0.0, 6), (7, true, 5e-3, 6), (100, true, 5e-3, 37)] {
            let arch = fcn(2, width);
            let plan = MlpPlan::of(&arch).unwrap();
            let sgd = sgd(nesterov, wd);
            let state = arch.initial_state(3, &dev).unwrap();
            let mut fast = MlpTrainer::new(&plan, &state, Box::new(sgd), None).unwrap();
            let vars: BTreeMap<String, Var> =
                state.iter().map(|(k, v)| (k.clone(), Var::from_tensor(v).unwrap())).collect();
            let mut momentum: BTreeMap<String, Tensor> =
                state.iter().map(|(k, v)| (k.clone(), v.zeros_like().unwrap())).collect();
            for step in 0..3u32 {
                let pixels: Vec<u8> = (0..batch * 16).map(|i| ((i as u32 * 37 + step * 11) % 256) as u8).collect();
                let labels: Vec<u32> = (0..batch as u32).map(|i| (i + step) % 3).collect();
                let x = images_to_tensor(&pixels, [batch, 1, 4, 4], &dev).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let at = StepAt { lr: 0.1, number: step as u64 + 1 };
                let (fast_loss, fast_errors) = fast.step(&xs, &labels, at).unwrap();

                let current: State = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
                let logits = arch.forward(&current, &x, BnMode::Eval, &KernelOptions::default()).unwrap();
                let y = Tensor::from_vec(labels.clone(), batch, &dev).unwrap();
                let (loss, errors) = loss_and_errors(&logits, &y).unwrap();
                let grads = loss.backward().unwrap();
                assert!((loss.to_scalar::<f32>().unwrap() as f64 - fast_loss).abs() < 1e-5);
                assert_eq!(errors, fast_errors);
                // The autograd path's SGD on candle's gradients.
                for (name, var) in &vars {
                    let g = grads.get(var.as_tensor()).unwrap();
                    let (p, b) = sgd.update_tensors(at, var.as_tensor(), &[momentum[name].clone()], g).unwrap();
                    var.set(&p).unwrap();
                    momentum.insert(name.clone(), b[0].clone());
                }
            }
            let got = fast.state(&dev).unwrap();
            let got_m = fast.optimizer_state(&dev).unwrap();
            for (name, var) in &vars {
                let diff = |a: &Tensor, b: &Tensor| {
                    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
                };
                assert!(diff(&got[name], var.as_tensor()) < 1e-5, "{name} differs");
                let m = &got_m[&state_key(Sgd::MOMENTUM, name)];
                assert!(diff(m, &momentum[name]) < 1e-5, "momentum of {name} differs");
            }
        }
    }

    /// Tasks are cut by the shapes alone: the weights after a few steps have the same bits on any
    /// number of threads.
    #[test]
    fn training_does_not_depend_on_the_thread_count() {
        let arch = fcn(2, 100);
        let plan = MlpPlan::of(&arch).unwrap();
        let state = arch.initial_state(5, &Device::Cpu).unwrap();
        let batch = 37;
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut t = MlpTrainer::new(&plan, &state, Box::new(sgd(true, 1e-3)), None).unwrap();
                for step in 0..3u32 {
                    let x: Vec<f32> =
                        (0..batch * 16).map(|i| ((i as u32 * 29 + step * 7) % 97) as f32 / 97.0).collect();
                    let labels: Vec<u32> = (0..batch as u32).map(|i| (i * 3 + step) % 3).collect();
                    t.step(&x, &labels, StepAt { lr: 0.05, number: step as u64 + 1 }).unwrap();
                }
                let s = t.state(&Device::Cpu).unwrap();
                s.values()
                    .flat_map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .map(f32::to_bits)
                    .collect::<Vec<_>>()
            })
        };
        let one = on(1);
        for threads in [2, 3] {
            assert!(on(threads) == one, "{threads} threads changed the weights");
        }
    }

    #[test]
    fn forward_matches_candle() {
        let dev = Device::Cpu;
        // The second network's layers span two tasks' columns, the last one partial.
        for (depth, width, batch) in [(3, 9, 5), (2, 100, 37)] {
            let arch = fcn(depth, width);
            let state = arch.initial_state(1, &dev).unwrap();
            let pixels: Vec<u8> = (0..batch * 16).map(|i| (i * 53 % 256) as u8).collect();
            let x = images_to_tensor(&pixels, [batch, 1, 4, 4], &dev).unwrap();
            let want = arch
                .forward(&state, &x, BnMode::Eval, &KernelOptions::default())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut fwd = MlpForward::new(&MlpPlan::of(&arch).unwrap(), &state).unwrap();
            let got = fwd.logits(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), batch).to_vec();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "width {width}: {a} vs {b}");
            }
        }
    }
}
