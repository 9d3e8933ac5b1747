//! The fully connected executor on the host: [`crate::mlp`]'s buffers and kernels behind
//! [`Executor`] and [`Trainer`].

use anyhow::{bail, Result};
use candle_core::Device;

use super::{Executor, Trainer};
use crate::batches::batch_f32;
use crate::eval::{Accumulator, EvalSet, Metrics};
use crate::mlp::{MlpForward, MlpPlan, MlpTrainer};
use crate::model::{push_scaled_pixels, Architecture, State};
use crate::optim::{Optimizer, OptimizerState, StepAt};

/// A fully connected network on the CPU.
pub struct HostMlp<'a> {
    pub arch: &'a Architecture,
    pub plan: MlpPlan,
}

impl<'a> HostMlp<'a> {
    /// The executor for `arch`, when it is a fully connected network.
    pub fn of(arch: &'a Architecture) -> Option<HostMlp<'a>> {
        MlpPlan::of(arch).map(|plan| HostMlp { arch, plan })
    }
}

impl Executor for HostMlp<'_> {
    fn name(&self) -> &'static str {
        "the host's fully connected kernels"
    }

    fn evaluate(&self, state: &State, set: &EvalSet<'_>) -> Result<Metrics> {
        let mut acc = Accumulator::default();
        let mut net = MlpForward::new(&self.plan, state)?;
        let mut x = Vec::new();
        for chunk in set.indices.chunks(set.batch) {
            let labels = batch_f32(set.split, chunk, &mut x);
            let (loss, errors) = net.loss_and_errors(&x, &labels);
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
        if calibration.is_some() {
            bail!("{} has no BatchNorm to recalibrate", self.arch.name);
        }
        let from = self.plan.dense_before(entry);
        let mut shared = MlpForward::new(&self.plan, trained)?;
        let mut nets = variants.iter().map(|v| MlpForward::new(&self.plan, v)).collect::<Result<Vec<_>>>()?;
        let mut x = Vec::new();
        let mut results = Vec::with_capacity(sets.len());
        for set in sets {
            let mut accs = vec![Accumulator::default(); variants.len()];
            for chunk in set.indices.chunks(set.batch) {
                let labels = batch_f32(set.split, chunk, &mut x);
                let prefix: &[f32] = if from == 0 { &x } else { shared.run(&x, chunk.len(), 0, from) };
                for (net, acc) in nets.iter_mut().zip(accs.iter_mut()) {
                    let (loss, errors) = net.loss_and_errors_from(prefix, &labels, from);
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
        let trainer = MlpTrainer::new(&self.plan, state, optimizer, resumed)?;
        Ok(Box::new(HostMlpTrainer { trainer, inputs: Vec::new() }))
    }
}

/// [`MlpTrainer`] with its input buffer.
struct HostMlpTrainer {
    trainer: MlpTrainer,
    inputs: Vec<f32>,
}

impl Trainer for HostMlpTrainer {
    fn step(&mut self, pixels: &[u8], _shape: [usize; 4], labels: &[u32], at: StepAt) -> Result<(f64, usize)> {
        self.inputs.clear();
        push_scaled_pixels(pixels, &mut self.inputs);
        self.trainer.step(&self.inputs, labels, at)
    }

    fn state(&self) -> Result<State> {
        self.trainer.state(&Device::Cpu)
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        self.trainer.optimizer_state(&Device::Cpu)
    }
}
