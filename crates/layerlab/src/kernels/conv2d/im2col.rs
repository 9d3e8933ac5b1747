//! The column matrix of the products through `gemm`: im2col (and its transpose, for the weight
//! gradient), col2im its adjoint, the output gradient gathered as a matrix, and the weight
//! transposed for the forward pass.

use std::ops::Range;

use super::geom::Geom;
use super::scratch::resized;
use crate::kernels::{layers, vectorized};

/// `dst` [cols, rows] = `src` [rows, cols]ᵀ, in square tiles so that both sides are read and
/// written a cache line at a time.
///
/// Used for the weight of the forward pass, once per call: `gemm` packs its operands into panels
/// and then reads the weight along its columns instead of one value per row. For the much larger
/// column matrix a transpose after the fact was measured slower than building it transposed
/// ([`im2col_t`]).
pub(super) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 16;
    vectorized(|| {
        for r0 in (0..rows).step_by(TILE) {
            for c0 in (0..cols).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let row = &src[r * cols..][..cols];
                    for c in c0..(c0 + TILE).min(cols) {
                        dst[c * rows + r] = row[c];
                    }
                }
            }
        }
    })
}

/// The gradient of `images` images as an [o, images × positions] matrix.
pub(super) fn gather_grad<'a>(g: &Geom, grad: &'a [f32], images: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
    if images == 1 {
        return grad;
    }
    let (hwo, nc) = (g.hw_out(), images * g.hw_out());
    let m = resized(buf, g.o * nc);
    for (im, grad) in grad.chunks_exact(g.image_out()).enumerate() {
        for (oc, grad) in grad.chunks_exact(hwo).enumerate() {
            m[oc * nc + im * hwo..][..hwo].copy_from_slice(grad);
        }
    }
    m
}

/// For a stride-1 convolution that keeps the image size (`k = 2·pad + 1`), the output positions
/// `lo..hi` (flattened over rows) that read the input at flattened offset `shift` from their own
/// position, for kernel tap (`ki`, `kj`); positions in `lo..hi` whose column falls off the
/// image are listed by `(ox_lo, ox_hi)`, the valid columns. `None` for other convolutions.
///
/// Such a convolution reads whole runs of rows at one fixed offset, so im2col and col2im move
/// one block per tap and image instead of one short piece per row: on the 8×8 to 2×2 layers a
/// row is 2 to 8 values and the per-piece cost dominated.
fn same_size_span(g: &Geom, ki: usize, kj: usize) -> Option<(Range<usize>, isize, (usize, usize))> {
    if g.stride != 1 || g.ho != g.h || g.wo != g.w {
        return None;
    }
    let (oy_lo, oy_hi) = g.valid(ki, g.h, g.ho);
    let (ox_lo, ox_hi) = g.valid(kj, g.w, g.wo);
    if oy_lo == oy_hi || ox_lo == ox_hi {
        return Some((0..0, 0, (ox_lo, ox_hi)));
    }
    let shift = (ki as isize - g.pad as isize) * g.w as isize + kj as isize - g.pad as isize;
    Some((oy_lo * g.w + ox_lo..(oy_hi - 1) * g.w + ox_hi, shift, (ox_lo, ox_hi)))
}

/// Zeroes the positions of `out` (one image's row of the column matrix) outside `span` and, in
/// it, those whose column lies outside `ox_lo..ox_hi`.
fn zero_outside(g: &Geom, out: &mut [f32], span: &Range<usize>, (ox_lo, ox_hi): (usize, usize)) {
    out[..span.start].fill(0.0);
    out[span.end..].fill(0.0);
    if ox_lo == 0 && ox_hi == g.wo {
        return;
    }
    // Column by column: a row's invalid stretch is one or two values, too short for a fill call.
    let rows = span.start / g.wo..span.end.div_ceil(g.wo);
    for col in (0..ox_lo).chain(ox_hi..g.wo) {
        for oy in rows.clone() {
            out[oy * g.wo + col] = 0.0;
        }
    }
}

