//! What the library's unit tests share: small networks, random splits, CIFAR-10 files in their
//! binary layout, and bit-for-bit comparison of tensors and states.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use layerlab_pipeline::{Arch, ModelConfig};
use rand_core::RngCore;

use crate::data::{cifar, Split};
use crate::model::{Architecture, State};

/// An FCN of `depth` hidden layers of `width` on `input`, PyTorch's initialization.
pub(crate) fn fcn(depth: u32, width: u32, input: [usize; 3], classes: usize) -> Architecture {
    let cfg = ModelConfig { arch: Arch::Fcn, depth, width, batch_norm: false, ..ModelConfig::default() };
    Architecture::build(&cfg, input, classes).expect("a small FCN builds")
}

/// `n` images of `shape` with seeded random pixels, and labels cycling through the 10 classes.
pub(crate) fn random_split(n: usize, shape: [usize; 3], seed: u64) -> Split {
    let mut rng = crate::random::rng(seed);
    let [channels, height, width] = shape;
    Split {
        images: (0..n * channels * height * width).map(|_| rng.next_u32() as u8).collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        channels,
        height,
        width,
    }
}

/// The f32 bits of a tensor's values, whatever its device and float type.
pub(crate) fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|v| v.to_bits()).collect()
}

/// A tensor's values as f32, whatever its device and float type.
pub(crate) fn values(t: &Tensor) -> Vec<f32> {
    let values = t.to_device(&Device::Cpu).and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.flatten_all());
    values.and_then(|t| t.to_vec1::<f32>()).expect("a float tensor")
}

/// Every tensor of a state as its bits, by name: two states compare equal only bit for bit.
pub(crate) fn state_bits(state: &State) -> BTreeMap<String, Vec<u32>> {
    state.iter().map(|(name, t)| (name.clone(), bits(t))).collect()
}

/// A CIFAR-10 batch of `n` records whose labels cycle through the classes from `seed` and whose
/// pixels encode the record, the plane and the position.
pub(crate) fn cifar_batch(n: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for r in 0..n {
        let mut pixels = [0u8; cifar::IMAGE_BYTES];
        for (i, p) in pixels.iter_mut().enumerate() {
            *p =
                (r as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add((i / 1024) as u8 * 85).wrapping_add(i as u8);
        }
        out.extend(cifar::encode_record(((r + seed as usize) % cifar::CLASSES) as u8, &pixels));
    }
    out
}

/// The six CIFAR-10 batch files of `n` records each, by name; the `i`th file is `cifar_batch(n, i)`.
pub(crate) fn cifar_batches(n: usize) -> Vec<(String, Vec<u8>)> {
    cifar::batch_files().enumerate().map(|(i, name)| (name.to_string(), cifar_batch(n, i as u8))).collect()
}

/// Writes [`cifar_batches`] of `n` records into `dir`.
pub(crate) fn write_cifar_batches(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).expect("a temporary folder");
    for (name, bytes) in cifar_batches(n) {
        std::fs::write(dir.join(name), bytes).expect("a temporary folder");
    }
}
