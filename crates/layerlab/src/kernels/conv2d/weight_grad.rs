//! The convolution's weight gradient on f32 slices, through each path (the direct kernels'
//! layouts or im2col + `gemm`): partial sums over fixed groups of images, added in order.

use rayon::prelude::*;

use super::direct;
use super::geom::Geom;
use super::im2col::{gather_grad, im2col, im2col_t};
use super::layouts::{
    interleave, interleaved, interleaved_offsets, interleaved_positions, interleaved_strided, shifted,
    INTERLEAVED_WEIGHT_GRAD_MIN_PLANE, LANES, STRIDED_WEIGHT_GRAD_MIN_PLANE,
};
use super::scratch::{resized, with_scratch};
use crate::kernels::gemm::matmul;
use crate::kernels::{layers, vectorized};

/// The weight gradient is summed in this many fixed groups of chunks.
const WEIGHT_GRAD_GROUPS: usize = 8;

/// The weight gradient [o, c, k, k] from the input and the output gradient.
pub(crate) fn grad_weight(g: &Geom, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let ckk = g.ckk();
    let chunks = g.chunks();
    let per_group = chunks.len().div_ceil(WEIGHT_GRAD_GROUPS).max(1);
    // CPUs with AVX2 but not AVX-512 run the direct convolution but not its weight gradient
    // (see `direct`'s module comment): theirs goes through `gemm`.
    let direct = direct::weight_grad_available();
    if direct && shifted(g) {
        let partials = chunks
            .par_chunks(per_group)
            .map(|group| {
                let (first, last) = (group[0].start, group[group.len() - 1].end);
                let x = &x[first * g.image_in()..last * g.image_in()];
                grad_weight_shifted(g, x, &grad[first * g.image_out()..last * g.image_out()])
            })
            .collect();
        return sum_in_order(partials, g.o * ckk);
    }
    if g.pointwise() {
        return grad_weight_pointwise(g, x, grad);
    }
    let strided = interleaved_strided(g) && g.h * g.w >= STRIDED_WEIGHT_GRAD_MIN_PLANE;
    if direct && ((interleaved(g) && g.h * g.w >= INTERLEAVED_WEIGHT_GRAD_MIN_PLANE) || strided) {
        return grad_weight_interleaved(g, x, grad);
    }
    let partials: Vec<Vec<f32>> = chunks
        .par_chunks(per_group)
        .map(|group| {
            with_scratch(|s| {
                let mut dw = vec![0f32; g.o * ckk];
                for (j, r) in group.iter().enumerate() {
                    let images = r.len();
                    let nc = images * g.hw_out();
                    let x = &x[r.start * g.image_in()..r.end * g.image_in()];
                    let cols_t = resized(&mut s.cols_t, ckk * nc);
                    im2col_t(g, x, images, &mut s.cols, cols_t);
                    let grad = &grad[r.start * g.image_out()..r.end * g.image_out()];
                    let gm = gather_grad(g, grad, images, &mut s.mat);
                    // dw += grad · colsᵀ, the transposed columns [nc, ckk] read row by row.
                    matmul(g.o, ckk, nc, &mut dw, ckk, j > 0, gm, (nc, 1), &s.cols_t[..ckk * nc], (ckk, 1));
                }
                dw
            })
        })
        .collect();
    sum_in_order(partials, g.o * ckk)
}

/// The weight gradient of a 1×1 convolution at stride 1 (a bottleneck's first and last), a plain
/// product: dw [o, c] = grad [o, images·positions] · xᵀ, with x [c, images·positions] the input
/// gathered channel by channel (block copies) and read transposed by the product. The general
/// path's position-by-position transpose of the columns (`im2col_t`) made this pass 2–3× the
/// forward pass's time (measured on ResNet-50 at width 0.25: layer2.0.conv1's 16.0 ms against
/// 6.2 ms). Summed in the same fixed groups as every path, so the result does not depend on the
/// thread count.
fn grad_weight_pointwise(g: &Geom, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let chunks = g.chunks();
    let per_group = chunks.len().div_ceil(WEIGHT_GRAD_GROUPS).max(1);
    let partials: Vec<Vec<f32>> = chunks
        .par_chunks(per_group)
        .map(|group| {
            with_scratch(|s| {
                let mut dw = vec![0f32; g.o * g.c];
                for (j, r) in group.iter().enumerate() {
                    let images = r.len();
                    let nc = images * g.hw_out();
                    let x = &x[r.start * g.image_in()..r.end * g.image_in()];
                    let cols: &[f32] = if images == 1 {
                        x
                    } else {
                        let cols = resized(&mut s.cols, g.c * nc);
                        im2col(g, x, images, cols);
                        cols
                    };
                    let grad = &grad[r.start * g.image_out()..r.end * g.image_out()];
                    let gm = gather_grad(g, grad, images, &mut s.mat);
                    // dw += grad · colsᵀ: element (position p, channel c) of colsᵀ is cols[c·nc + p].
                    matmul(g.o, g.c, nc, &mut dw, g.c, j > 0, gm, (nc, 1), cols, (1, nc));
                }
                dw
            })
        })
        .collect();
    sum_in_order(partials, g.o * g.c)
}

