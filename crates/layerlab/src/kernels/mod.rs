//! layerlab's own CPU kernels, one file (or folder) per kernel, each a candle custom op (or a
//! plain function on f32 slices) with its own backward where training needs one:
//!
//! - [`gemm`]: the one matrix-product wrapper every kernel and the fully connected path use;
//! - [`conv2d`]: convolution, forward and both gradients: direct kernels for same-size 3×3 layers
//!   (AVX-512; with only AVX2 and FMA, the forward pass and input gradient), im2col + gemm for the
//!   rest (a folder: one file per role);
//! - [`norm`]: BatchNorm in training and evaluation mode, fused;
//! - [`layers`]: ReLU, 2×2 max-pooling and the bias gradient;
//! - [`pixels`]: a batch gathered from u8 images by position, augmented and scaled;
//! - [`loss`]: softmax cross-entropy with the count of right predictions, fused;
//! - [`update`]: an optimizer step's constants as plain values, for the host and the CUDA kernel;
//! - [`options`]: which of our GPU kernels a computation uses ([`KernelOptions`]), a value
//!   handed down to every call that picks one.
//!
//! With the `cuda` feature, for tensors on a GPU: `cudnn` (convolution and training-mode
//! BatchNorm through cuDNN) and `cuda` (the SGD update, ReLU, the max-pool and the batch gather,
//! as CUDA kernels of our own compiled by NVRTC).
//!
//! Every kernel splits its work into pieces whose size depends only on the shapes, so results do
//! not depend on the thread count.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout};
use rayon::prelude::*;

pub mod conv2d;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cudnn;
pub mod gemm;
pub mod layers;
pub mod loss;
pub mod norm;
pub mod options;
pub mod pixels;
pub mod update;

pub use options::KernelOptions;

pub use conv2d::{conv2d, conv2d_backward, conv2d_bias, conv2d_candle, conv2d_grad_input, conv2d_grad_weight};

/// A custom op kept after its forward pass so that its backward pass can be called without
/// candle's autograd graph (see [`crate::backward`]): the same object candle's graph would hold.
pub type KeptOp3 = std::sync::Arc<Box<dyn candle_core::CustomOp3 + Send + Sync>>;

/// Runs `f` compiled for AVX2 when the CPU has it (and as it is otherwise).
///
/// The workspace builds for the baseline x86-64 target (SSE2), so that its binaries run on any
/// x86-64 machine; `gemm` picks its own kernels at run time, but the elementwise passes of our
/// kernels (BatchNorm, ReLU, pooling, im2col, the SGD update) were left 4 lanes wide, and some
/// not vectorized at all. `f` is inlined into a function compiled with AVX2 enabled. Results do
/// not change: without fast-math flags the compiler keeps every floating-point operation and its
/// order, whatever the vector width (sums over lanes are spelled out in the code).
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// One piece of a vector being built by [`built_in_pieces`]: its values, not yet written, and
/// how many of them are.
pub(crate) struct Piece<'a> {
    values: &'a mut [MaybeUninit<f32>],
    written: usize,
}

impl Piece<'_> {
    /// Writes `values` after those already written (as many as fit).
    #[inline(always)]
    pub(crate) fn extend(&mut self, values: impl IntoIterator<Item = f32>) {
        let mut n = 0;
        for (dst, v) in self.values[self.written..].iter_mut().zip(values) {
            dst.write(v);
            n += 1;
        }
        self.written += n;
    }

    /// The values not yet written: a kernel that writes the first `n` of them itself (with
    /// vector stores) then calls [`Piece::advance`]`(n)`.
    #[inline(always)]
    pub(crate) fn rest(&mut self) -> &mut [MaybeUninit<f32>] {
        &mut self.values[self.written..]
    }

    /// Counts `n` more values as written.
    ///
    /// # Safety
    /// The first `n` values of [`Piece::rest`] must have been written.
    #[inline(always)]
    pub(crate) unsafe fn advance(&mut self, n: usize) {
        assert!(n <= self.values.len() - self.written, "a piece advanced past its end");
        self.written += n;
    }
}

/// Values a task of [`built_in_pieces`] takes at least: late layers have 2×2 planes.
const MIN_TASK_VALUES: usize = 4096;

/// A vector of `len` values built in parallel, in pieces of `piece` values (the last one may be
/// shorter), each task taking at least [`MIN_TASK_VALUES`]: `fill(i, piece)` writes piece i's
/// values in order through [`Piece::extend`], and must write all of them (it panics otherwise).
///
/// Why: `vec![0.0; len]` writes every value once before the kernel writes it again. Freed
/// memory is kept for reuse ([`crate::stages::cli::keep_freed_memory`]), so the allocator cannot
/// hand out pages it knows are zero, and that zero-fill took about 5 % of a ResNet training
/// step (the outputs of BatchNorm and of the convolutions).
pub(crate) fn built_in_pieces(
    len: usize,
    piece: usize,
    fill: impl Fn(usize, &mut Piece<'_>) + Sync + Send,
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    let piece = piece.max(1);
    if len > 0 {
        v.spare_capacity_mut()[..len]
            .par_chunks_mut(piece)
            .with_min_len(MIN_TASK_VALUES.div_ceil(piece))
            .enumerate()
            .for_each(|(i, values)| {
                let mut p = Piece { values, written: 0 };
                fill(i, &mut p);
                assert_eq!(p.written, p.values.len(), "piece {i} of a kernel's output was not written in full");
            });
    }
    // SAFETY: the capacity is at least `len`, and every piece of the first `len` values was
    // written in full (asserted above; a panic there unwinds before this line).
    unsafe { v.set_len(len) };
    v
}

/// `v` where `keep`, else +0.0, without a branch (so that the loops around it vectorize).
#[inline(always)]
pub(crate) fn kept_or_zero(keep: bool, v: f32) -> f32 {
    f32::from_bits(v.to_bits() & (keep as u32).wrapping_neg())
}

/// The f32 values of a tensor in row-major order, copied only when the layout is strided.
pub(crate) fn f32_data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Cow<'a, [f32]>> {
    let CpuStorage::F32(data) = s else { bail!("layerlab kernels work on f32 only, got {:?}", s.dtype()) };
    if let Some((start, end)) = l.contiguous_offsets() {
        return Ok(Cow::Borrowed(&data[start..end]));
    }
    let (dims, strides) = (l.dims(), l.stride());
    let mut out = Vec::with_capacity(l.shape().elem_count());
    let mut index = vec![0usize; dims.len()];
    if dims.contains(&0) {
        return Ok(Cow::Owned(out));
    }
    loop {
        let offset: usize = l.start_offset() + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        out.push(data[offset]);
        // Advance the multi-index like an odometer, last axis fastest.
        let mut axis = dims.len();
        loop {
            if axis == 0 {
                return Ok(Cow::Owned(out));
            }
            axis -= 1;
            index[axis] += 1;
            if index[axis] < dims[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_pieces_writes_each_piece_in_order() {
        let v = built_in_pieces(10, 4, |i, piece| piece.extend((0..4).map(|j| (i * 4 + j) as f32)));
        assert_eq!(v, (0..10).map(|j| j as f32).collect::<Vec<_>>());
    }

    #[test]
    #[should_panic(expected = "not written in full")]
    fn a_piece_left_short_is_refused() {
        built_in_pieces(10, 4, |_, piece| piece.extend([1.0, 2.0]));
    }
}
