//! Initial distributions: how each tensor's first values are drawn.
//!
//! Formulas follow PyTorch's defaults (`torch.nn.Linear.reset_parameters`, `torch.nn.Conv2d`):
//! weight and bias ~ U(−1/√fan_in, 1/√fan_in), fan_in = in_features or in_channels × kh × kw; or
//! Kaiming's normal for weights with zero biases. BatchNorm starts at weight 1, bias 0, running
//! mean 0 and variance 1. The streams the values come from are in [`crate::random`]; which tensor
//! gets which distribution is in [`crate::model`].

use rand_core::RngCore;

use crate::random::unit_f64;
use layerlab_pipeline::WeightInit;

/// How a tensor's initial values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Uniform { bound: f64 },
    Normal { std: f64 },
    Const(f64),
}

/// The distributions of a Linear or Conv layer's (weight, bias) under a scheme.
pub fn weight_and_bias(scheme: WeightInit, fan_in: usize) -> (Init, Init) {
    match scheme {
        WeightInit::KaimingNormal => (Init::Normal { std: (2.0 / fan_in as f64).sqrt() }, Init::Const(0.0)),
        WeightInit::Pytorch => {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (Init::Uniform { bound }, Init::Uniform { bound })
        }
    }
}

/// Fills `n` values from `init`.
pub fn draw(init: Init, n: usize, rng: &mut impl RngCore) -> Vec<f32> {
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { bound } => (0..n).map(|_| ((2.0 * unit_f64(rng) - 1.0) * bound) as f32).collect(),
        Init::Normal { std } => (0..n)
            .map(|_| {
                // Box–Muller; 1 − u keeps the logarithm finite.
                let u1 = 1.0 - unit_f64(rng);
                let u2 = unit_f64(rng);
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::rng;

    #[test]
    fn uniform_draws_stay_in_bounds_and_fill_them() {
        let v = draw(Init::Uniform { bound: 0.5 }, 10_000, &mut rng(1));
        assert!(v.iter().all(|x| x.abs() <= 0.5));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        // U(−b, b) has variance b²/3.
        assert!((var - 0.25 / 3.0).abs() < 0.005, "{var}");
    }

    #[test]
    fn normal_draws_have_the_asked_spread() {
        let v = draw(Init::Normal { std: 2.0 }, 20_000, &mut rng(2));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.06 && (var.sqrt() - 2.0).abs() < 0.05, "{mean} {var}");
    }
}
