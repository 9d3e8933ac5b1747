//! Network definitions (FCN, VGG, ResNet) as layer lists, their units, and the forward pass.
//!
//! A network is plain data: a list of [`Layer`]s naming the tensors they read, and the list of
//! [`Unit`]s (the study's "layers") that own those tensors. Weights live outside, in a [`State`]
//! (name → tensor, PyTorch state_dict names and layouts), so that the same forward pass serves
//! training (tensors of `Var`s), evaluation and resets (plain tensors swapped by name).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::backward::{self, Extra, Saved};
use crate::init::{self, Init};
use crate::kernels::{layers, norm, KeptOp3};
use crate::random;
use layerlab_pipeline::{Arch, ModelConfig, WeightInit};

/// Weights and buffers by state_dict name.
pub type State = BTreeMap<String, Tensor>;

/// One step of the forward pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Layer {
    /// Zero padding on every side of H and W.
    Pad(usize),
    Flatten,
    /// `{name}.weight` [out, in] and `{name}.bias` [out].
    Linear {
        name: String,
    },
    /// `{name}.weight` [out, in, k, k] (and `{name}.bias` when `bias`).
    Conv {
        name: String,
        stride: usize,
        padding: usize,
        bias: bool,
    },
    /// `{name}.weight`, `.bias`, `.running_mean`, `.running_var` [channels].
    BatchNorm {
        name: String,
    },
    Relu,
    MaxPool2,
    GlobalAvgPool,
    /// relu(main(x) + shortcut(x)); an empty shortcut is the identity.
    Residual {
        main: Vec<Layer>,
        shortcut: Vec<Layer>,
    },
}

impl Layer {
    /// What error messages call the layer: its tensors' name, or its kind.
    pub fn label(&self) -> String {
        match self {
            Layer::Linear { name } | Layer::Conv { name, .. } | Layer::BatchNorm { name } => name.clone(),
            Layer::Pad(p) => format!("pad {p}"),
            Layer::Flatten => "flatten".into(),
            Layer::Relu => "relu".into(),
            Layer::MaxPool2 => "max-pool".into(),
            Layer::GlobalAvgPool => "global average pool".into(),
            Layer::Residual { main, .. } => {
                format!("residual block from {}", main.first().map_or_else(|| "its input".into(), Layer::label))
            }
        }
    }
}

/// How one tensor of a unit is shaped and drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Trained by the optimizer (BatchNorm running statistics are not).
    pub trainable: bool,
}

/// A unit: one Linear or Conv with its bias and the BatchNorm that directly follows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// Position from the input, from 0.
    pub index: usize,
    pub name: String,
    /// `linear` or `conv`.
    pub kind: &'static str,
    /// Index of the top-level layer where this unit's computation starts: the activations
    /// entering that layer do not depend on this unit (prefix reuse).
    pub entry_layer: usize,
    pub tensors: Vec<TensorSpec>,
}

impl Unit {
    /// Number of trainable values.
    pub fn params(&self) -> usize {
        self.tensors.iter().filter(|t| t.trainable).map(|t| t.shape.iter().product::<usize>()).sum()
    }
    pub fn has_batch_norm(&self) -> bool {
        self.tensors.iter().any(|t| t.name.ends_with(".running_mean"))
    }
    /// Fresh values for every tensor of the unit, from its initial distributions and one stream
    /// seeded with `seed` (see [`random::init_seed`] and [`random::rerandomize_seed`]).
    pub fn draw(&self, seed: u64, device: &Device) -> Result<State> {
        let mut r = random::rng(seed);
        let mut out = State::new();
        for spec in &self.tensors {
            let n = spec.shape.iter().product();
            let values = init::draw(spec.init, n, &mut r);
            out.insert(spec.name.clone(), Tensor::from_vec(values, spec.shape.clone(), device)?);
        }
        Ok(out)
    }
}

/// A complete network description.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    /// E.g. `fcn-3x256`, `vgg11-bn-w0.25`.
    pub name: String,
    pub layers: Vec<Layer>,
    pub units: Vec<Unit>,
    /// Input [channels, height, width] before any padding.
    pub input: [usize; 3],
    pub classes: usize,
}

