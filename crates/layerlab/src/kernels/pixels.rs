//! Batches gathered where the dataset lives: u8 images picked by position, shifted and flipped
//! (the training augmentation) and scaled to f32 pixels / 255, in one pass.
//!
//! On a GPU (the `cuda` feature) this is one CUDA kernel over a dataset uploaded once
//! ([`crate::resident`]): no batch crosses the bus, and no copy from pageable host memory makes
//! the host wait for the GPU at every step. The CPU op here is the reference the GPU kernel is
//! tested against, and the path of candle autograd on the CPU (`train.compute = "autograd"`). The
//! host-side augmentation of the fast paths ([`crate::batches::augment`]) takes each pixel from the
//! same [`source_pixel`], so every path sees the same batch.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape};
use rand_core::RngCore;
use rayon::prelude::*;

/// One image's augmentation: its content moved by (`dy`, `dx`) pixels, each in −4..=4, with zeros
/// shifted in (a random crop of the image padded by 4), after a horizontal flip when `flip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shift {
    pub dy: i32,
    pub dx: i32,
    pub flip: bool,
}

impl Shift {
    /// The identity: evaluation batches and training without augmentation.
    pub const NONE: Shift = Shift { dy: 0, dx: 0, flip: false };

    /// The next image's augmentation from the augmentation stream: three draws, in this order.
    pub fn draw(rng: &mut impl RngCore) -> Shift {
        let dy = (rng.next_u32() % 9) as i32 - 4;
        let dx = (rng.next_u32() % 9) as i32 - 4;
        let flip = rng.next_u32() & 1 == 1;
        Shift { dy, dx, flip }
    }

    /// As one u32 (`dy + 4` in bits 0–7, `dx + 4` in bits 8–15, the flip in bit 16): the form the
    /// op and its CUDA kernel read.
    pub fn packed(self) -> u32 {
        (self.dy + 4) as u32 | ((self.dx + 4) as u32) << 8 | (self.flip as u32) << 16
    }

    fn unpacked(v: u32) -> Shift {
        Shift { dy: (v & 0xff) as i32 - 4, dx: ((v >> 8) & 0xff) as i32 - 4, flip: v >> 16 & 1 == 1 }
    }
}

/// Where output pixel (`y`, `x`) of an `h`×`w` plane comes from under `shift`, or `None` where a
/// zero is shifted in.
#[inline(always)]
pub fn source_pixel(y: usize, x: usize, h: usize, w: usize, shift: Shift) -> Option<usize> {
    let sx = if shift.flip { w - 1 - x } else { x } as isize + shift.dx as isize;
    let sy = y as isize + shift.dy as isize;
    let inside = sx >= 0 && sy >= 0 && (sx as usize) < w && (sy as usize) < h;
    inside.then(|| sy as usize * w + sx as usize)
}

/// A pixel as the networks see it: `p / 255`, correctly rounded (the CUDA kernel divides with
/// `__fdiv_rn`, so both give these bits).
#[inline(always)]
pub fn scaled(p: u8) -> f32 {
    p as f32 / 255.0
}

/// The batch `images[positions[i]]` (each image `c`×`h`×`w`), image i under `shifts[i]`, scaled.
pub fn gather_values(images: &[u8], positions: &[u32], shifts: &[u32], [c, h, w]: [usize; 3]) -> Vec<f32> {
    let size = c * h * w;
    let mut out = vec![0f32; positions.len() * size];
    out.par_chunks_mut(size.max(1)).zip(positions.par_iter().zip(shifts)).for_each(|(dst, (&p, &s))| {
        let src = &images[p as usize * size..][..size];
        let shift = Shift::unpacked(s);
        for ch in 0..c {
            let (plane, out_plane) = (&src[ch * h * w..][..h * w], &mut dst[ch * h * w..][..h * w]);
            for y in 0..h {
                for x in 0..w {
                    out_plane[y * w + x] = source_pixel(y, x, h, w, shift).map_or(0.0, |i| scaled(plane[i]));
                }
            }
        }
    });
    out
}

/// The op over (images u8 [N, c, h, w], positions u32 [n], packed shifts u32 [n]) → f32
/// [n, c, h, w]. It has no gradient: it makes a network's input.
pub(crate) struct Gather;

impl Gather {
    /// Checks the operands and gives (N, [c, h, w], n).
    pub(crate) fn dims(images: &Layout, positions: &Layout, shifts: &Layout) -> candle_core::Result<[usize; 5]> {
        let &[count, c, h, w] = images.dims() else {
            bail!("batch gather wants images [N, c, h, w], got {:?}", images.dims())
        };
        let &[n] = positions.dims() else { bail!("batch gather wants positions [n], got {:?}", positions.dims()) };
        if shifts.dims() != [n] {
            bail!("batch gather: {n} positions but shifts {:?}", shifts.dims())
        }
        if !(images.is_contiguous() && positions.is_contiguous() && shifts.is_contiguous()) {
            bail!("batch gather wants contiguous operands")
        }
        Ok([count, c, h, w, n])
    }
}

impl CustomOp3 for Gather {
    fn name(&self) -> &'static str {
        "layerlab-batch-gather"
    }

    fn cpu_fwd(
        &self,
        images: &CpuStorage,
        li: &Layout,
        positions: &CpuStorage,
        lp: &Layout,
        shifts: &CpuStorage,
        ls: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [count, c, h, w, n] = Gather::dims(li, lp, ls)?;
        let (CpuStorage::U8(images), CpuStorage::U32(positions), CpuStorage::U32(shifts)) = (images, positions, shifts)
        else {
            bail!("batch gather wants u8 images, u32 positions and u32 shifts")
        };
        let images = &images[li.start_offset()..][..count * c * h * w];
        let positions = &positions[lp.start_offset()..][..n];
        let shifts = &shifts[ls.start_offset()..][..n];
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= count) {
            bail!("batch gather: position {p} is past the {count} images held")
        }
        Ok((CpuStorage::F32(gather_values(images, positions, shifts, [c, h, w])), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        images: &candle_core::CudaStorage,
        li: &Layout,
        positions: &candle_core::CudaStorage,
        lp: &Layout,
        shifts: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = Gather::dims(li, lp, ls)?;
        super::cuda::gather_batch(images, li, positions, lp, shifts, ls, dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_pack_and_unpack() {
        for dy in -4..=4 {
            for dx in -4..=4 {
                for flip in [false, true] {
                    let s = Shift { dy, dx, flip };
                    assert_eq!(Shift::unpacked(s.packed()), s);
                }
            }
        }
    }

    #[test]
    fn gather_picks_shifts_flips_and_scales() {
        // Two 1×2×3 images: values 0..6 and 10..16.
        let images: Vec<u8> = (0..6).chain(10..16).collect();
        let none = Shift::NONE.packed();
        let flipped = Shift { dy: 0, dx: 0, flip: true }.packed();
        let moved = Shift { dy: 1, dx: -1, flip: false }.packed();
        let out = gather_values(&images, &[1, 0, 0], &[none, flipped, moved], [1, 2, 3]);
        let expect = |v: &[u8]| v.iter().map(|&p| p as f32 / 255.0).collect::<Vec<_>>();
        assert_eq!(out[..6], expect(&[10, 11, 12, 13, 14, 15])[..]);
        assert_eq!(out[6..12], expect(&[2, 1, 0, 5, 4, 3])[..]);
        // Output (y, x) takes (y + 1, x − 1): row 0 from row 1 shifted right, row 1 all zeros.
        assert_eq!(out[12..], expect(&[0, 3, 4, 0, 0, 0])[..]);
    }
}
