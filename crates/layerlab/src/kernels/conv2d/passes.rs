//! The convolution's forward pass and input gradient on f32 slices: each takes the direct
//! kernels' layouts where [`layouts`](super::layouts) says they apply, im2col + `gemm` elsewhere.
//! (The weight gradient, the third pass, is [`weight_grad`](super::weight_grad)'s.)

use rayon::prelude::*;

use super::geom::Geom;
use super::im2col::{col2im, gather_grad, im2col, transpose};
use super::layouts::{
    interleaved, interleaved_conv, interleaved_offsets, interleaved_strided, shifted, shifted_image, taps_of,
};
use super::scratch::{resized, with_scratch};
use crate::kernels::built_in_pieces;
use crate::kernels::gemm::matmul;

/// The convolution of `x` [n, c, h, w] with `weight` [o, c, k, k] (plus `bias` [o]): [n, o, ho, wo].
pub(crate) fn forward(g: &Geom, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    if g.n * g.image_out() == 0 {
        return Vec::new();
    }
    if interleaved(g) || interleaved_strided(g) {
        let taps = taps_of(weight, g.o, g.c, false);
        return interleaved_conv(g, (g.c, g.o), x, &taps, &interleaved_offsets(g.w, false), bias);
    }
    if shifted(g) {
        // y[o, ·] = Σ over taps of weight[·, ·, tap] [o, c] · x shifted by the tap.
        let taps = taps_of(weight, g.o, g.c, false);
        let offsets: [usize; 9] = std::array::from_fn(|t| (t / 3) * (g.w + 2) + t % 3);
        return built_in_pieces(g.n * g.image_out(), g.image_out(), |i, y| {
            shifted_image(g, (g.c, g.o), &x[i * g.image_in()..][..g.image_in()], &taps, &offsets, bias, y)
        });
    }
    let (ckk, hwo, b) = (g.ckk(), g.hw_out(), g.chunk_images());
    // The weight as [c·k·k, o], so that gemm reads it along the rows it packs.
    let mut weight_t = vec![0f32; weight.len()];
    transpose(weight, g.o, ckk, &mut weight_t);
    let weight_t = &weight_t;
    // Written piece by piece, with no zero-filled output first: that fill ran on one thread
    // (ResNet's first layer at 2 threads: 0.95–0.98 ms now, 1.08–1.15 with the fill).
    built_in_pieces(g.n * g.image_out(), b * g.image_out(), |i, y| {
        with_scratch(|s| {
            let images = (g.n - i * b).min(b);
            let nc = images * hwo;
            let x = &x[i * b * g.image_in()..][..images * g.image_in()];
            let cols = resized(&mut s.cols, ckk * nc);
            im2col(g, x, images, cols);
            let tmp = resized(&mut s.mat, g.o * nc);
            matmul(g.o, nc, ckk, tmp, nc, false, weight_t, (1, g.o), cols, (nc, 1));
            // tmp is [o, image, position]; y is [image, o, position].
            for im in 0..images {
                for oc in 0..g.o {
                    let src = &tmp[oc * nc + im * hwo..][..hwo];
                    match bias {
                        Some(bias) => y.extend(src.iter().map(|v| v + bias[oc])),
                        None => y.extend(src.iter().copied()),
                    }
                }
            }
        })
    })
}

/// The input gradient [n, c, h, w] from the output gradient [n, o, ho, wo].
pub(crate) fn grad_input(g: &Geom, grad: &[f32], weight: &[f32]) -> Vec<f32> {
    if g.n * g.image_in() == 0 {
        return Vec::new();
    }
    if interleaved(g) {
        // As for `shifted` below: the adjoint with the weight transposed and the taps reversed.
        let taps = taps_of(weight, g.o, g.c, true);
        return interleaved_conv(g, (g.o, g.c), grad, &taps, &interleaved_offsets(g.w, true), None);
    }
    if shifted(g) {
        // The same-size 3×3 convolution's adjoint is one too: dx[c, ·] = Σ over taps of
        // weight[·, ·, tap]ᵀ [c, o] · grad shifted the opposite way.
        let taps = taps_of(weight, g.o, g.c, true);
        let offsets: [usize; 9] = std::array::from_fn(|t| (2 - t / 3) * (g.w + 2) + 2 - t % 3);
        return built_in_pieces(g.n * g.image_in(), g.image_in(), |i, dx| {
            shifted_image(g, (g.o, g.c), &grad[i * g.image_out()..][..g.image_out()], &taps, &offsets, None, dx)
        });
    }
    let mut dx = vec![0f32; g.n * g.image_in()];
    let (ckk, b) = (g.ckk(), g.chunk_images());
    dx.par_chunks_mut(b * g.image_in()).enumerate().for_each(|(i, dx)| {
        with_scratch(|s| {
            let images = dx.len() / g.image_in();
            let nc = images * g.hw_out();
            let grad = &grad[i * b * g.image_out()..][..images * g.image_out()];
            let gm = gather_grad(g, grad, images, &mut s.mat);
            let cols = resized(&mut s.cols, ckk * nc);
            // cols = Wᵀ · grad: the weight read as [ckk, o].
            matmul(ckk, nc, g.o, cols, nc, false, weight, (1, ckk), gm, (nc, 1));
            if g.pointwise() {
                // A 1×1 convolution's columns are the input gradient itself, channel-major over
                // the chunk's images: copied into place, with none of col2im's zeroing and sums.
                let hw = g.hw_out();
                for (im, dx) in dx.chunks_exact_mut(g.image_in()).enumerate() {
                    for (ci, dx) in dx.chunks_exact_mut(hw).enumerate() {
                        dx.copy_from_slice(&cols[ci * nc + im * hw..][..hw]);
                    }
                }
            } else {
                col2im(g, cols, images, dx);
            }
        })
    });
    dx
}