impl Architecture {
    /// Builds the network a model config asks for, for inputs of the given shape.
    pub fn build(cfg: &ModelConfig, input: [usize; 3], classes: usize) -> Result<Architecture> {
        let mut b = Builder::new(cfg, input, classes);
        match cfg.arch {
            Arch::Fcn => b.fcn(cfg.depth as usize, cfg.width as usize),
            Arch::Vgg11 => b.vgg(&[1, 0, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0], cfg.batch_norm)?,
            Arch::Vgg13 => b.vgg(&[1, 1, 0, 2, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0], cfg.batch_norm)?,
            Arch::Vgg16 => b.vgg(&[1, 1, 0, 2, 2, 0, 4, 4, 4, 0, 8, 8, 8, 0, 8, 8, 8, 0], cfg.batch_norm)?,
            Arch::Vgg19 => b.vgg(&[1, 1, 0, 2, 2, 0, 4, 4, 4, 4, 0, 8, 8, 8, 8, 0, 8, 8, 8, 8, 0], cfg.batch_norm)?,
            Arch::Resnet18 => b.resnet(&[2, 2, 2, 2])?,
            Arch::Resnet34 => b.resnet(&[3, 4, 6, 3])?,
        }
        Ok(b.finish())
    }

    /// The initial weights of the whole network for a training seed.
    pub fn initial_state(&self, training_seed: u64, device: &Device) -> Result<State> {
        let mut state = State::new();
        for unit in &self.units {
            state.extend(unit.draw(random::init_seed(training_seed, &unit.name), device)?);
        }
        Ok(state)
    }

    pub fn unit(&self, name: &str) -> Result<&Unit> {
        self.units.iter().find(|u| u.name == name).with_context(|| {
            let names: Vec<_> = self.units.iter().map(|u| u.name.as_str()).collect();
            format!("no unit named '{name}' in {} (units: {})", self.name, names.join(", "))
        })
    }

    /// Every tensor of the network, in unit order.
    pub fn tensor_specs(&self) -> impl Iterator<Item = (&Unit, &TensorSpec)> {
        self.units.iter().flat_map(|u| u.tensors.iter().map(move |t| (u, t)))
    }

    pub fn spec(&self, tensor: &str) -> Option<&TensorSpec> {
        self.tensor_specs().map(|(_, t)| t).find(|t| t.name == tensor)
    }

    pub fn has_batch_norm(&self) -> bool {
        self.units.iter().any(Unit::has_batch_norm)
    }

    /// Checks that a state holds exactly this network's tensors with the right shapes.
    pub fn check_state(&self, state: &State) -> Result<()> {
        for (_, spec) in self.tensor_specs() {
            let t = state.get(&spec.name).with_context(|| format!("tensor '{}' is missing", spec.name))?;
            if t.dims() != spec.shape.as_slice() {
                bail!("tensor '{}' has shape {:?}, expected {:?}", spec.name, t.dims(), spec.shape);
            }
        }
        if let Some(extra) = state.keys().find(|k| self.spec(k).is_none()) {
            bail!("tensor '{extra}' does not belong to {}", self.name);
        }
        Ok(())
    }

    /// Logits for a batch of inputs [n, c, h, w] (f32, already scaled).
    pub fn forward(&self, state: &State, x: &Tensor, bn: BnMode<'_>) -> Result<Tensor> {
        self.forward_range(state, x, 0, self.layers.len(), bn)
    }

    /// `state` with every BatchNorm's evaluation-mode factors (a scale and a shift per channel,
    /// from its running statistics) added, for many forward passes in `BnMode::Eval`: the same
    /// values each pass would compute, so the same outputs, without a few small ops per layer and
    /// batch (kernel launches, on a GPU). Evaluation and the reset grid prepare each state once.
    pub fn for_evaluation(&self, state: &State) -> Result<State> {
        fn batch_norms<'l>(layers: &'l [Layer], out: &mut Vec<&'l str>) {
            for layer in layers {
                match layer {
                    Layer::BatchNorm { name } => out.push(name),
                    Layer::Residual { main, shortcut } => {
                        batch_norms(main, out);
                        batch_norms(shortcut, out);
                    }
                    _ => {}
                }
            }
        }
        let mut names = Vec::new();
        batch_norms(&self.layers, &mut names);
        let mut prepared = state.clone();
        for name in names {
            let (scale, shift) = eval_factors(state, name)?;
            prepared.insert(format!("{name}{EVAL_SCALE}"), scale);
            prepared.insert(format!("{name}{EVAL_SHIFT}"), shift);
        }
        Ok(prepared)
    }

    /// Runs top-level layers `from .. to` only (prefix reuse feeds a cached activation at `from`).
    pub fn forward_range(
        &self,
        state: &State,
        x: &Tensor,
        from: usize,
        to: usize,
        mut bn: BnMode<'_>,
    ) -> Result<Tensor> {
        apply_all(&self.layers[from..to], state, x, &mut bn, None)
    }

    /// One training step's forward and backward pass without candle's autograd graph (see
    /// [`crate::backward`]): the mean loss and the number of right predictions (f32 scalars left
    /// on the device) and every trainable tensor's gradient, by name. The updated running
    /// statistics are pushed to `bn_updates`, as [`BnMode::Train`] does. `state` holds plain
    /// tensors (not `Var`s: nothing builds a graph); `upstream` is the loss op's output gradient,
    /// [1, 0] as f32 on the device (made once by the caller).
    pub fn loss_and_gradients(
        &self,
        state: &State,
        x: &Tensor,
        labels: &Tensor,
        upstream: &Tensor,
        bn_updates: &mut Vec<(String, Tensor)>,
    ) -> Result<(Tensor, Tensor, BTreeMap<String, Tensor>)> {
        let mut tape = Vec::new();
        let logits = apply_all(&self.layers, state, x, &mut BnMode::Train(bn_updates), Some(&mut tape))?;
        if !crate::kernels::loss::applies(&logits, labels) {
            bail!(
                "the taped backward pass wants f32 logits and u32 labels, got {:?} and {:?}",
                logits.dtype(),
                labels.dtype()
            )
        }
        let (loss, correct) = crate::kernels::loss::loss_and_correct(&logits, labels)?;
        let grad = crate::kernels::loss::logits_grad(&logits, labels, upstream)?;
        let mut grads = BTreeMap::new();
        backward::backward(&tape, state, grad, false, &mut grads)?;
        Ok((loss, correct, grads))
    }
}

