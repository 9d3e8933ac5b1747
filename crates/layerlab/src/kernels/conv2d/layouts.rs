//! Which convolutions take the direct kernels ([`direct`]), and the layouts of the planes they
//! read: with their zero border ([`shifted`]) or with [`LANES`] images side by side in each
//! vector ([`interleaved`], [`interleaved_strided`]), the weights in blocks ([`taps_of`]).

use super::direct;
use super::geom::Geom;
use super::scratch::{resized, with_scratch};
use crate::kernels::{built_in_pieces, layers, vectorized, Piece};

/// Planes of at least this many values take the shifted products (see [`shifted`]).
const SHIFTED_MIN_PLANE: usize = 256;

/// Whether the three passes run as a direct convolution ([`direct`])
/// instead of one product over an unfolded column matrix: 3×3 convolutions with stride 1 that
/// keep the size (padding 1), on planes of [`SHIFTED_MIN_PLANE`] values or more, with the
/// channel counts of [`direct_fits`].
///
/// Why: on ResNet-18's 32×32 layers (16 channels) `gemm` ran at about 63 GFLOP/s a core against
/// PyTorch's 95; its panels suit large products, and these have 16 rows. Nine separate `gemm`
/// calls over the shifted input (one per tap) were measured no faster than the column matrix.
/// The direct kernel keeps an 8-channel × 48-position tile in registers through all taps and
/// input channels.
pub(super) fn shifted(g: &Geom) -> bool {
    g.k == 3 && g.stride == 1 && g.pad == 1 && g.h * g.w >= SHIFTED_MIN_PLANE && direct_fits(g)
}

/// The channel counts the direct kernels take: 8 or more input and output channels, multiples
/// of 4 (for the weight gradient's tiles, [`direct::GRAD_CHANNELS`] outputs × `GRAD_TAPS`
/// (input channel, tap) pairs out of 9 per input channel), on a CPU with AVX-512, or AVX2 and FMA.
fn direct_fits(g: &Geom) -> bool {
    g.c >= 8 && g.o >= 8 && g.c.is_multiple_of(4) && g.o.is_multiple_of(direct::GRAD_CHANNELS) && direct::available()
}

/// Images side by side in the vectors of an [`interleaved`] convolution.
pub(super) const LANES: usize = 16;

/// Planes of at least this many values (and under [`SHIFTED_MIN_PLANE`]) take the interleaved
/// products.
const INTERLEAVED_MIN_PLANE: usize = 4;

/// Of those, planes of at least this many values also take the interleaved weight gradient
/// ([`grad_weight_interleaved`](super::weight_grad::grad_weight_interleaved)); smaller ones keep
/// im2col + `gemm` for it.
pub(super) const INTERLEAVED_WEIGHT_GRAD_MIN_PLANE: usize = 64;

/// Whether the forward pass and the input gradient run as a direct convolution with [`LANES`]
/// images in each vector (see [`interleave`]): same-size 3×3 convolutions on planes of
/// [`INTERLEAVED_MIN_PLANE`] to [`SHIFTED_MIN_PLANE`] values (the 8×8, 4×4 and 2×2 layers of
/// ResNet and VGG), with the channel counts of [`direct_fits`].
///
/// Why: the shifted layout of [`shifted_image`] would compute each padded row's two border
/// columns too (a fifth of an 8×8 plane's work); with one image per lane, every vector is one
/// output position of 16 images, no position is computed in vain and every read is a whole
/// aligned vector. Measured against im2col + `gemm`, each pass timed in turn in one process at 1
/// thread: on 8×8 planes 0.6–1.0× the time; on 4×4 and 2×2 planes with 128 channels 0.74–0.89×
/// once the weights were laid out in blocks ([`taps_of`]; before that, 1.1–1.3×). The weight
/// gradient: 0.78–0.93× `gemm`'s on 8×8 planes with up to 64 channels, 1.0–1.13× on 4×4 and 2×2
/// (see [`INTERLEAVED_WEIGHT_GRAD_MIN_PLANE`]); measured again on AMD Zen 4 once its
/// accumulators stayed in registers, 0.95–1.0× on 4×4 and 1.05–1.15× on 2×2, so those still
/// keep `gemm`.
pub(super) fn interleaved(g: &Geom) -> bool {
    g.k == 3
        && g.stride == 1
        && g.pad == 1
        && (INTERLEAVED_MIN_PLANE..SHIFTED_MIN_PLANE).contains(&(g.h * g.w))
        && direct_fits(g)
}

/// Input planes of at most this many values take the interleaved forward pass at stride 2.
const STRIDED_MAX_PLANE: usize = 1024;

