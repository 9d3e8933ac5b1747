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