/// How BatchNorm behaves in a forward pass.
pub enum BnMode<'a> {
    /// Running statistics (evaluation).
    Eval,
    /// Batch statistics; the updated running statistics are pushed to the vector (training).
    Train(&'a mut Vec<(String, Tensor)>),
    /// Batch statistics; the batch mean and unbiased variance themselves are pushed under the
    /// running statistics' names (for recomputing them as an average over batches).
    Calibrate(&'a mut Vec<(String, Tensor)>),
}

pub(crate) const BN_MOMENTUM: f64 = 0.1;
pub(crate) const BN_EPS: f64 = 1e-5;

fn get<'s>(state: &'s State, name: &str) -> Result<&'s Tensor> {
    state.get(name).with_context(|| format!("tensor '{name}' is missing from the weights"))
}

/// Runs `layers` in order. A BatchNorm followed by a ReLU runs as one op (see
/// [`norm::train`]); the result is the same as running them one by one. With a `tape`, each
/// layer's input, output and (for BatchNorm) op are kept on it for [`backward::backward`].
fn apply_all<'l>(
    layers: &'l [Layer],
    state: &State,
    x: &Tensor,
    bn: &mut BnMode<'_>,
    mut tape: Option<&mut Vec<Saved<'l>>>,
) -> Result<Tensor> {
    let mut x = x.clone();
    let mut i = 0;
    while i < layers.len() {
        if let (Layer::BatchNorm { name }, Some(Layer::Relu)) = (&layers[i], layers.get(i + 1)) {
            let (y, op) = batch_norm(name, state, &x, bn, true)?;
            if let Some(tape) = tape.as_deref_mut() {
                let extra = op.map_or(Extra::None, |op| Extra::BatchNorm { op });
                tape.push(Saved { layer: &layers[i], input: x, output: y.clone(), extra });
            }
            x = y;
            i += 2;
            continue;
        }
        x = apply(&layers[i], state, &x, bn, tape.as_deref_mut())?;
        i += 1;
    }
    Ok(x)
}