/// [`im2col`] transposed: `cols_t` [images·ho·wo, c·k·k], one row per output position, written
/// directly (a transpose of the column matrix after the fact cost more than the product: on a
/// 32×32 layer the column matrix is nine times the input). Each input plane is first copied into
/// `padded` with its zero border, so every tap is a plain read.
pub(super) fn im2col_t(g: &Geom, x: &[f32], images: usize, padded: &mut Vec<f32>, cols_t: &mut [f32]) {
    vectorized(|| {
        let (hp, wp, kk, ckk) = (g.h + 2 * g.pad, g.w + 2 * g.pad, g.k * g.k, g.ckk());
        let plane = resized(padded, hp * wp);
        plane.fill(0.0);
        for im in 0..images {
            for ci in 0..g.c {
                let src = &x[(im * g.c + ci) * g.h * g.w..][..g.h * g.w];
                layers::pad_planes(plane, src, g.h, g.w, g.pad);
                let rows_of = |oy: usize, ki: usize| &plane[(oy * g.stride + ki) * wp..][..wp];
                if g.k == 3 {
                    // Nine explicit reads per position: short copies would each be a call.
                    for oy in 0..g.ho {
                        let (r0, r1, r2) = (rows_of(oy, 0), rows_of(oy, 1), rows_of(oy, 2));
                        for ox in 0..g.wo {
                            let p = im * g.hw_out() + oy * g.wo + ox;
                            let out = &mut cols_t[p * ckk + ci * 9..][..9];
                            let x0 = ox * g.stride;
                            out[0] = r0[x0];
                            out[1] = r0[x0 + 1];
                            out[2] = r0[x0 + 2];
                            out[3] = r1[x0];
                            out[4] = r1[x0 + 1];
                            out[5] = r1[x0 + 2];
                            out[6] = r2[x0];
                            out[7] = r2[x0 + 1];
                            out[8] = r2[x0 + 2];
                        }
                    }
                    continue;
                }
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let p = im * g.hw_out() + oy * g.wo + ox;
                        let out = &mut cols_t[p * ckk + ci * kk..][..kk];
                        for ki in 0..g.k {
                            let row = rows_of(oy, ki);
                            for kj in 0..g.k {
                                out[ki * g.k + kj] = row[ox * g.stride + kj];
                            }
                        }
                    }
                }
            }
        }
    })
}

/// Input planes up to this many values are unfolded through a lookup table (see [`tap_table`]).
const SMALL_PLANE: usize = 64;

impl Geom {
    /// Whether im2col and col2im go through [`tap_table`]: planes of up to 4×4, and those up to
    /// [`SMALL_PLANE`] values that the block copies of [`same_size_span`] do not cover (measured:
    /// on 8×8 planes the block copies are faster).
    fn small(&self) -> bool {
        let hw = self.h * self.w;
        let same_size = self.stride == 1 && self.ho == self.h && self.wo == self.w;
        hw <= 16 || (hw <= SMALL_PLANE && !same_size)
    }
}

/// For each kernel tap (row-major over ki, kj) and output position, the input position it reads,
/// or `h·w` (a zero slot past the plane) where it falls on the padding. On the 8×8 to 1×1 layers
/// a row of the column matrix is a handful of values, and a gather through this table costs less
/// than the per-row bookkeeping of the copy loops.
fn tap_table(g: &Geom) -> Vec<u16> {
    let hw = g.h * g.w;
    let mut table = Vec::with_capacity(g.k * g.k * g.hw_out());
    for ki in 0..g.k {
        for kj in 0..g.k {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let (iy, ix) = (
                        (oy * g.stride + ki) as isize - g.pad as isize,
                        (ox * g.stride + kj) as isize - g.pad as isize,
                    );
                    let inside = (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix);
                    table.push(if inside { (iy as usize * g.w + ix as usize) as u16 } else { hw as u16 });
                }
            }
        }
    }
    table
}

/// [`im2col`] for planes of at most [`SMALL_PLANE`] values.
fn im2col_small(g: &Geom, x: &[f32], images: usize, cols: &mut [f32]) {
    let (hw, hwo, nc, kk) = (g.h * g.w, g.hw_out(), images * g.hw_out(), g.k * g.k);
    let table = tap_table(g);
    let mut plane = [0f32; SMALL_PLANE + 1];
    for ci in 0..g.c {
        for im in 0..images {
            plane[..hw].copy_from_slice(&x[(im * g.c + ci) * hw..][..hw]);
            plane[hw] = 0.0;
            for tap in 0..kk {
                let out = &mut cols[(ci * kk + tap) * nc + im * hwo..][..hwo];
                for (o, &i) in out.iter_mut().zip(&table[tap * hwo..(tap + 1) * hwo]) {
                    *o = plane[i as usize];
                }
            }
        }
    }
}

/// [`col2im`] for planes of at most [`SMALL_PLANE`] values: the same sums in the same order.
fn col2im_small(g: &Geom, cols: &[f32], images: usize, dx: &mut [f32]) {
    let (hw, hwo, nc, kk) = (g.h * g.w, g.hw_out(), images * g.hw_out(), g.k * g.k);
    let table = tap_table(g);
    let mut plane = [0f32; SMALL_PLANE + 1];
    for ci in 0..g.c {
        for im in 0..images {
            plane.fill(0.0);
            for tap in 0..kk {
                let src = &cols[(ci * kk + tap) * nc + im * hwo..][..hwo];
                for (v, &i) in src.iter().zip(&table[tap * hwo..(tap + 1) * hwo]) {
                    plane[i as usize] += v;
                }
            }
            dx[(im * g.c + ci) * hw..][..hw].copy_from_slice(&plane[..hw]);
        }
    }
}

