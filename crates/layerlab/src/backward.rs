//! A training step's gradients without candle's autograd graph: the GPU's backward pass.
//!
//! Why: candle's backward pass gives every node of its graph a fresh zero tensor and adds the
//! node's gradient into it (`GradStore::or_insert`, then `add`), so each layer of a step costs
//! two more kernel launches, two more buffers and three more passes over its activations than
//! its own gradient kernels do; and the graph is built, sorted and walked on the host while a
//! small network's GPU waits for launches. Here the forward pass ([`crate::model`]'s, with a
//! tape) keeps, per layer, its input, its output and, for BatchNorm, the op itself; the backward
//! pass walks the tape in reverse and calls the gradient kernels candle's backward pass would
//! call for the same ops, in the same way, each gradient written once.
//!
//! The values are candle's: a gradient candle adds into zeros is the same number (`0 + g = g`;
//! only a negative zero turns positive), and where two gradients meet (a residual block's input)
//! one addition of two terms, in either order, is the same number. On the CPU the tests hold
//! every gradient of FCN, VGG (± BatchNorm) and ResNet to candle's autograd, value for value.
//! It covers the ops that have a gradient kernel of ours (f32 on the CPU or a GPU); anything else
//! is an error naming the layer.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::kernels::{self, layers, KeptOp3, KernelOptions};
use crate::network::{Layer, State};

/// Whether training steps on `device` take their gradients from here: on a GPU (where candle's
/// overhead per node is launches), unless `kernels` says otherwise. The CPU's training runs on
/// the host executors ([`crate::exec`]); its candle path stays candle's autograd, the reference.
///
/// The tape calls the gradients of layerlab's own GPU convolution and BatchNorm ops; with either
/// switched off (the GPU tests' cross-checks) those layers are candle's ops, whose gradients only
/// candle's autograd computes, so the step is autograd's ([`KernelOptions::tape_applies`]).
pub fn used_on(device: &candle_core::Device, kernels: &KernelOptions) -> bool {
    device.is_cuda() && kernels.tape_applies()
}

/// What one layer of a forward pass keeps for its gradient.
pub(crate) struct Saved<'l> {
    pub layer: &'l Layer,
    pub input: Tensor,
    pub output: Tensor,
    pub extra: Extra<'l>,
}

pub(crate) enum Extra<'l> {
    None,
    /// A training-mode BatchNorm: the op, whose backward pass is called. When a ReLU followed
    /// it, the op ran both and the tape entry stands for both layers.
    BatchNorm {
        op: KeptOp3,
    },
    /// A residual block's two branches.
    Residual {
        main: Vec<Saved<'l>>,
        shortcut: Vec<Saved<'l>>,
    },
}

impl Saved<'_> {
    fn has_parameters(&self) -> bool {
        matches!(
            self.layer,
            Layer::Linear { .. } | Layer::Conv { .. } | Layer::BatchNorm { .. } | Layer::Residual { .. }
        )
    }
}

fn get<'s>(state: &'s State, name: &str) -> Result<&'s Tensor> {
    state.get(name).with_context(|| format!("tensor '{name}' is missing from the weights"))
}

fn put(grads: &mut BTreeMap<String, Tensor>, name: String, grad: Tensor) -> Result<()> {
    if grads.insert(name.clone(), grad).is_some() {
        bail!("tensor '{name}' is used by two layers; the taped backward pass gives each one gradient")
    }
    Ok(())
}

