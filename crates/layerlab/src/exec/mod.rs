//! How a network is computed: one interface ([`Executor`], and the [`Trainer`] it makes) over
//! the host's own kernels and candle on a device, chosen in one place ([`choose`]).
//!
//! Training, evaluation and the reset grid call an executor without asking which one they hold:
//! - [`host_mlp`]: fully connected networks on the CPU (`train.compute = "fast"`), on f32 buffers
//!   with layerlab's gemm;
//! - [`host_cnn`]: convolutional networks on the CPU (`train.compute = "fast"`), with layerlab's
//!   convolution, BatchNorm and pooling kernels;
//! - [`candle`]: every network on candle tensors, on any device (a GPU, or the CPU under
//!   `train.compute = "autograd"`, the reference the other two are tested against).
//!
//! Adding a device or a compute path: a type implementing [`Executor`] (and its [`Trainer`]) and
//! its arm in [`choose`]; nothing above this module changes.

pub mod candle;
pub mod host_cnn;
pub mod host_mlp;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::batches::EpochBatches;
use crate::cnn::LayerTimes;
use crate::eval::{EvalSet, Metrics};
use crate::kernels::KernelOptions;
use crate::model::{Architecture, State};
use crate::optim::{Optimizer, OptimizerState, StepAt};
use layerlab_pipeline::ComputePath;

/// The executor for `arch` on `device` under `train.compute`: the host's kernels where they
/// apply (the CPU, `fast`), candle otherwise, through the GPU kernels `kernels` allows.
pub fn choose<'a>(
    arch: &'a Architecture,
    device: &Device,
    compute: ComputePath,
    kernels: KernelOptions,
) -> Box<dyn Executor + 'a> {
    let host = device.is_cpu() && compute == ComputePath::Fast;
    if host {
        if let Some(mlp) = host_mlp::HostMlp::of(arch) {
            return Box::new(mlp);
        }
        if host_cnn::HostCnn::applies(arch) {
            return Box::new(host_cnn::HostCnn { arch });
        }
    }
    Box::new(candle::Candle { arch, device: device.clone(), kernels })
}

/// One batch's mean loss, its errors and its examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchMetrics {
    pub loss: f64,
    pub errors: usize,
    pub examples: usize,
}

/// Computes a network: evaluates states, evaluates a reset grid's variants with prefix reuse and
/// recalibration, and makes trainers.
pub trait Executor {
    /// What logs call it.
    fn name(&self) -> &'static str;