/// Unfolds `images` images [images, c, h, w] into `cols` [c·k·k, images·ho·wo].
pub(super) fn im2col(g: &Geom, x: &[f32], images: usize, cols: &mut [f32]) {
    vectorized(|| im2col_any(g, x, images, cols))
}

fn im2col_any(g: &Geom, x: &[f32], images: usize, cols: &mut [f32]) {
    let (hw, hwo, nc) = (g.h * g.w, g.hw_out(), images * g.hw_out());
    if g.small() {
        return im2col_small(g, x, images, cols);
    }
    let (s, p) = (g.stride, g.pad);
    for ci in 0..g.c {
        for ki in 0..g.k {
            let (oy_lo, oy_hi) = g.valid(ki, g.h, g.ho);
            for kj in 0..g.k {
                let (ox_lo, ox_hi) = g.valid(kj, g.w, g.wo);
                let r = (ci * g.k + ki) * g.k + kj;
                let row = &mut cols[r * nc..(r + 1) * nc];
                if let Some((span, shift, cols_ok)) = same_size_span(g, ki, kj) {
                    let from = (span.start as isize + shift) as usize..(span.end as isize + shift) as usize;
                    for im in 0..images {
                        let plane = &x[(im * g.c + ci) * hw..][..hw];
                        let out = &mut row[im * hwo..(im + 1) * hwo];
                        out[span.clone()].copy_from_slice(&plane[from.clone()]);
                        zero_outside(g, out, &span, cols_ok);
                    }
                    continue;
                }
                for im in 0..images {
                    let plane = &x[(im * g.c + ci) * hw..][..hw];
                    let out = &mut row[im * hwo..(im + 1) * hwo];
                    out[..oy_lo * g.wo].fill(0.0);
                    out[oy_hi * g.wo..].fill(0.0);
                    for oy in oy_lo..oy_hi {
                        let src = &plane[(oy * s + ki - p) * g.w..][..g.w];
                        let out = &mut out[oy * g.wo..(oy + 1) * g.wo];
                        out[..ox_lo].fill(0.0);
                        out[ox_hi..].fill(0.0);
                        if ox_lo == ox_hi {
                            continue;
                        }
                        let ix0 = ox_lo * s + kj - p;
                        let out = &mut out[ox_lo..ox_hi];
                        if s == 1 {
                            out.copy_from_slice(&src[ix0..ix0 + out.len()]);
                        } else {
                            for (j, o) in out.iter_mut().enumerate() {
                                *o = src[ix0 + j * s];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: folds `cols` back onto `dx` [images, c, h, w] (overwritten).
/// `cols` is scratch: the entries of positions that read outside the image are zeroed on the way.
pub(super) fn col2im(g: &Geom, cols: &mut [f32], images: usize, dx: &mut [f32]) {
    vectorized(|| col2im_any(g, cols, images, dx))
}

fn col2im_any(g: &Geom, cols: &mut [f32], images: usize, dx: &mut [f32]) {
    let (hw, hwo, nc) = (g.h * g.w, g.hw_out(), images * g.hw_out());
    if g.small() {
        return col2im_small(g, cols, images, dx);
    }
    dx.fill(0.0);
    let (s, p) = (g.stride, g.pad);
    for ci in 0..g.c {
        for ki in 0..g.k {
            let (oy_lo, oy_hi) = g.valid(ki, g.h, g.ho);
            for kj in 0..g.k {
                let (ox_lo, ox_hi) = g.valid(kj, g.w, g.wo);
                if ox_lo == ox_hi {
                    continue;
                }
                let r = (ci * g.k + ki) * g.k + kj;
                let row = &mut cols[r * nc..(r + 1) * nc];
                if let Some((span, shift, cols_ok)) = same_size_span(g, ki, kj) {
                    let to = (span.start as isize + shift) as usize..(span.end as isize + shift) as usize;
                    for im in 0..images {
                        let plane = &mut dx[(im * g.c + ci) * hw..][..hw];
                        let src = &mut row[im * hwo..(im + 1) * hwo];
                        zero_outside(g, src, &span, cols_ok);
                        plane[to.clone()].iter_mut().zip(&src[span.clone()]).for_each(|(d, v)| *d += v);
                    }
                    continue;
                }
                for im in 0..images {
                    let plane = &mut dx[(im * g.c + ci) * hw..][..hw];
                    let src = &row[im * hwo..(im + 1) * hwo];
                    for oy in oy_lo..oy_hi {
                        let dst = &mut plane[(oy * s + ki - p) * g.w..][..g.w];
                        let src = &src[oy * g.wo + ox_lo..oy * g.wo + ox_hi];
                        let ix0 = ox_lo * s + kj - p;
                        if s == 1 {
                            dst[ix0..ix0 + src.len()].iter_mut().zip(src).for_each(|(d, v)| *d += v);
                        } else {
                            for (j, v) in src.iter().enumerate() {
                                dst[ix0 + j * s] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}
