//! Initial values and re-randomization draws, from seeded generators of our own.
//!
//! candle's CPU generator cannot be seeded, so every random value is drawn here from ChaCha8
//! streams. Each unit gets its own stream, derived from a seed and the unit's name, so a unit's
//! values do not depend on the order in which units are drawn.
//! Formulas follow PyTorch's defaults (`torch.nn.Linear.reset_parameters`, `torch.nn.Conv2d`):
//! weight and bias ~ U(−1/√fan_in, 1/√fan_in), fan_in = in_features or in_channels × kh × kw.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::model::{Architecture, State, Unit};

/// How a tensor's initial values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Uniform { bound: f64 },
    Normal { std: f64 },
    Const(f64),
}

/// A 64-bit seed derived from labelled parts, e.g. `["init", "seed=0", "fc1"]`.
pub fn derive_seed(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A uniform f64 in [0, 1) with 53 random bits.
pub fn unit_f64(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
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

/// Fresh values for every tensor of one unit, from a stream seeded with `seed`.
pub fn draw_unit(unit: &Unit, seed: u64, device: &Device) -> Result<State> {
    let mut r = rng(seed);
    let mut out = State::new();
    for spec in &unit.tensors {
        let n = spec.shape.iter().product();
        let values = draw(spec.init, n, &mut r);
        out.insert(spec.name.clone(), Tensor::from_vec(values, spec.shape.clone(), device)?);
    }
    Ok(out)
}

/// The seed of a unit's initial values for a training seed.
pub fn init_seed(training_seed: u64, unit: &str) -> u64 {
    derive_seed(&["init", &training_seed.to_string(), unit])
}

/// The seed of a re-randomization draw, independent of evaluation order.
pub fn rerandomize_seed(experiment: &str, training_seed: u64, unit: &str, draw: u32) -> u64 {
    derive_seed(&["rerandomize", experiment, &training_seed.to_string(), unit, &draw.to_string()])
}

/// The initial weights of a whole network for a training seed.
pub fn initial_state(arch: &Architecture, training_seed: u64, device: &Device) -> Result<State> {
    let mut state = State::new();
    for unit in &arch.units {
        state.extend(draw_unit(unit, init_seed(training_seed, &unit.name), device)?);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn seeds_differ_by_every_part() {
        let a = rerandomize_seed("e", 0, "fc1", 0);
        assert_ne!(a, rerandomize_seed("e", 0, "fc1", 1));
        assert_ne!(a, rerandomize_seed("e", 1, "fc1", 0));
        assert_ne!(a, rerandomize_seed("e", 0, "fc2", 0));
        assert_eq!(a, rerandomize_seed("e", 0, "fc1", 0));
        // Parts are length-prefixed, so moving a boundary changes the seed.
        assert_ne!(derive_seed(&["ab", "c"]), derive_seed(&["a", "bc"]));
    }
}