/// Of those, input planes of at least this many values also take the interleaved weight
/// gradient ([`grad_weight_interleaved`](super::weight_grad::grad_weight_interleaved)).
pub(super) const STRIDED_WEIGHT_GRAD_MIN_PLANE: usize = 256;

/// Whether the forward pass of a stride-2 3×3 convolution with padding 1 (ResNet's first
/// convolution of layers 2 to 4) runs with images in the lanes, as [`interleaved`] ones do, on
/// input planes of up to [`STRIDED_MAX_PLANE`] values.
///
/// Why: im2col + `gemm` ran these at half the rate of the stride-1 layers. Measured in turn in
/// one process, 1 thread, batch 128: 0.61–0.64× the time on 32×32 and 16×16 inputs, 0.93× on
/// 8×8. The weight gradient of the same layout (once its accumulators stayed in registers, see
/// `direct::x86::weight_grad`): 0.83× `gemm`'s on 32×32 inputs, 0.9–0.95× on 16×16, 1.1–1.2× on
/// 8×8 (which keeps `gemm`, [`STRIDED_WEIGHT_GRAD_MIN_PLANE`]). The input gradient of a stride-2
/// convolution is not a convolution of this kind and keeps `gemm`.
pub(super) fn interleaved_strided(g: &Geom) -> bool {
    g.k == 3 && g.stride == 2 && g.pad == 1 && g.h * g.w <= STRIDED_MAX_PLANE && direct_fits(g)
}

/// `dst` [k, h + 2·pad, w + 2·pad, LANES] from the planes of up to [`LANES`] images `src`
/// [images, k, h, w]: image i in lane i, with a zero border and zero lanes past the last image.
pub(super) fn interleave(src: &[f32], k: usize, h: usize, w: usize, pad: usize, dst: &mut [f32]) {
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    let images = src.len() / (k * h * w).max(1);
    dst.fill(0.0);
    for ch in 0..k {
        for y in 0..h {
            let row = &mut dst[((ch * hp + y + pad) * wp + pad) * LANES..][..w * LANES];
            for lane in 0..images {
                let src = &src[((lane * k + ch) * h + y) * w..][..w];
                for (x, &v) in src.iter().enumerate() {
                    row[x * LANES + lane] = v;
                }
            }
        }
    }
}

/// `images` images [images, m, hw] (plus `bias` [m]) written to `dst` from `src` [m, hw, LANES]:
/// lane i to image i.
fn deinterleave(src: &[f32], images: usize, m: usize, hw: usize, bias: Option<&[f32]>, dst: &mut Piece<'_>) {
    for lane in 0..images {
        for ch in 0..m {
            let b = bias.map_or(0.0, |b| b[ch]);
            let src = &src[ch * hw * LANES..][..hw * LANES];
            dst.extend(src.chunks_exact(LANES).map(|p| p[lane] + b));
        }
    }
}

/// For each output position of `g` in order: where its window starts in an interleaved input
/// plane padded by one ([`interleave`]) and its offset in an interleaved output plane, both in
/// floats.
pub(super) fn interleaved_positions(g: &Geom) -> Vec<(usize, usize)> {
    (0..g.ho * g.wo)
        .map(|p| {
            let (y, x) = (p / g.wo * g.stride, p % g.wo * g.stride);
            ((y * (g.w + 2) + x) * LANES, p * LANES)
        })
        .collect()
}

/// A 3×3 convolution with padding 1 and images in the lanes: `src` [n, k, h, w] to [n, m, ho,
/// wo] (`(k, m)` channels) with the weights `taps` of [`taps_of`] read at `offsets` (in floats)
/// into the interleaved padded planes, plus `bias` [m]. Groups of [`LANES`] images run in
/// parallel. The input gradient calls it with `g` of stride 1, where ho × wo = h × w.
pub(super) fn interleaved_conv(
    g: &Geom,
    (k, m): (usize, usize),
    src: &[f32],
    taps: &[f32],
    offsets: &[usize; 9],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (h, w, hw, hwo) = (g.h, g.w, g.h * g.w, g.hw_out());
    let plane = (h + 2) * (w + 2) * LANES;
    let positions = interleaved_positions(g);
    // Tiles of VECTORS positions in order; the last one repeats its last position to fill up
    // (it writes the same values twice).
    let tiles: Vec<direct::Tile> = positions
        .chunks(direct::VECTORS)
        .map(|p| direct::Tile {
            src: std::array::from_fn(|q| p[q.min(p.len() - 1)].0),
            out: std::array::from_fn(|q| p[q.min(p.len() - 1)].1),
        })
        .collect();
    let n = src.len() / (k * hw);
    built_in_pieces(n * m * hwo, LANES * m * hwo, |group, dst| {
        let images = LANES.min(n - group * LANES);
        let src = &src[group * LANES * k * hw..][..images * k * hw];
        with_scratch(|s| {
            let padded = resized(&mut s.cols, k * plane);
            vectorized(|| interleave(src, k, h, w, 1, padded));
            let out = resized(&mut s.mat, m * hwo * LANES);
            direct::run(m, k, taps, offsets, padded, plane, &tiles, hwo * LANES, out);
            vectorized(|| deinterleave(out, images, m, hwo, bias, dst));
        })
    })
}

