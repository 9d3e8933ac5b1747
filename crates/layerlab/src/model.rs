//! The forward pass of a network ([`crate::network`]): in evaluation mode, in training mode
//! (with the running statistics' updates, and a tape for [`crate::backward`]), and for
//! BatchNorm recalibration; and the loss.
//!
//! The definitions it runs (layers, units, state) are [`crate::network`]'s, re-exported here,
//! where the rest of the crate names them.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::backward::{self, Extra, Saved};
use crate::batchnorm;
use crate::kernels::{layers, norm, KeptOp3, KernelOptions};
pub use crate::network::{Architecture, Layer, State, TensorSpec, Unit};

impl Architecture {
    /// Logits for a batch of inputs [n, c, h, w] (f32, already scaled), through the kernels
    /// `kernels` allows on a GPU.
    pub fn forward(&self, state: &State, x: &Tensor, bn: BnMode<'_>, kernels: &KernelOptions) -> Result<Tensor> {
        self.forward_range(state, x, 0, self.layers.len(), bn, kernels)
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
                    Layer::Pad(_)
                    | Layer::Flatten
                    | Layer::Linear { .. }
                    | Layer::Conv { .. }
                    | Layer::Relu
                    | Layer::MaxPool2
                    | Layer::GlobalAvgPool => {}
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
        kernels: &KernelOptions,
    ) -> Result<Tensor> {
        apply_all(&self.layers[from..to], state, x, &mut bn, None, kernels)
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
        kernels: &KernelOptions,
    ) -> Result<(Tensor, Tensor, BTreeMap<String, Tensor>)> {
        let mut tape = Vec::new();
        let logits = apply_all(&self.layers, state, x, &mut BnMode::Train(bn_updates), Some(&mut tape), kernels)?;
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
        backward::backward(&tape, state, grad, false, &mut grads, kernels)?;
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

use crate::batchnorm::EPS as BN_EPS;

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
    kernels: &KernelOptions,
) -> Result<Tensor> {
    let mut x = x.clone();
    let mut i = 0;
    while i < layers.len() {
        if let (Layer::BatchNorm { name }, Some(Layer::Relu)) = (&layers[i], layers.get(i + 1)) {
            let (y, op) = batch_norm(name, state, &x, bn, true, kernels)?;
            if let Some(tape) = tape.as_deref_mut() {
                let extra = op.map_or(Extra::None, |op| Extra::BatchNorm { op });
                tape.push(Saved { layer: &layers[i], input: x, output: y.clone(), extra });
            }
            x = y;
            i += 2;
            continue;
        }
        x = apply(&layers[i], state, &x, bn, tape.as_deref_mut(), kernels)?;
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
    kernels: &KernelOptions,
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
                crate::kernels::conv2d_bias(x, w, b, *padding, *stride, kernels)?
            } else {
                crate::kernels::conv2d(x, w, *padding, *stride, kernels)?
            }
        }
        Layer::BatchNorm { name } => {
            let (y, op) = batch_norm(name, state, x, bn, false, kernels)?;
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
            let m = apply_all(main, state, x, bn, taped.then_some(&mut main_tape), kernels)?;
            let s = apply_all(shortcut, state, x, bn, taped.then_some(&mut shortcut_tape), kernels)?;
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
    kernels: &KernelOptions,
) -> Result<(Tensor, Option<KeptOp3>)> {
    let (weight_c, bias_c) = (get(state, &format!("{name}.weight"))?, get(state, &format!("{name}.bias"))?);
    let (weight, bias) = (weight_c.reshape((1, (), 1, 1))?, bias_c.reshape((1, (), 1, 1))?);
    // f32 on the CPU: fused ops (crate::kernels::norm) instead of a dozen candle passes.
    let fused = norm::applies(x);
    let running_mean = get(state, &format!("{name}.running_mean"))?;
    let running_var = get(state, &format!("{name}.running_var"))?;
    if !matches!(bn, BnMode::Eval) && gpu_batch_norm(x, kernels) {
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
            let count = n * h * w;
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
            let unbiased = (var.detach().flatten_all()? * batchnorm::unbiased_factor(count))?;
            let batch_mean = mean.detach().flatten_all()?;
            let (mean_name, var_name) = (format!("{name}.running_mean"), format!("{name}.running_var"));
            match bn {
                BnMode::Train(updates) => {
                    let new_mean = batchnorm::updated_running_tensor(running_mean, &batch_mean)?;
                    let new_var = batchnorm::updated_running_tensor(running_var, &unbiased)?;
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
fn gpu_batch_norm(x: &Tensor, kernels: &KernelOptions) -> bool {
    #[cfg(feature = "cuda")]
    return kernels.cudnn_batch_norm && crate::kernels::cudnn::batch_norm_applies(x);
    #[cfg(not(feature = "cuda"))]
    return {
        let _ = (x, kernels);
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
        BnMode::Train(updates) => {
            (updates, cuda::running_stats(running_mean, running_var, &batch, batchnorm::MOMENTUM)?)
        }
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
    use crate::network::tests::cfg;
    use crate::random;

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
            let plain = bits(a.forward(&state, &x, BnMode::Eval, &KernelOptions::default()).unwrap());
            assert_ne!(plain[..10], plain[10..], "{name}: both images give the same logits (dead activations)");
            assert_eq!(
                bits(a.forward(&prepared, &x, BnMode::Eval, &KernelOptions::default()).unwrap()),
                plain,
                "{name}"
            );
            let moved: State = state
                .iter()
                .map(|(k, t)| (k.clone(), if k.ends_with("running_var") { (t * 2.0).unwrap() } else { t.clone() }))
                .collect();
            assert_ne!(
                bits(
                    a.forward(&a.for_evaluation(&moved).unwrap(), &x, BnMode::Eval, &KernelOptions::default()).unwrap()
                ),
                plain,
                "{name}"
            );
        }
    }
}
