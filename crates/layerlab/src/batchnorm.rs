//! BatchNorm's statistics rule, the one home every executor takes it from: the constants,
//! PyTorch's running average (training), and the recomputation as a plain average over
//! calibration batches (the reset grid's `recalibrate`, PyTorch's `momentum=None`).
//!
//! Each rule is written for host values (the host executors) and for candle tensors (candle's
//! executor), tested against each other below; a GPU's training step updates the running
//! statistics in one CUDA kernel with the same operations (`kernels::cuda::running_stats`).
//! Which statistics a reset keeps (`reset.bn_stats = "keep"`) is [`is_running_stat`].

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::Tensor;

/// PyTorch's default `momentum`: the weight of a new batch in the running statistics.
pub const MOMENTUM: f64 = 0.1;
/// PyTorch's default `eps`, added to the variance before its square root.
pub const EPS: f64 = 1e-5;

/// Whether tensor `name` is a running statistic (not trained, left out of weight decay, kept by
/// `reset.bn_stats = "keep"`).
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// n / (n − 1) for a batch statistic over `count` values: PyTorch keeps the unbiased variance.
pub fn unbiased_factor(count: usize) -> f64 {
    count as f64 / (count as f64 - 1.0).max(1.0)
}

/// Training, on host values: running ← running·(1 − m) + (batch·factor)·m, where `factor` is 1
/// for the mean and [`unbiased_factor`] for the variance.
pub fn update_running_values(running: &mut [f32], batch: &[f32], factor: f32) {
    let keep = (1.0 - MOMENTUM) as f32;
    let take = MOMENTUM as f32;
    for (r, b) in running.iter_mut().zip(batch) {
        *r = *r * keep + (b * factor) * take;
    }
}

/// Training, on tensors: running·(1 − m) + batch·m (`batch` already unbiased for the variance).
pub fn updated_running_tensor(running: &Tensor, batch: &Tensor) -> Result<Tensor> {
    Ok(((running * (1.0 - MOMENTUM))? + (batch * MOMENTUM)?)?)
}

/// Recalibration on host values: each statistic's sum over the calibration batches, then its
/// mean ([`CalibrationSums::means`]).
#[derive(Debug, Default)]
pub struct CalibrationSums {
    sums: BTreeMap<String, Vec<f32>>,
}

impl CalibrationSums {
    /// One batch's statistic `name` (its mean, or its unbiased variance).
    pub fn add(&mut self, name: String, batch: Vec<f32>) {
        match self.sums.entry(name) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(batch);
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                e.get_mut().iter_mut().zip(&batch).for_each(|(s, b)| *s += b);
            }
        }
    }

    /// Every statistic averaged over `batches` batches, by name.
    pub fn means(self, batches: usize) -> Vec<(String, Vec<f32>)> {
        let scale = (1.0 / batches.max(1) as f64) as f32;
        self.sums
            .into_iter()
            .map(|(name, mut sum)| {
                sum.iter_mut().for_each(|v| *v *= scale);
                (name, sum)
            })
            .collect()
    }
}

/// Recalibration on tensors, as [`CalibrationSums`] on host values.
#[derive(Debug, Default)]
pub struct CalibrationTensorSums {
    sums: BTreeMap<String, Tensor>,
}

impl CalibrationTensorSums {
    /// One batch's statistic `name`.
    pub fn add(&mut self, name: String, batch: Tensor) -> Result<()> {
        let entry = match self.sums.remove(&name) {
            Some(s) => (s + batch)?,
            None => batch,
        };
        self.sums.insert(name, entry);
        Ok(())
    }

    /// Every statistic averaged over `batches` batches, by name.
    pub fn means(self, batches: usize) -> Result<Vec<(String, Tensor)>> {
        let n = batches.max(1) as f64;
        self.sums.into_iter().map(|(name, sum)| Ok((name, (sum / n)?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::bits as values;
    use candle_core::Device;

    /// Both forms of both rules from the same values: the same bits.
    #[test]
    fn host_values_and_tensors_follow_the_same_rule() {
        let mut r = crate::random::rng(4);
        let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| crate::random::unit_f64(&mut r) as f32).collect() };
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let (running, batch) = (draw(37), draw(37));
        let mut host = running.clone();
        update_running_values(&mut host, &batch, 1.0);
        assert_eq!(
            host.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            values(&updated_running_tensor(&t(&running), &t(&batch)).unwrap())
        );

        let batches: Vec<Vec<f32>> = (0..3).map(|_| draw(11)).collect();
        let (mut on_host, mut on_tensors) = (CalibrationSums::default(), CalibrationTensorSums::default());
        for b in &batches {
            on_host.add("bn.running_mean".into(), b.clone());
            on_tensors.add("bn.running_mean".into(), t(b)).unwrap();
        }
        let (h, ts) = (on_host.means(3), on_tensors.means(3).unwrap());
        assert_eq!(h[0].1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), values(&ts[0].1));
        // And the mean is a mean.
        let want = (batches[0][5] + batches[1][5] + batches[2][5]) / 3.0;
        assert!((h[0].1[5] - want).abs() < 1e-6);
        assert_eq!(unbiased_factor(5), 1.25);
        assert_eq!(unbiased_factor(1), 1.0);
    }
}