/// The tap offsets (in floats) of an interleaved plane padded by one, w + 2 positions wide:
/// tap (ki, kj) of the forward pass, or with `flipped` tap (2 - ki, 2 - kj) (the input
/// gradient's).
pub(super) fn interleaved_offsets(w: usize, flipped: bool) -> [usize; 9] {
    std::array::from_fn(|t| {
        let (ki, kj) = if flipped { (2 - t / 3, 2 - t % 3) } else { (t / 3, t % 3) };
        (ki * (w + 2) + kj) * LANES
    })
}

/// The weight [o, c, 3, 3] as the direct kernel reads it: for the forward pass the input
/// channels are its `k` = c and the output channels its `m` = o, or with `transposed` (the input
/// gradient) the other way round. Laid out as [m / CHANNELS][9][k][CHANNELS]: for each block of
/// [`direct::CHANNELS`] output channels, each tap and each input row, the block's weights side
/// by side (zeros past the last channel).
///
/// Why blocks: a tile reads one block's weights through all taps and input channels; with the
/// block contiguous (9·k·8 values, 36 KB at 128 channels) they stay in L1 across the tiles,
/// where rows of all m channels put each broadcast on a cache line of its own.
pub(super) fn taps_of(weight: &[f32], o: usize, c: usize, transposed: bool) -> Vec<f32> {
    let (k, m) = if transposed { (o, c) } else { (c, o) };
    let bw = direct::CHANNELS;
    let block = 9 * k * bw;
    // Block by block in parallel, each written in order (a gather from the weight). One pass
    // over the weight with scattered writes took 0.28 ms (0.48–0.52 transposed) for 128 × 128
    // channels on one thread while the other waited, twice per layer and step; now 0.17 ms on
    // one thread, 0.09 on two.
    built_in_pieces(m.div_ceil(bw) * block, block, |blk, taps| {
        for t in 0..9 {
            for row in 0..k {
                taps.extend((0..bw).map(|j| {
                    let col = blk * bw + j;
                    let (oc, ic) = if transposed { (row, col) } else { (col, row) };
                    if col < m {
                        weight[(oc * c + ic) * 9 + t]
                    } else {
                        0.0
                    }
                }));
            }
        }
    })
}

/// One image of a same-size 3×3 convolution: `src` [k, h, w] to `dst` [m, h, w] (`(k, m)`
/// channels) with the weights `taps` of [`taps_of`] read at `offsets` into the padded planes, plus
/// `bias` [m].
///
/// Laid out with its zero border, a plane read from offset `ki·(w+2) + kj` is tap (ki, kj)'s
/// input for every output position at once, in output rows `w + 2` wide (the two extra columns
/// are computed and dropped).
pub(super) fn shifted_image(
    g: &Geom,
    (k, m): (usize, usize),
    src: &[f32],
    taps: &[f32],
    offsets: &[usize; 9],
    bias: Option<&[f32]>,
    dst: &mut Piece<'_>,
) {
    let (h, w, wp) = (g.h, g.w, g.w + 2);
    let plane = (h + 2) * wp;
    let rows = h * wp;
    let cols = rows.next_multiple_of(direct::POSITIONS);
    with_scratch(|s| {
        // The padded planes and, past the last one, what the last tile's reads run over.
        let padded = resized(&mut s.cols, k * plane + (cols - rows) + 2);
        vectorized(|| {
            padded.fill(0.0);
            layers::pad_planes(padded, src, h, w, 1);
        });
        let out = resized(&mut s.mat, m * cols);
        let tiles: Vec<direct::Tile> = (0..cols)
            .step_by(direct::POSITIONS)
            .map(|j0| {
                let at = std::array::from_fn(|q| j0 + 16 * q);
                direct::Tile { src: at, out: at }
            })
            .collect();
        direct::run(m, k, taps, offsets, padded, plane, &tiles, cols, out);
        vectorized(|| {
            for (ch, out) in out.chunks_exact(cols).enumerate() {
                let b = bias.map_or(0.0, |b| b[ch]);
                for row in out.chunks_exact(wp).take(h) {
                    dst.extend(row[..w].iter().map(|v| v + b));
                }
            }
        });
    })
}