/// The sum of the weight gradient's partial sums (`len` values each), added in their fixed order:
/// each value is p0 + p1 + p2 + … whatever the thread count. Pieces of the sum run in parallel:
/// on one thread, adding VGG's eight partials of 128 × 128 × 9 values held the 2×2 layers'
/// weight gradient to 1.67× its one-thread speed on two (measured in turn at 2 threads: 4×4
/// layers 3.4–3.6 against 3.6–4.5 ms, 2×2 layers 1.1–1.3 against 1.2–1.7).
fn sum_in_order(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    const PIECE: usize = 1 << 14;
    let mut parts = partials.into_iter();
    let Some(mut dw) = parts.next() else { return vec![0f32; len] };
    let rest: Vec<Vec<f32>> = parts.collect();
    dw.par_chunks_mut(PIECE).enumerate().for_each(|(i, dw)| {
        for p in &rest {
            dw.iter_mut().zip(&p[i * PIECE..]).for_each(|(d, p)| *d += p);
        }
    });
    dw
}

/// Bytes of the interleaved inputs and output gradients that one task of
/// [`grad_weight_interleaved`] takes: as many groups of [`LANES`] images as fit (at least one),
/// so that a task's data stays in its core's L2 while every tile of the weight gradient reads it.
const WEIGHT_GRAD_TASK_BYTES: usize = 1 << 20;

/// The weight gradient of a 3×3 convolution with images in the lanes (the layers of
/// [`interleaved`] and [`interleaved_strided`]): each task interleaves its groups of [`LANES`]
/// images (inputs padded, output gradients not) and sums over them by [`direct::weight_grad`];
/// the tasks' sums are added in order. The tasks depend on the shapes only, so the result does not depend on the thread count.
fn grad_weight_interleaved(g: &Geom, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (h, w, hwo) = (g.h, g.w, g.hw_out());
    let plane = (h + 2) * (w + 2) * LANES;
    let group_in = g.c * plane;
    let group_bytes = (group_in + g.o * hwo * LANES) * std::mem::size_of::<f32>();
    let groups = g.n.div_ceil(LANES);
    let per_task = (WEIGHT_GRAD_TASK_BYTES / group_bytes).clamp(1, groups.max(1));
    let positions: Vec<(usize, usize)> = interleaved_positions(g);
    let offsets = interleaved_offsets(w, false);
    let partials = (0..groups.div_ceil(per_task))
        .into_par_iter()
        .map(|task| {
            let first = task * per_task;
            let n_groups = per_task.min(groups - first);
            let mut dw = vec![0f32; g.o * g.ckk()];
            with_scratch(|s| {
                let padded = resized(&mut s.cols, n_groups * group_in);
                let dy = resized(&mut s.mat, n_groups * g.o * hwo * LANES);
                vectorized(|| {
                    for (i, (padded, dy)) in
                        padded.chunks_exact_mut(group_in).zip(dy.chunks_exact_mut(g.o * hwo * LANES)).enumerate()
                    {
                        let (lo, hi) = ((first + i) * LANES, ((first + i + 1) * LANES).min(g.n));
                        interleave(&x[lo * g.image_in()..hi * g.image_in()], g.c, h, w, 1, padded);
                        interleave(&grad[lo * g.image_out()..hi * g.image_out()], g.o, g.ho, g.wo, 0, dy);
                    }
                });
                direct::weight_grad(
                    g.o,
                    g.c,
                    n_groups,
                    (dy, hwo * LANES),
                    (padded, group_in, plane),
                    &positions,
                    &offsets,
                    &mut dw,
                );
            });
            dw
        })
        .collect();
    sum_in_order(partials, g.o * g.ckk())
}

/// The weight gradient of a group of images by [`direct::weight_grad`]: the inputs padded as
/// for [`shifted_image`](super::layouts::shifted_image), the output gradient laid out in rows
/// `w + 2` wide with zeros in the two extra columns, so that the sum over padded positions is the
/// sum over real ones.
fn grad_weight_shifted(g: &Geom, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let images = x.len() / g.image_in().max(1);
    let (h, w, wp) = (g.h, g.w, g.w + 2);
    let (plane, rows) = ((h + 2) * wp, h * wp);
    let cols = rows.next_multiple_of(16);
    let x_stride = g.c * plane + (cols - rows) + 2;
    let offsets: [usize; 9] = std::array::from_fn(|t| (t / 3) * wp + t % 3);
    let mut dw = vec![0f32; g.o * g.ckk()];
    with_scratch(|s| {
        let padded = resized(&mut s.cols, images * x_stride);
        let dy = resized(&mut s.mat, images * g.o * cols);
        vectorized(|| {
            padded.fill(0.0);
            dy.fill(0.0);
            for (p, x) in padded.chunks_exact_mut(x_stride).zip(x.chunks_exact(g.image_in())) {
                layers::pad_planes(p, x, h, w, 1);
            }
            for (d, grad) in dy.chunks_exact_mut(cols).zip(grad.chunks_exact(h * w)) {
                for (row, src) in d.chunks_exact_mut(wp).zip(grad.chunks_exact(w)) {
                    row[..w].copy_from_slice(src);
                }
            }
        });
        let positions: Vec<(usize, usize)> = (0..cols).step_by(16).map(|j| (j, j)).collect();
        direct::weight_grad(g.o, g.c, images, (dy, cols), (padded, x_stride, plane), &positions, &offsets, &mut dw);
    });
    dw
}