fn apply<'l>(
    layer: &'l Layer,
    state: &State,
    x: &Tensor,
    bn: &mut BnMode<'_>,
    tape: Option<&mut Vec<Saved<'l>>>,
) -> Result<Tensor> {
    let mut extra = Extra::None;
    let y = match layer {
        Layer::Pad(p) => x.pad_with_zeros(2, *p, *p)?.pad_with_zeros(3, *p, *p)?,
        Layer::Flatten => x.flatten_from(1)?,
        Layer::Linear { name } => {
            let w = get(state, &format!("{name}.weight"))?;
            let b = get(state, &format!("{name}.bias"))?;
            x.matmul(&w.t()?)?.broadcast_add(b)?
        }
        Layer::Conv { name, stride, padding, bias } => {
            let w = get(state, &format!("{name}.weight"))?;
            if *bias {
                let b = get(state, &format!("{name}.bias"))?;
                crate::kernels::conv2d_bias(x, w, b, *padding, *stride)?
            } else {
                crate::kernels::conv2d(x, w, *padding, *stride)?
            }
        }
        Layer::BatchNorm { name } => {
            let (y, op) = batch_norm(name, state, x, bn, false)?;
            if let Some(op) = op {
                extra = Extra::BatchNorm { op };
            }
            y
        }
        Layer::Relu => layers::relu(x)?,
        Layer::MaxPool2 => layers::max_pool2(x)?,
        Layer::GlobalAvgPool => x.mean(D::Minus1)?.mean(D::Minus1)?,
        Layer::Residual { main, shortcut } => {
            let (mut main_tape, mut shortcut_tape) = (Vec::new(), Vec::new());
            let taped = tape.is_some();
            let m = apply_all(main, state, x, bn, taped.then_some(&mut main_tape))?;
            let s = apply_all(shortcut, state, x, bn, taped.then_some(&mut shortcut_tape))?;
            extra = Extra::Residual { main: main_tape, shortcut: shortcut_tape };
            layers::relu(&(m + s)?)?
        }
    };
    if let Some(tape) = tape {
        tape.push(Saved { layer, input: x.clone(), output: y.clone(), extra });
    }
    Ok(y)
}