/// Back through `tape` (a forward pass's layers, in order) from its output's gradient `grad`:
/// every parameter's gradient into `grads`, and the input's gradient when `need_input` (else
/// `None`, and the layers before the first parameter are not visited).
pub(crate) fn backward(
    tape: &[Saved<'_>],
    state: &State,
    grad: Tensor,
    need_input: bool,
    grads: &mut BTreeMap<String, Tensor>,
    options: &KernelOptions,
) -> Result<Option<Tensor>> {
    let mut grad = grad;
    for (i, saved) in tape.iter().enumerate().rev() {
        let need = need_input || tape[..i].iter().any(Saved::has_parameters);
        match layer_backward(saved, state, &grad, need, grads, options)
            .with_context(|| format!("the gradient of layer {:?}", saved.layer.label()))?
        {
            Some(g) => grad = g,
            None => return Ok(None),
        }
    }
    Ok(Some(grad))
}

/// One layer's gradients: its parameters' into `grads`, its input's returned when `need_input`.
fn layer_backward(
    saved: &Saved<'_>,
    state: &State,
    grad: &Tensor,
    need_input: bool,
    grads: &mut BTreeMap<String, Tensor>,
    options: &KernelOptions,
) -> Result<Option<Tensor>> {
    let x = &saved.input;
    Ok(match (saved.layer, &saved.extra) {
        (Layer::Pad(p), _) => {
            let (_, _, h, w) = x.dims4()?;
            need_input.then(|| grad.narrow(3, *p, w)?.narrow(2, *p, h)).transpose()?
        }
        (Layer::Flatten, _) => need_input.then(|| grad.reshape(x.dims())).transpose()?,
        // y = x · wᵀ + b, differentiated as candle's matmul, transpose and broadcast add are.
        (Layer::Linear { name }, _) => {
            let w = get(state, &format!("{name}.weight"))?;
            put(grads, format!("{name}.bias"), grad.sum_keepdim(0)?.squeeze(0)?)?;
            put(grads, format!("{name}.weight"), x.t()?.matmul(grad)?.t()?)?;
            need_input.then(|| grad.matmul(&w.t()?.t()?)).transpose()?
        }
        (Layer::Conv { name, stride, padding, bias }, _) => {
            let w = get(state, &format!("{name}.weight"))?;
            let b = if *bias { Some(get(state, &format!("{name}.bias"))?) } else { None };
            let (dx, dw, db) = kernels::conv2d_backward(x, w, b, grad, (*padding, *stride), need_input, options)?;
            put(grads, format!("{name}.weight"), dw)?;
            if let Some(db) = db {
                put(grads, format!("{name}.bias"), db)?;
            }
            dx
        }
        (Layer::BatchNorm { name }, Extra::BatchNorm { op }) => {
            let (w, b) = (get(state, &format!("{name}.weight"))?, get(state, &format!("{name}.bias"))?);
            let (dx, dw, db) = op.bwd(&x.contiguous()?, &w.contiguous()?, &b.contiguous()?, &saved.output, grad)?;
            let (Some(dx), Some(dw), Some(db)) = (dx, dw, db) else {
                bail!("BatchNorm '{name}': its op gave no gradient")
            };
            put(grads, format!("{name}.weight"), dw)?;
            put(grads, format!("{name}.bias"), db)?;
            Some(dx)
        }
        (Layer::BatchNorm { name }, _) => {
            bail!("BatchNorm '{name}' ran as candle ops (not f32 on the CPU or a GPU): only candle's autograd has its gradient")
        }
        (Layer::Relu, _) => Some(layers::relu_grad(&saved.output, grad)?),
        (Layer::MaxPool2, _) => Some(layers::max_pool2_grad(x, grad)?),
        // x.mean(-1).mean(-1), differentiated as candle does: each mean is a scale of the
        // gradient (an affine op), broadcast back over the dimension it summed.
        (Layer::GlobalAvgPool, _) => {
            let (n, c, h, w) = x.dims4()?;
            let over_h = grad.affine(1.0 / h as f64, 0.0)?.reshape((n, c, 1))?.broadcast_as((n, c, h))?.contiguous()?;
            let over_w = over_h.affine(1.0 / w as f64, 0.0)?;
            Some(over_w.reshape((n, c, h, 1))?.broadcast_as((n, c, h, w))?.contiguous()?)
        }
        // relu(main(x) + shortcut(x)): the sum's gradient goes to both branches alike, and the
        // input's gradient is the sum of the two branches'.
        (Layer::Residual { .. }, Extra::Residual { main, shortcut }) => {
            let g = layers::relu_grad(&saved.output, grad)?;
            let from_main = backward(main, state, g.clone(), true, grads, options)?.context("residual branch")?;
            let from_shortcut = if shortcut.is_empty() {
                g
            } else {
                backward(shortcut, state, g, true, grads, options)?.context("shortcut")?
            };
            Some((from_main + from_shortcut)?)
        }
        (Layer::Residual { .. }, _) => bail!("a residual block was taped without its branches"),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use layerlab_pipeline::{Arch, ModelConfig};

    use super::*;
    use crate::exec::candle::CandleTrainer;
    use crate::exec::Trainer;
    use crate::model::{loss_and_correct, Architecture, BnMode};
    use crate::optim::{Sgd, StepAt};
    use crate::test_support::values;

    /// Networks covering every layer kind: an FCN (linear, flatten), VGG-11 with and without
    /// BatchNorm on padded 20×20 images (pad, convolution with bias, max-pool, BatchNorm with its
    /// ReLU folded in, plain ReLU), ResNet-18 (convolutions without bias, BatchNorm alone before
    /// a residual sum, both kinds of shortcut, global average pooling), ResNet-50 (bottleneck
    /// blocks: 1×1 convolutions at stride 1 in the main branch).
    fn networks() -> Vec<(&'static str, Architecture)> {
        let vgg = |batch_norm| ModelConfig {
            arch: Arch::Vgg11,
            width_mult: 0.125,
            batch_norm,
            pad_to: 32,
            ..ModelConfig::default()
        };
        let resnet = ModelConfig { arch: Arch::Resnet18, width_mult: 0.125, ..ModelConfig::default() };
        let bottleneck = ModelConfig { arch: Arch::Resnet50, ..resnet.clone() };
        let fcn = ModelConfig { depth: 2, width: 24, ..ModelConfig::default() };
        vec![
            ("fcn", Architecture::build(&fcn, [1, 8, 8], 10).unwrap()),
            ("vgg11-bn", Architecture::build(&vgg(true), [3, 20, 20], 10).unwrap()),
            ("vgg11", Architecture::build(&vgg(false), [3, 20, 20], 10).unwrap()),
            ("resnet18", Architecture::build(&resnet, [3, 16, 16], 10).unwrap()),
            ("resnet50", Architecture::build(&bottleneck, [3, 16, 16], 10).unwrap()),
        ]
    }

    fn batch(arch: &Architecture, seed: u64, n: usize) -> (Tensor, Tensor) {
        let [c, h, w] = arch.input;
        let mut r = crate::random::rng(seed);
        let x: Vec<f32> = (0..n * c * h * w).map(|_| crate::random::unit_f64(&mut r) as f32).collect();
        let y: Vec<u32> = (0..n).map(|_| (crate::random::unit_f64(&mut r) * 10.0) as u32).collect();
        (Tensor::from_vec(x, (n, c, h, w), &Device::Cpu).unwrap(), Tensor::from_vec(y, n, &Device::Cpu).unwrap())
    }

    /// The taped pass against candle's autograd on the CPU's candle path, from the same weights
    /// and batch: the same loss bits, count, running statistics, and every trainable tensor's
    /// gradient value for value (`==`, so a zero's sign may differ: see the module's comment).
    #[test]
    fn taped_gradients_are_candles_autograd_value_for_value() {
        let dev = Device::Cpu;
        for (what, arch) in networks() {
            let state = arch.initial_state(7, &dev).unwrap();
            let (x, y) = batch(&arch, 3, 6);

            let mut vars = BTreeMap::new();
            let mut tracked = State::new();
            for (_, spec) in arch.tensor_specs() {
                let t = &state[&spec.name];
                if spec.trainable {
                    let v = Var::from_tensor(t).unwrap();
                    tracked.insert(spec.name.clone(), v.as_tensor().clone());
                    vars.insert(spec.name.clone(), v);
                } else {
                    tracked.insert(spec.name.clone(), t.clone());
                }
            }
            let mut theirs_stats = Vec::new();
            let logits =
                arch.forward(&tracked, &x, BnMode::Train(&mut theirs_stats), &KernelOptions::default()).unwrap();
            let (loss, correct) = loss_and_correct(&logits, &y).unwrap();
            let store = loss.backward().unwrap();

            let upstream = Tensor::new(&[1f32, 0.0], &dev).unwrap();
            let mut ours_stats = Vec::new();
            let (our_loss, our_correct, grads) =
                arch.loss_and_gradients(&state, &x, &y, &upstream, &mut ours_stats, &KernelOptions::default()).unwrap();

            assert_eq!(values(&our_loss)[0].to_bits(), values(&loss)[0].to_bits(), "{what}: loss");
            assert_eq!(values(&our_correct), values(&correct), "{what}: right predictions");
            assert_eq!(grads.keys().collect::<Vec<_>>(), vars.keys().collect::<Vec<_>>(), "{what}: gradients");
            for (name, var) in &vars {
                let expected = values(store.get(var.as_tensor()).unwrap());
                let got = values(&grads[name]);
                assert_eq!(got.len(), expected.len(), "{what}: {name}");
                let differing = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
                assert_eq!(differing, 0, "{what}: {differing} of {} values of {name}'s gradient differ", got.len());
                // A gradient of zeros everywhere would make the comparison hollow.
                assert!(got.iter().any(|v| *v != 0.0), "{what}: {name}'s gradient is zero");
            }
            assert_eq!(ours_stats.len(), theirs_stats.len(), "{what}: running statistics");
            for ((n1, t1), (n2, t2)) in ours_stats.iter().zip(&theirs_stats) {
                assert_eq!((n1, values(t1)), (n2, values(t2)), "{what}: running statistics");
            }
        }
    }

    /// Three SGD steps of the candle path's engine with the taped backward pass and with
    /// candle's autograd end in the same weights, running statistics and momentum.
    #[test]
    fn training_with_the_taped_pass_equals_training_with_autograd() {
        let dev = Device::Cpu;
        let sgd = || Box::new(Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: true });
        for (what, arch) in networks().into_iter().filter(|(w, _)| *w != "vgg11") {
            let state = arch.initial_state(11, &dev).unwrap();
            let mut taped = CandleTrainer::new(&arch, &state, sgd(), None, &dev, KernelOptions::default()).unwrap();
            taped.use_taped_backward().unwrap();
            let mut autograd = CandleTrainer::new(&arch, &state, sgd(), None, &dev, KernelOptions::default()).unwrap();
            for step in 0..3 {
                let (x, y) = batch(&arch, 20 + step, 5);
                let at = StepAt { lr: 0.05, number: step + 1 };
                let a = taped.step_on_device(&x, &y, at).unwrap();
                let b = autograd.step_on_device(&x, &y, at).unwrap();
                assert_eq!((values(&a.0), values(&a.1)), (values(&b.0), values(&b.1)), "{what} step {step}");
            }
            for (kind, ours, theirs) in [
                ("weights", taped.state().unwrap(), autograd.state().unwrap()),
                ("momentum", taped.optimizer_state().unwrap(), autograd.optimizer_state().unwrap()),
            ] {
                assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
                for (name, t) in &ours {
                    assert!(values(t) == values(&theirs[name]), "{what}: {kind} {name} differ");
                }
            }
            let moved = taped.state().unwrap();
            assert!(moved.iter().any(|(k, v)| values(v) != values(&state[k])), "{what}: no weight changed");
        }
    }
}
