//! The convolutional executor on the host: [`crate::cnn`]'s forward pass, tape and kernels behind
//! [`Executor`] and [`Trainer`].

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::{Executor, Trainer};
use crate::batches::batch_activations;
use crate::cnn::{Activations, CnnForward, CnnTrainer, LayerTimes};
use crate::data::Split;
use crate::eval::{Accumulator, EvalSet, Metrics};
use crate::model::{push_scaled_pixels, Architecture, Layer, State};
use crate::optim::{Optimizer, OptimizerState, StepAt};

/// A network with convolutions on the CPU.
pub struct HostCnn<'a> {
    pub arch: &'a Architecture,
}

impl HostCnn<'_> {
    /// Whether it computes `arch`: a network with convolutions.
    pub fn applies(arch: &Architecture) -> bool {
        fn has_conv(layers: &[Layer]) -> bool {
            layers.iter().any(|l| match l {
                Layer::Conv { .. } => true,
                Layer::Residual { main, shortcut } => has_conv(main) || has_conv(shortcut),
                Layer::Pad(_)
                | Layer::Flatten
                | Layer::Linear { .. }
                | Layer::BatchNorm { .. }
                | Layer::Relu
                | Layer::MaxPool2
                | Layer::GlobalAvgPool => false,
            })
        }
        has_conv(&arch.layers)
    }
}

impl Executor for HostCnn<'_> {
    fn name(&self) -> &'static str {
        "the host's convolutional kernels"
    }

    fn evaluate(&self, state: &State, set: &EvalSet<'_>) -> Result<Metrics> {
        let mut acc = Accumulator::default();
        let net = CnnForward::new(self.arch, state)?;
        for chunk in set.indices.chunks(set.batch) {
            let (input, labels) = batch_activations(set.split, chunk)?;
            let (loss, errors) = net.loss_and_errors_from(&input, &labels, 0)?;
            acc.add(loss, errors, chunk.len());
        }
        Ok(acc.metrics())
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
        let shared = CnnForward::new(self.arch, trained)?;
        let mut nets = variants.iter().map(|v| CnnForward::new(self.arch, v)).collect::<Result<Vec<_>>>()?;
        let prefix = |split: &Split, indices: &[usize]| -> Result<(Activations, Vec<u32>)> {
            let (input, labels) = batch_activations(split, indices)?;
            Ok((shared.run(&input, 0, entry)?, labels))
        };
        if let Some(cal) = calibration {
            let prefixes =
                cal.indices.chunks(cal.batch).map(|b| Ok(prefix(cal.split, b)?.0)).collect::<Result<Vec<_>>>()?;
            for (net, v) in nets.iter_mut().zip(variants.iter_mut()) {
                for (name, values) in net.recalibrate(&prefixes, entry)? {
                    let shape = v.get(&name).with_context(|| format!("tensor '{name}' is missing"))?.shape().clone();
                    v.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
                }
            }
        }
        let mut results = Vec::with_capacity(sets.len());
        for set in sets {
            let mut accs = vec![Accumulator::default(); variants.len()];
            for chunk in set.indices.chunks(set.batch) {
                let (p, labels) = prefix(set.split, chunk)?;
                for (net, acc) in nets.iter().zip(accs.iter_mut()) {
                    let (loss, errors) = net.loss_and_errors_from(&p, &labels, entry)?;
                    acc.add(loss, errors, chunk.len());
                }
            }
            results.push(accs.iter().map(Accumulator::metrics).collect());
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
        Ok(Box::new(CnnTrainer::new(self.arch, state, optimizer, resumed)?))
    }
}

impl Trainer for CnnTrainer {
    fn step(&mut self, pixels: &[u8], shape: [usize; 4], labels: &[u32], at: StepAt) -> Result<(f64, usize)> {
        let mut inputs = Vec::with_capacity(pixels.len());
        push_scaled_pixels(pixels, &mut inputs);
        CnnTrainer::step(self, inputs, shape, labels, at)
    }

    fn state(&self) -> Result<State> {
        CnnTrainer::state(self, &Device::Cpu)
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        CnnTrainer::optimizer_state(self, &Device::Cpu)
    }

    fn time_layers(&mut self) {
        CnnTrainer::time_layers(self)
    }

    fn layer_times(&self) -> Option<&LayerTimes> {
        CnnTrainer::layer_times(self)
    }
}
