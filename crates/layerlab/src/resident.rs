//! Datasets held on the compute device, for the candle path (a GPU, or `train.compute =
//! "autograd"`): examples uploaded once, batches gathered there by position
//! ([`crate::kernels::pixels`]). Each batch's loss and correct count stay there too, until an
//! epoch or an evaluation ends ([`crate::eval::PendingMetrics`]).
//!
//! Why: on a GPU, every copy from pageable host memory and every scalar read makes the host wait
//! for the GPU's queue to drain. Uploading each batch and reading each step's loss did that three
//! or four times a step, so the host could never queue a step while the GPU ran the last one.
//! Now a training epoch uploads its order and augmentation once, and reads its losses once.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use crate::data::Split;
use crate::kernels::pixels::{Gather, Shift};

/// Some examples of a split, in a chosen order, as u8 images [N, c, h, w] and u32 labels [N] on
/// one device.
pub struct ResidentSplit {
    images: Tensor,
    labels: Tensor,
}

impl ResidentSplit {
    /// Uploads the examples `indices` of `split`, in that order: position i holds `indices[i]`.
    pub fn upload(split: &Split, indices: &[usize], device: &Device) -> Result<ResidentSplit> {
        let size = split.image_size();
        let mut pixels = Vec::with_capacity(indices.len() * size);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend_from_slice(&split.images[i * size..(i + 1) * size]);
            labels.push(split.labels[i] as u32);
        }
        let images = Tensor::from_vec(pixels, split.batch_dims(indices.len()).to_vec(), device)
            .with_context(|| format!("cannot hold {} images on {device:?}", indices.len()))?;
        let labels = Tensor::from_vec(labels, indices.len(), device)?;
        Ok(ResidentSplit { images, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn device(&self) -> &Device {
        self.images.device()
    }

    /// The batch of the examples at `positions` (u32 [n] on this device), each under its packed
    /// [`Shift`] in `shifts` (u32 [n]): inputs f32 [n, c, h, w] (pixels / 255) and labels u32 [n].
    pub fn batch(&self, positions: &Tensor, shifts: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.images.apply_op3_no_bwd(positions, shifts, &Gather)?;
        let y = self.labels.index_select(positions, 0)?;
        Ok((x, y))
    }

    /// Positions `0..len` and no shifts, as tensors on this device: for evaluation batches,
    /// which take consecutive pieces of them.
    pub fn in_order(&self) -> Result<(Tensor, Tensor)> {
        let n = self.len();
        let positions = Tensor::arange(0u32, n as u32, self.device())?;
        let shifts = Tensor::full(Shift::NONE.packed(), n, self.device())?;
        Ok((positions, shifts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batches::augment;
    use crate::kernels::pixels::gather_values;
    use crate::test_support::{bits, random_split};

    fn split(n: usize) -> Split {
        random_split(n, [3, 6, 5], 4)
    }

    #[test]
    fn a_resident_batch_is_the_host_batch_bit_for_bit() {
        let s = split(9);
        let held: Vec<usize> = vec![8, 2, 5, 0, 7];
        let data = ResidentSplit::upload(&s, &held, &Device::Cpu).unwrap();
        let picked = [3usize, 1, 4, 1];
        // The host path: copy the images, augment them with the stream, scale.
        let mut rng = crate::random::augment_rng(3, 1);
        let mut pixels = Vec::new();
        for &p in &picked {
            pixels.extend_from_slice(&s.images[held[p] * 90..][..90]);
        }
        augment(&mut pixels, [picked.len(), 3, 6, 5], &mut rng);
        let host: Vec<u32> = pixels.iter().map(|&p| (p as f32 / 255.0).to_bits()).collect();
        // The resident path: the same stream drawn per image, gathered by position.
        let mut rng = crate::random::augment_rng(3, 1);
        let shifts: Vec<u32> = picked.iter().map(|_| Shift::draw(&mut rng).packed()).collect();
        let positions = Tensor::new(picked.map(|p| p as u32).as_slice(), &Device::Cpu).unwrap();
        let shifts = Tensor::new(shifts.as_slice(), &Device::Cpu).unwrap();
        let (x, y) = data.batch(&positions, &shifts).unwrap();
        assert_eq!(x.dims(), [4, 3, 6, 5]);
        let got = bits(&x);
        assert_eq!(got, host);
        let labels: Vec<u32> = picked.iter().map(|&p| s.labels[held[p]] as u32).collect();
        assert_eq!(y.to_vec1::<u32>().unwrap(), labels);
        // The op's CPU side is the kernel function itself.
        let positions: Vec<u32> = picked.iter().map(|&p| p as u32).collect();
        let again = gather_values(
            &data.images.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            &positions,
            &shifts.to_vec1::<u32>().unwrap(),
            [3, 6, 5],
        );
        assert_eq!(again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), got);
    }

    #[test]
    fn a_position_past_the_held_examples_is_refused() {
        let data = ResidentSplit::upload(&split(4), &[0, 1], &Device::Cpu).unwrap();
        let positions = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let shifts = Tensor::new(&[0u32, 0], &Device::Cpu).unwrap();
        let err = data.batch(&positions, &shifts).unwrap_err();
        assert!(format!("{err:#}").contains("position 2 is past the 2 images"), "{err:#}");
    }
}
