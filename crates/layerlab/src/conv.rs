//! The 2-D convolution used by the models: one place to swap in a faster kernel.

use anyhow::Result;
use candle_core::Tensor;

/// Square-kernel convolution with equal padding on every side (dilation 1, one group).
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    Ok(x.conv2d(weight, padding, stride, 1, 1)?)
}