/// BatchNorm `name` over `x`, followed by a ReLU when `relu`; in training mode, with its op when
/// it ran as one (for [`backward::backward`]).
fn batch_norm(
    name: &str,
    state: &State,
    x: &Tensor,
    bn: &mut BnMode<'_>,
    relu: bool,
) -> Result<(Tensor, Option<KeptOp3>)> {
    let (weight_c, bias_c) = (get(state, &format!("{name}.weight"))?, get(state, &format!("{name}.bias"))?);
    let (weight, bias) = (weight_c.reshape((1, (), 1, 1))?, bias_c.reshape((1, (), 1, 1))?);
    // f32 on the CPU: fused ops (crate::kernels::norm) instead of a dozen candle passes.
    let fused = norm::applies(x);
    let running_mean = get(state, &format!("{name}.running_mean"))?;
    let running_var = get(state, &format!("{name}.running_var"))?;
    if !matches!(bn, BnMode::Eval) && gpu_batch_norm(x) {
        let (y, op) = gpu_batch_norm_train(name, x, (weight_c, bias_c), (running_mean, running_var), bn, relu)?;
        return Ok((y, Some(op)));
    }
    let (mean, var) = match bn {
        BnMode::Eval => {
            // With no gradient to carry, one pass of our own on the CPU and on a GPU.
            let one_pass =
                fused || (cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32 && x.rank() == 4);
            if one_pass && !x.track_op() && !weight_c.track_op() && !bias_c.track_op() {
                let prepared = (state.get(&format!("{name}{EVAL_SCALE}")), state.get(&format!("{name}{EVAL_SHIFT}")));
                let (scale, shift) = match prepared {
                    (Some(scale), Some(shift)) => (scale.clone(), shift.clone()),
                    _ => eval_factors(state, name)?,
                };
                return Ok((norm::affine_no_grad(&x.contiguous()?, &scale, &shift, relu)?, None));
            }
            (running_mean.reshape((1, (), 1, 1))?, running_var.reshape((1, (), 1, 1))?)
        }
        BnMode::Train(_) | BnMode::Calibrate(_) => {
            let (n, _, h, w) = x.dims4()?;
            let count = (n * h * w) as f64;
            // The fused op computes the statistics once, for its output, its gradient and the
            // running statistics alike.
            let mut fused_out = None;
            let (mean, var) = if fused {
                let (y, stats, op) = norm::train(x, weight_c, bias_c, BN_EPS, relu)?;
                fused_out = Some((y, op));
                (stats.get(0)?.reshape((1, (), 1, 1))?, stats.get(1)?.reshape((1, (), 1, 1))?)
            } else {
                let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
                let centered = x.broadcast_sub(&mean)?;
                (mean, centered.sqr()?.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?)
            };
            // PyTorch updates the running variance with the unbiased batch variance.
            let unbiased = (var.detach().flatten_all()? * (count / (count - 1.0).max(1.0)))?;
            let batch_mean = mean.detach().flatten_all()?;
            let (mean_name, var_name) = (format!("{name}.running_mean"), format!("{name}.running_var"));
            match bn {
                BnMode::Train(updates) => {
                    let new_mean = ((running_mean * (1.0 - BN_MOMENTUM))? + (batch_mean * BN_MOMENTUM)?)?;
                    let new_var = ((running_var * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
                    updates.push((mean_name, new_mean));
                    updates.push((var_name, new_var));
                }
                BnMode::Calibrate(stats) => {
                    stats.push((mean_name, batch_mean));
                    stats.push((var_name, unbiased));
                }
                BnMode::Eval => unreachable!("handled above"),
            }
            if let Some((y, op)) = fused_out {
                return Ok((y, Some(op)));
            }
            (mean, var)
        }
    };
    let inv_std = (var + BN_EPS)?.sqrt()?.recip()?;
    let y = x.broadcast_sub(&mean)?.broadcast_mul(&(inv_std.broadcast_mul(&weight))?)?.broadcast_add(&bias)?;
    Ok((if relu { layers::relu(&y)? } else { y }, None))
}

/// Names of the evaluation factors [`Architecture::for_evaluation`] adds for BatchNorm `name`.
const EVAL_SCALE: &str = ".eval_scale";
const EVAL_SHIFT: &str = ".eval_shift";

/// Evaluation-mode BatchNorm `name` of `state` as a per-channel scale and shift [c]:
/// y = x · scale + shift, with scale = weight / √(running_var + ε) and shift = bias − running_mean · scale.
fn eval_factors(state: &State, name: &str) -> Result<(Tensor, Tensor)> {
    let channels =
        |suffix: &str| -> Result<Tensor> { Ok(get(state, &format!("{name}.{suffix}"))?.reshape((1, (), 1, 1))?) };
    let (weight, bias) = (channels("weight")?, channels("bias")?);
    let (mean, var) = (channels("running_mean")?, channels("running_var")?);
    let inv_std = (var + BN_EPS)?.sqrt()?.recip()?;
    let scale = inv_std.broadcast_mul(&weight)?.flatten_all()?;
    let shift = (bias.flatten_all()? - (mean.flatten_all()? * &scale)?)?;
    Ok((scale, shift))
}

/// Whether training-mode BatchNorm of `x` runs through cuDNN ([`crate::kernels::cudnn`]).
fn gpu_batch_norm(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return crate::kernels::cudnn::batch_norm_applies(x);
    #[cfg(not(feature = "cuda"))]
    return {
        let _ = x;
        false
    };
}

/// Training-mode BatchNorm (and its ReLU) on a GPU, through cuDNN: the output, and the running
/// statistics updated (`BnMode::Train`) or the batch statistics themselves (`BnMode::Calibrate`)
/// pushed under the running statistics' names, as the CPU path does.
#[cfg(feature = "cuda")]
fn gpu_batch_norm_train(
    name: &str,
    x: &Tensor,
    (weight, bias): (&Tensor, &Tensor),
    (running_mean, running_var): (&Tensor, &Tensor),
    bn: &mut BnMode<'_>,
    relu: bool,
) -> Result<(Tensor, KeptOp3)> {
    use crate::kernels::{cuda, cudnn};
    let (y, batch, op) = cudnn::batch_norm_train(x, weight, bias, BN_EPS, relu)?;
    let c = weight.elem_count();
    let (mean_name, var_name) = (format!("{name}.running_mean"), format!("{name}.running_var"));
    let pushed = match bn {
        BnMode::Train(updates) => (updates, cuda::running_stats(running_mean, running_var, &batch, BN_MOMENTUM)?),
        BnMode::Calibrate(stats) => (stats, batch),
        BnMode::Eval => unreachable!("evaluation-mode BatchNorm does not come here"),
    };
    let (list, values) = pushed;
    list.push((mean_name, values.narrow(0, 0, c)?));
    list.push((var_name, values.narrow(0, c, c)?));
    Ok((y, op))
}

#[cfg(not(feature = "cuda"))]
fn gpu_batch_norm_train(
    _: &str,
    _: &Tensor,
    _: (&Tensor, &Tensor),
    _: (&Tensor, &Tensor),
    _: &mut BnMode<'_>,
    _: bool,
) -> Result<(Tensor, KeptOp3)> {
    unreachable!("gpu_batch_norm is false without CUDA")
}

/// Mean cross-entropy and the number of wrong argmax predictions.
pub fn loss_and_errors(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (loss, correct) = loss_and_correct(logits, labels)?;
    Ok((loss, labels.dim(0)? - correct.to_scalar::<f32>()? as usize))
}

/// Mean cross-entropy and the number of right argmax predictions (an f32 scalar), both left on
/// the logits' device.
pub fn loss_and_correct(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    if crate::kernels::loss::applies(logits, labels) {
        return Ok(crate::kernels::loss::loss_and_correct(logits, labels)?);
    }
    let loss = candle_nn::loss::cross_entropy(logits, labels)?;
    let predicted = logits.argmax(D::Minus1)?;
    let correct = predicted.eq(&labels.to_dtype(DType::U32)?)?.to_dtype(DType::F32)?.sum_all()?;
    Ok((loss, correct))
}

/// Collects layers and units while a network is described.
struct Builder {
    init: WeightInit,
    input: [usize; 3],
    classes: usize,
    pad: usize,
    width_mult: f64,
    name: String,
    layers: Vec<Layer>,
    units: Vec<Unit>,
}

impl Builder {
    fn new(cfg: &ModelConfig, input: [usize; 3], classes: usize) -> Builder {
        let pad = (cfg.pad_to as usize).saturating_sub(input[1].max(input[2])) / 2;
        Builder {
            init: cfg.init,
            input,
            classes,
            pad,
            width_mult: cfg.width_mult,
            name: String::new(),
            layers: Vec::new(),
            units: Vec::new(),
        }
    }

    fn channels(&self, base: usize) -> usize {
        ((base as f64 * self.width_mult).round() as usize).max(1)
    }

    fn new_unit(&mut self, name: &str, kind: &'static str, entry_layer: usize) -> &mut Unit {
        let index = self.units.len();
        self.units.push(Unit { index, name: name.into(), kind, entry_layer, tensors: Vec::new() });
        self.units.last_mut().expect("just pushed")
    }

    fn linear_layer(&mut self, unit: &str, tensor_prefix: &str, fan_in: usize, out: usize) -> Layer {
        let (w, b) = init::weight_and_bias(self.init, fan_in);
        let entry = self.layers.len();
        let u = self.new_unit(unit, "linear", entry);
        u.tensors.push(spec(format!("{tensor_prefix}.weight"), vec![out, fan_in], w, true));
        u.tensors.push(spec(format!("{tensor_prefix}.bias"), vec![out], b, true));
        Layer::Linear { name: tensor_prefix.into() }
    }

    /// A conv unit (entry at the current top-level layer), returning its conv layer.
    #[allow(clippy::too_many_arguments)] // a convolution's shape: each argument is one of its sizes
    fn conv_layer(
        &mut self,
        unit: &str,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
    ) -> Layer {
        let fan_in = cin * k * k;
        let (w, b) = init::weight_and_bias(self.init, fan_in);
        let entry = self.layers.len();
        let u = self.new_unit(unit, "conv", entry);
        u.tensors.push(spec(format!("{prefix}.weight"), vec![cout, cin, k, k], w, true));
        if bias {
            u.tensors.push(spec(format!("{prefix}.bias"), vec![cout], b, true));
        }
        Layer::Conv { name: prefix.into(), stride, padding: k / 2, bias }
    }

    /// A BatchNorm owned by the last unit.
    fn bn_layer(&mut self, prefix: &str, channels: usize) -> Layer {
        let u = self.units.last_mut().expect("a BatchNorm follows a unit");
        u.tensors.push(spec(format!("{prefix}.weight"), vec![channels], Init::Const(1.0), true));
        u.tensors.push(spec(format!("{prefix}.bias"), vec![channels], Init::Const(0.0), true));
        u.tensors.push(spec(format!("{prefix}.running_mean"), vec![channels], Init::Const(0.0), false));
        u.tensors.push(spec(format!("{prefix}.running_var"), vec![channels], Init::Const(1.0), false));
        Layer::BatchNorm { name: prefix.into() }
    }

    fn fcn(&mut self, depth: usize, width: usize) {
        self.name = format!("fcn-{depth}x{width}");
        self.layers.push(Layer::Flatten);
        let mut fan_in: usize = self.input.iter().product();
        for i in 1..=depth + 1 {
            let out = if i <= depth { width } else { self.classes };
            let name = format!("fc{i}");
            let l = self.linear_layer(&name, &name, fan_in, out);
            self.layers.push(l);
            if i <= depth {
                self.layers.push(Layer::Relu);
            }
            fan_in = out;
        }
    }

    fn spatial(&self) -> usize {
        self.input[1].max(self.input[2]) + 2 * self.pad
    }

    /// `plan`: channel multiples of 64, with 0 for a 2×2 max-pool (torchvision's cfg lists).
    fn vgg(&mut self, plan: &[usize], batch_norm: bool) -> Result<()> {
        let depth = plan.iter().filter(|&&c| c > 0).count() + 3;
        self.name = format!("vgg{depth}{}-w{}", if batch_norm { "-bn" } else { "" }, self.width_mult);
        if self.pad > 0 {
            self.layers.push(Layer::Pad(self.pad));
        }
        let mut size = self.spatial();
        let mut cin = self.input[0];
        // torchvision numbers every module inside `features`, ReLU and pools included.
        let mut module = 0;
        let mut conv = 0;
        for &m in plan {
            if m == 0 {
                if size < 2 {
                    bail!("input too small for {} max-pools", plan.iter().filter(|&&c| c == 0).count());
                }
                size /= 2;
                self.layers.push(Layer::MaxPool2);
                module += 1;
                continue;
            }
            conv += 1;
            let cout = self.channels(64 * m);
            let l = self.conv_layer(&format!("conv{conv}"), &format!("features.{module}"), cin, cout, 3, 1, true);
            self.layers.push(l);
            module += 1;
            if batch_norm {
                let l = self.bn_layer(&format!("features.{module}"), cout);
                self.layers.push(l);
                module += 1;
            }
            self.layers.push(Layer::Relu);
            module += 1;
            cin = cout;
        }
        self.layers.push(Layer::Flatten);
        let l = self.linear_layer("fc", "classifier", cin * size * size, self.classes);
        self.layers.push(l);
        Ok(())
    }

    fn resnet(&mut self, blocks: &[usize]) -> Result<()> {
        let depth = 2 * blocks.iter().sum::<usize>() + 2;
        self.name = format!("resnet{depth}-w{}", self.width_mult);
        if self.pad > 0 {
            self.layers.push(Layer::Pad(self.pad));
        }
        let stem = self.channels(64);
        let l = self.conv_layer("conv1", "conv1", self.input[0], stem, 3, 1, false);
        self.layers.push(l);
        let l = self.bn_layer("bn1", stem);
        self.layers.push(l);
        self.layers.push(Layer::Relu);
        let mut cin = stem;
        let mut size = self.spatial();
        for (s, &count) in blocks.iter().enumerate() {
            let cout = self.channels(64 << s);
            for b in 0..count {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                if stride == 2 {
                    if size < 2 {
                        bail!("input too small for ResNet's strides");
                    }
                    size = size.div_ceil(2);
                }
                let p = format!("layer{}.{b}", s + 1);
                let mut main =
                    vec![self.conv_layer(&format!("{p}.conv1"), &format!("{p}.conv1"), cin, cout, 3, stride, false)];
                main.push(self.bn_layer(&format!("{p}.bn1"), cout));
                main.push(Layer::Relu);
                main.push(self.conv_layer(&format!("{p}.conv2"), &format!("{p}.conv2"), cout, cout, 3, 1, false));
                main.push(self.bn_layer(&format!("{p}.bn2"), cout));
                let mut shortcut = Vec::new();
                if stride != 1 || cin != cout {
                    shortcut.push(self.conv_layer(
                        &format!("{p}.shortcut"),
                        &format!("{p}.shortcut.0"),
                        cin,
                        cout,
                        1,
                        stride,
                        false,
                    ));
                    shortcut.push(self.bn_layer(&format!("{p}.shortcut.1"), cout));
                }
                self.layers.push(Layer::Residual { main, shortcut });
                cin = cout;
            }
        }
        self.layers.push(Layer::GlobalAvgPool);
        let l = self.linear_layer("fc", "fc", cin, self.classes);
        self.layers.push(l);
        Ok(())
    }

    fn finish(self) -> Architecture {
        Architecture {
            name: self.name,
            layers: self.layers,
            units: self.units,
            input: self.input,
            classes: self.classes,
        }
    }
}

fn spec(name: String, shape: Vec<usize>, init: Init, trainable: bool) -> TensorSpec {
    TensorSpec { name, shape, init, trainable }
}

/// Appends u8 pixels to `out` as the networks' f32 inputs (pixels / 255, by
/// [`crate::kernels::pixels::scaled`], the rule the device-side batch gather follows too), so that
/// every path sees the same values.
pub fn push_scaled_pixels(pixels: &[u8], out: &mut Vec<f32>) {
    out.extend(pixels.iter().map(|&p| crate::kernels::pixels::scaled(p)));
}

/// Turns u8 images [n, c, h, w] into f32 pixels / 255 on `device`.
pub fn images_to_tensor(pixels: &[u8], shape: [usize; 4], device: &Device) -> Result<Tensor> {
    let mut values = Vec::with_capacity(pixels.len());
    push_scaled_pixels(pixels, &mut values);
    Ok(Tensor::from_vec(values, shape.to_vec(), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(arch: &str) -> ModelConfig {
        ModelConfig {
            arch: arch.parse().unwrap(),
            depth: 3,
            width: 256,
            width_mult: 0.25,
            batch_norm: true,
            pad_to: 32,
            init: WeightInit::Pytorch,
        }
    }

    #[test]
    fn fcn_units_and_shapes_follow_the_paper() {
        let mut c = cfg("fcn");
        c.pad_to = 0;
        let a = Architecture::build(&c, [1, 28, 28], 10).unwrap();
        let names: Vec<_> = a.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["fc1", "fc2", "fc3", "fc4"]);
        assert_eq!(a.units[0].tensors[0].shape, vec![256, 784]);
        assert_eq!(a.units[3].tensors[0].shape, vec![10, 256]);
        assert_eq!(a.units.iter().map(Unit::params).sum::<usize>(), 784 * 256 + 256 + 2 * (256 * 256 + 256) + 2570);
    }

    #[test]
    fn vgg11_has_eight_convs_with_torchvision_names() {
        let a = Architecture::build(&cfg("vgg11"), [1, 28, 28], 10).unwrap();
        let names: Vec<_> = a.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7", "conv8", "fc"]);
        let channels: Vec<_> = a.units[..8].iter().map(|u| u.tensors[0].shape[0]).collect();
        assert_eq!(channels, [16, 32, 64, 64, 128, 128, 128, 128]);
        assert_eq!(a.units[0].tensors[0].name, "features.0.weight");
        assert_eq!(a.units[0].tensors[2].name, "features.1.weight");
        assert_eq!(a.units[1].tensors[0].name, "features.4.weight");
        assert_eq!(a.units[8].tensors[0].shape, vec![10, 128]);
        assert!(a.units[0].has_batch_norm());
    }

    /// Evaluation factors prepared once give the outputs computed per batch, bit for bit, and
    /// a changed running statistic is not hidden by them (they are taken from the state given).
    #[test]
    fn prepared_evaluation_factors_change_no_output() {
        for name in ["vgg11", "resnet18"] {
            let mut c = cfg(name);
            c.width_mult = 0.125;
            let a = Architecture::build(&c, [3, 32, 32], 10).unwrap();
            let mut state = a.initial_state(3, &Device::Cpu).unwrap();
            // Running statistics away from their initial zeros and ones (tiny means, variances
            // between 0.5 and 1.2, so that the ReLUs pass something).
            for (k, t) in state.iter_mut() {
                let ramp = || Tensor::arange(1f32, t.elem_count() as f32 + 1.0, &Device::Cpu).unwrap();
                if k.ends_with("running_mean") {
                    *t = (ramp() * 1e-5).unwrap();
                } else if k.ends_with("running_var") {
                    *t = (ramp() * 1e-2).unwrap().affine(1.0, 0.5).unwrap();
                }
            }
            // A fixed input (an unseeded one left ResNet's last ReLUs dead now and then, every
            // logit the classifier's bias, and the last assertion below failing).
            let mut rng = random::rng(5);
            let pixels: Vec<f32> = (0..2 * 3 * 32 * 32).map(|_| random::unit_f64(&mut rng) as f32).collect();
            let x = Tensor::from_vec(pixels, (2, 3, 32, 32), &Device::Cpu).unwrap();
            let bits = |t: Tensor| {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let prepared = a.for_evaluation(&state).unwrap();
            assert!(prepared.len() > state.len(), "{name}: no factors were prepared");
            let plain = bits(a.forward(&state, &x, BnMode::Eval).unwrap());
            assert_ne!(plain[..10], plain[10..], "{name}: both images give the same logits (dead activations)");
            assert_eq!(bits(a.forward(&prepared, &x, BnMode::Eval).unwrap()), plain, "{name}");
            let moved: State = state
                .iter()
                .map(|(k, t)| (k.clone(), if k.ends_with("running_var") { (t * 2.0).unwrap() } else { t.clone() }))
                .collect();
            assert_ne!(bits(a.forward(&a.for_evaluation(&moved).unwrap(), &x, BnMode::Eval).unwrap()), plain, "{name}");
        }
    }

    #[test]
    fn resnet18_units_include_shortcuts() {
        let a = Architecture::build(&cfg("resnet18"), [1, 28, 28], 10).unwrap();
        assert_eq!(a.units.len(), 1 + 16 + 3 + 1);
        let u = a.unit("layer2.0.shortcut").unwrap();
        assert_eq!(u.tensors[0].name, "layer2.0.shortcut.0.weight");
        assert_eq!(u.tensors[0].shape, vec![32, 16, 1, 1]);
        assert_eq!(a.unit("fc").unwrap().tensors[0].shape, vec![10, 128]);
        assert!(a.unit("layer9.0.conv1").is_err());
    }
}
