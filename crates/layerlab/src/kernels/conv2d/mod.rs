//! The 2-D convolution used by the models (a kernel of [`crate::kernels`]): direct kernels and
//! im2col + gemm on the CPU, with its own backward.
//!
//! candle's CPU `conv2d` backward goes through a direct-loop `conv_transpose2d`, which made
//! training CNNs an order of magnitude slower than it needs to be. [`conv2d`] runs f32 tensors
//! on the CPU through [`Conv2d`](ops::Conv2d), a candle custom op whose forward is im2col
//! followed by one matrix product per chunk of images, and whose backward computes the input
//! gradient (Wᵀ·grad, then col2im) and the weight gradient (grad·colsᵀ) the same way. f32 on a
//! GPU goes through cuDNN (`kernels::cudnn`, the `cuda` feature); other devices and dtypes keep
//! candle's own `conv2d`.
//!
//! Same-size 3×3 convolutions with enough channels skip the column matrix on CPUs with AVX-512
//! (on CPUs with only AVX2, in the forward pass and the input gradient; the weight gradient keeps it):
//! a direct kernel ([`direct`]) keeps a tile of outputs in registers through all taps and input
//! channels, on planes laid out with their zero border ([`shifted`](layouts::shifted), 16×16 and
//! larger) or with 16 images side by side in each vector ([`interleaved`](layouts::interleaved),
//! 8×8 down to 2×2; also the forward pass of stride-2 layers,
//! [`interleaved_strided`](layouts::interleaved_strided)).
//!
//! Work is split into chunks of images whose size depends only on the shapes, never on the
//! number of threads, and every matrix product runs single-threaded inside its chunk; chunks run
//! in parallel on rayon's current pool. The weight gradient sums over images in a fixed number of
//! groups, then adds the group sums in order, so every result is the same for any thread count.
//!
//! The files, by role:
//!
//! - [`tensor`]: the tensor API the models and the backward pass call ([`conv2d`],
//!   [`conv2d_bias`], [`conv2d_backward`], the two gradients alone, candle's reference);
//! - [`ops`]: the candle custom ops behind it, on the CPU;
//! - [`passes`]: the forward pass and the input gradient on f32 slices, each picking its path;
//! - [`weight_grad`]: the weight gradient on f32 slices, through every path;
//! - [`im2col`]: the column matrix and its adjoint, for the products through `gemm`;
//! - [`layouts`]: which convolutions take the direct kernels, and the plane layouts they read;
//! - [`direct`]: the direct kernels themselves, in AVX-512 and in AVX2 (the same bits);
//! - [`geom`]: a convolution's shapes and its chunks of images; [`scratch`]: each thread's buffers.

mod direct;
mod geom;
mod im2col;
mod layouts;
mod ops;
mod passes;
mod scratch;
mod tensor;
mod weight_grad;

pub(crate) use geom::Geom;
pub(crate) use passes::{forward, grad_input};
pub use tensor::{conv2d, conv2d_backward, conv2d_bias, conv2d_candle, conv2d_grad_input, conv2d_grad_weight};
pub(crate) use weight_grad::grad_weight;

/// The test helpers other kernels' tests use (`random`, `max_rel_diff`).
#[cfg(test)]
pub(crate) use tensor::tests;
