//! What a measurement is taken on ([`EvalSet`]: a test set, a train subset, calibration
//! batches) and what it gives ([`Metrics`]): loss and error, accumulated over batches on the host
//! ([`Accumulator`]) or read from the device once ([`PendingMetrics`]). The executors
//! ([`crate::exec`]) compute them.

use std::cell::OnceCell;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::data::Split;
use crate::resident::ResidentSplit;

/// Mean loss and error rate over a set of examples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
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
