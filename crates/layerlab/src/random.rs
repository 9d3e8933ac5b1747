//! Every random stream of layerlab, from seeded ChaCha8 generators of our own.
//!
//! candle's CPU generator cannot be seeded, so nothing random comes from candle. Each use has its
//! own stream, seeded by a hash of labelled parts (what it is for, the training seed, the epoch,
//! the unit), so that a stream does not depend on the order in which others are drawn and a run
//! on another device starts from the same bytes. The labels are part of the results: changing one
//! changes every number downstream.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// A 64-bit seed derived from labelled parts, e.g. `["init", "0", "fc1"]`.
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

/// The seed of a unit's initial values for a training seed.
pub fn init_seed(training_seed: u64, unit: &str) -> u64 {
    derive_seed(&["init", &training_seed.to_string(), unit])
}

/// The seed of a re-randomization draw, independent of evaluation order.
pub fn rerandomize_seed(experiment: &str, training_seed: u64, unit: &str, draw: u32) -> u64 {
    derive_seed(&["rerandomize", experiment, &training_seed.to_string(), unit, &draw.to_string()])
}

/// The stream of an epoch's augmentation (crops and flips).
pub fn augment_rng(training_seed: u64, epoch: u32) -> ChaCha8Rng {
    rng(derive_seed(&["augment", &training_seed.to_string(), &epoch.to_string()]))
}

/// The stream that picks which training labels `train.label_noise` replaces, and by which class.
pub fn label_noise_rng(training_seed: u64) -> ChaCha8Rng {
    rng(derive_seed(&["label-noise", &training_seed.to_string()]))
}

/// A seeded permutation of `0..n`: the order of an epoch's training examples.
pub fn epoch_order(n: usize, training_seed: u64, epoch: u32) -> Vec<usize> {
    permutation(n, derive_seed(&["shuffle", &training_seed.to_string(), &epoch.to_string()]))
}

/// The fixed training subset on which reset-eval measures train error: `size` indices, sorted.
pub fn train_subset(n: usize, training_seed: u64, size: usize) -> Vec<usize> {
    let mut subset = epoch_order(n, derive_seed(&["train-subset", &training_seed.to_string()]), 0);
    subset.truncate(size);
    subset.sort_unstable();
    subset
}

/// The order of the training examples whose batches recompute BatchNorm statistics.
pub fn calibration_order(n: usize, training_seed: u64) -> Vec<usize> {
    epoch_order(n, derive_seed(&["calibrate", &training_seed.to_string()]), 0)
}

/// Fisher–Yates over `0..n`.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut r = rng(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (r.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(1000, 0, 1);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, 0, 1));
        assert_ne!(a, epoch_order(1000, 0, 2));
        assert_ne!(a, epoch_order(1000, 1, 1));
    }

    #[test]
    fn train_subset_is_sorted_distinct_and_seeded() {
        let s = train_subset(500, 3, 100);
        assert_eq!(s.len(), 100);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s, train_subset(500, 3, 100));
        assert_ne!(s, train_subset(500, 4, 100));
    }
}
