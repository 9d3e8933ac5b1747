//! layerlab's own CPU kernels, one file per kernel, each a candle custom op (or a plain function
//! on f32 slices) with its own backward where training needs one:
//!
//! - [`gemm`]: the one matrix-product wrapper every kernel and the fully connected path use;
//! - [`conv2d`]: convolution as im2col + gemm, forward and both gradients;
//! - [`norm`]: BatchNorm in training and evaluation mode, fused;
//! - [`layers`]: ReLU, 2×2 max-pooling and the bias gradient.
//!
//! Every kernel splits its work into pieces whose size depends only on the shapes, so results do
//! not depend on the thread count.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout};

pub mod conv2d;
pub mod gemm;
pub mod layers;
pub mod norm;

pub use conv2d::{conv2d, conv2d_bias, conv2d_candle, conv2d_grad_input, conv2d_grad_weight};

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