    /// Mean loss and error of `state` on the examples of `set`, in evaluation mode.
    fn evaluate(&self, state: &State, set: &EvalSet<'_>) -> Result<Metrics>;

    /// The metrics of each of `variants` (per set, then per variant), all sharing `trained`'s
    /// weights before top-level layer `entry`: the activations entering `entry` are computed
    /// once per batch and fed to every variant. With `calibration` (training batches), each
    /// variant's BatchNorm statistics from `entry` on are first recomputed as an average over
    /// those batches (see [`crate::batchnorm`]), in place in `variants`.
    fn evaluate_variants(
        &self,
        trained: &State,
        entry: usize,
        variants: &mut [State],
        sets: &[&EvalSet<'_>],
        calibration: Option<&EvalSet<'_>>,
        on_progress: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<Metrics>>>;

    /// A trainer from `state` with `optimizer`, and its state when a run resumes.
    fn trainer(
        &self,
        state: &State,
        optimizer: Box<dyn Optimizer>,
        resumed: Option<&OptimizerState>,
    ) -> Result<Box<dyn Trainer>>;
}

/// Training steps on one executor.
pub trait Trainer {
    /// Gets ready to train on the first `examples` of `split` (candle's executor puts them on its
    /// device, once).
    fn prepare(&mut self, _split: &crate::data::Split, _examples: usize) -> Result<()> {
        Ok(())
    }

    /// One step on u8 images [n, c, h, w] from the host: the batch's mean loss and errors before
    /// the update.
    fn step(&mut self, pixels: &[u8], shape: [usize; 4], labels: &[u32], at: StepAt) -> Result<(f64, usize)>;

    /// One epoch's steps, numbered from `first_step` (0-based) with `schedule` giving each
    /// step's [`StepAt`]: each batch's metrics, in order. It stops after a batch whose loss is
    /// not finite, or may run on and let the caller find it (training stops there either way).
    /// By default each batch is gathered (and augmented) on the host and stepped on.
    fn epoch(
        &mut self,
        batches: &EpochBatches<'_>,
        first_step: u64,
        schedule: &dyn Fn(u64) -> StepAt,
        on_step: &mut dyn FnMut(),
    ) -> Result<Vec<BatchMetrics>> {
        let mut out = Vec::with_capacity(batches.len());
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for (k, range) in batches.ranges().enumerate() {
            let shape = batches.gather(range, &mut pixels, &mut labels);
            let (loss, errors) = self.step(&pixels, shape, &labels, schedule(first_step + k as u64))?;
            out.push(BatchMetrics { loss, errors, examples: shape[0] });
            on_step();
            if !loss.is_finite() {
                break;
            }
        }
        Ok(out)
    }

    /// The weights and buffers now, by state_dict name, detached from any graph. Read them, or
    /// copy them, before the next step: candle's share memory that the step writes in place.
    fn state(&self) -> Result<State>;

    /// The optimizer's buffers now, by [`crate::optim::state_key`].
    fn optimizer_state(&self) -> Result<OptimizerState>;

    /// Whether [`Trainer::step_on_device`] takes batches already on the device.
    fn steps_on_device(&self) -> bool {
        false
    }

    /// One step on a batch already on the device (inputs f32 [n, c, h, w], labels u32 [n]):
    /// the mean loss and correct count as f32 scalars left there, nothing read back.
    fn step_on_device(&mut self, _x: &Tensor, _y: &Tensor, _at: StepAt) -> Result<(Tensor, Tensor)> {
        bail!("this trainer steps on batches from the host")
    }

    /// Times every kind of layer from now on, where the trainer can (see [`LayerTimes`]).
    fn time_layers(&mut self) {}

    /// Where the steps' time went since [`Trainer::time_layers`].
    fn layer_times(&self) -> Option<&LayerTimes> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Adam, Sgd};
    use crate::test_support::values;
    use layerlab_pipeline::{Arch, ModelConfig};

    /// Three steps of each optimizer on the host's executor and on candle's (the CPU's reference)
    /// from the same weights and batches: the same weights and optimizer buffers, by name, to
    /// float rounding. The optimizer is handed over as it is: neither executor knows which it
    /// holds.
    #[test]
    fn every_executor_trains_with_every_optimizer_alike() {
        let fcn = ModelConfig { arch: Arch::Fcn, depth: 2, width: 24, ..ModelConfig::default() };
        // Without BatchNorm: a convolution bias before a BatchNorm has no gradient but rounding
        // noise, which each executor reaches its own way, and Adam's g / (|g| + ε) turns into
        // unrelated steps (`cnn.rs`'s tests floor such tensors for SGD).
        let vgg = ModelConfig {
            arch: Arch::Vgg11,
            width_mult: 0.125,
            pad_to: 32,
            batch_norm: false,
            ..ModelConfig::default()
        };
        let networks = [
            (Architecture::build(&fcn, [1, 8, 8], 10).unwrap(), [1, 8, 8]),
            (Architecture::build(&vgg, [1, 20, 20], 10).unwrap(), [1, 20, 20]),
        ];
        type Make = fn() -> Box<dyn Optimizer>;
        let optimizers: [(&str, Make); 3] = [
            ("sgd", || Box::new(Sgd { momentum: 0.9, weight_decay: 1e-3, nesterov: true })),
            ("adam", || Box::new(Adam { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 1e-3, decoupled: false })),
            ("adamw", || Box::new(Adam { betas: [0.8, 0.99], eps: 1e-6, weight_decay: 1e-2, decoupled: true })),
        ];
        for (arch, [c, h, w]) in &networks {
            let state = arch.initial_state(5, &Device::Cpu).unwrap();
            for (name, optimizer) in optimizers {
                let trained = |compute| {
                    let executor = choose(arch, &Device::Cpu, compute, KernelOptions::default());
                    let mut trainer = executor.trainer(&state, optimizer(), None).unwrap();
                    let mut rng = crate::random::rng(9);
                    for number in 1..=3 {
                        let n = 6;
                        let pixels: Vec<u8> =
                            (0..n * c * h * w).map(|_| (crate::random::unit_f64(&mut rng) * 255.0) as u8).collect();
                        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + number as u32) % 10).collect();
                        let at = StepAt { lr: 0.01, number };
                        trainer.step(&pixels, [n, *c, *h, *w], &labels, at).unwrap();
                    }
                    (executor.name(), trainer.state().unwrap(), trainer.optimizer_state().unwrap())
                };
                let (host, host_state, host_buffers) = trained(ComputePath::Fast);
                let (reference, candle_state, candle_buffers) = trained(ComputePath::Autograd);
                assert_ne!(host, reference, "{}: two executors", arch.name);
                let what = format!("{} under {name}", arch.name);
                assert_eq!(
                    host_buffers.keys().collect::<Vec<_>>(),
                    candle_buffers.keys().collect::<Vec<_>>(),
                    "{what}: buffers"
                );
                let prefix = if name == "sgd" { "momentum/" } else { "exp_avg" };
                assert!(host_buffers.keys().all(|k| k.starts_with(prefix)), "{what}: {:?}", host_buffers.keys());
                for (kind, ours, theirs) in
                    [("weights", &host_state, &candle_state), ("buffers", &host_buffers, &candle_buffers)]
                {
                    for (tensor, t) in ours {
                        let (a, b) = (values(t), values(&theirs[tensor]));
                        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                        let gap = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                        assert!(gap < 1e-4, "{what}: {kind} {tensor} differ by {gap:e} (relative)");
                    }
                }
                let moved = host_state.iter().filter(|(k, v)| values(v) != values(&state[*k])).count();
                assert!(moved > 0, "{what}: no weight moved");
            }
        }
    }
}
