//! Batches on the host: a training epoch's examples in order, their augmentation, and pixels
//! scaled to f32 for the host executors.
//!
//! The augmentation of every example of an epoch is drawn up front, in order, from the epoch's
//! stream: the host executors apply it batch by batch ([`apply_shifts`]), candle's executor hands
//! it to its device gather; both take each pixel from the same
//! [`crate::kernels::pixels::source_pixel`], so every executor sees the same batches.

use std::ops::Range;

use anyhow::Result;
use rand_core::RngCore;

use crate::cnn::Activations;
use crate::data::Split;
use crate::kernels::pixels::{source_pixel, Shift};
use crate::model::push_scaled_pixels;

/// One epoch of training batches: which examples, in which order, each shifted how.
pub struct EpochBatches<'a> {
    pub split: &'a Split,
    /// Positions in `split`, in the order of the steps.
    pub order: Vec<usize>,
    /// Each example's augmentation, in `order`'s order; `None` without augmentation.
    pub shifts: Option<Vec<Shift>>,
    pub batch_size: usize,
}

impl<'a> EpochBatches<'a> {
    /// The epoch's batches of `order`, each example's shift drawn from `augmentation` in turn
    /// when there is one.
    pub fn new(
        split: &'a Split,
        order: Vec<usize>,
        batch_size: usize,
        augmentation: Option<&mut dyn RngCore>,
    ) -> EpochBatches<'a> {
        let shifts = augmentation.map(|mut rng| order.iter().map(|_| Shift::draw(&mut rng)).collect());
        EpochBatches { split, order, shifts, batch_size: batch_size.max(1) }
    }

    /// The number of steps.
    pub fn len(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Each step's positions in `order`.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let n = self.order.len();
        (0..n).step_by(self.batch_size).map(move |start| start..(start + self.batch_size).min(n))
    }

    /// The batch at `range` of `order` as u8 images (augmented) into `pixels` and labels into
    /// `labels`; its shape [n, c, h, w].
    pub fn gather(&self, range: Range<usize>, pixels: &mut Vec<u8>, labels: &mut Vec<u32>) -> [usize; 4] {
        let split = self.split;
        let size = split.image_size();
        let chunk = &self.order[range.clone()];
        pixels.clear();
        labels.clear();
        for &i in chunk {
            pixels.extend_from_slice(&split.images[i * size..(i + 1) * size]);
            labels.push(split.labels[i] as u32);
        }
        let shape = [chunk.len(), split.channels, split.height, split.width];
        if let Some(shifts) = &self.shifts {
            apply_shifts(pixels, shape, &shifts[range]);
        }
        shape
    }
}

/// Random crop (zero padding 4) and horizontal flip of u8 images [n, c, h, w], in place: each
/// image's [`Shift`] drawn from `rng` in turn.
pub fn augment(pixels: &mut [u8], shape: [usize; 4], rng: &mut impl RngCore) {
    let shifts: Vec<Shift> = (0..shape[0]).map(|_| Shift::draw(rng)).collect();
    apply_shifts(pixels, shape, &shifts);
}

/// Each image of u8 images [n, c, h, w] moved by its shift, in place, each pixel taken by
/// [`source_pixel`] (the rule the device gather follows too).
pub fn apply_shifts(pixels: &mut [u8], shape: [usize; 4], shifts: &[Shift]) {
    let [n, c, h, w] = shape;
    let size = c * h * w;
    let mut scratch = vec![0u8; size];
    for (img, &shift) in pixels.chunks_exact_mut(size).take(n).zip(shifts) {
        for ch in 0..c {
            let plane = &img[ch * h * w..][..h * w];
            for y in 0..h {
                for x in 0..w {
                    scratch[ch * h * w + y * w + x] = source_pixel(y, x, h, w, shift).map_or(0, |i| plane[i]);
                }
            }
        }
        img.copy_from_slice(&scratch);
    }
}

/// One batch as f32 inputs (pixels / 255, into `x`) and its labels.
pub fn batch_f32(split: &Split, indices: &[usize], x: &mut Vec<f32>) -> Vec<u32> {
    let size = split.image_size();
    x.clear();
    for &i in indices {
        push_scaled_pixels(&split.images[i * size..(i + 1) * size], x);
    }
    indices.iter().map(|&i| split.labels[i] as u32).collect()
}

/// One batch as the convolutional host executor's input activations, and its labels.
pub fn batch_activations(split: &Split, indices: &[usize]) -> Result<(Activations, Vec<u32>)> {
    let mut x = Vec::with_capacity(indices.len() * split.image_size());
    let labels = batch_f32(split, indices, &mut x);
    Ok((Activations::input(x, split.batch_dims(indices.len()))?, labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random;

    #[test]
    fn augmentation_keeps_pixels_and_shifts_them() {
        let shape = [1, 1, 8, 8];
        let original: Vec<u8> = (0..64).map(|v| v as u8 + 1).collect();
        let mut r = random::rng(3);
        let mut moved = false;
        for _ in 0..20 {
            let mut img = original.clone();
            augment(&mut img, shape, &mut r);
            // Every non-zero pixel is one of the originals.
            assert!(img.iter().all(|&p| p == 0 || original.contains(&p)));
            moved |= img != original;
        }
        assert!(moved);
    }

    /// An epoch's batches, shifts drawn up front, equal batches augmented one by one from the
    /// same stream (the order the host paths drew them in before).
    #[test]
    fn shifts_drawn_up_front_equal_shifts_drawn_per_batch() {
        let mut r = random::rng(5);
        let split = Split {
            images: (0..7 * 2 * 6 * 5).map(|_| r.next_u32() as u8).collect(),
            labels: (0..7).map(|i| i as u8).collect(),
            channels: 2,
            height: 6,
            width: 5,
        };
        let order = vec![3, 0, 6, 1, 5, 2, 4];
        let mut up_front = random::rng(9);
        let batches = EpochBatches::new(&split, order.clone(), 3, Some(&mut up_front));
        assert_eq!(batches.len(), 3);
        let mut per_batch = random::rng(9);
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for (range, chunk) in batches.ranges().zip(order.chunks(3)) {
            let shape = batches.gather(range, &mut pixels, &mut labels);
            let mut expected: Vec<u8> = chunk.iter().flat_map(|&i| split.images[i * 60..][..60].to_vec()).collect();
            augment(&mut expected, shape, &mut per_batch);
            assert_eq!(pixels, expected);
            assert_eq!(labels, chunk.iter().map(|&i| i as u32).collect::<Vec<_>>());
        }
    }
}
