//! The direct convolution kernel behind [`shifted_image`](super::layouts::shifted_image) and
//! [`interleaved_conv`](super::layouts::interleaved_conv), in AVX-512, and the weight gradient's.

/// 16-lane registers of outputs in one tile (16 positions of one image, or one position of
/// 16 images).
pub(super) const VECTORS: usize = 3;
/// Output positions of one tile.
pub(super) const POSITIONS: usize = VECTORS * 16;
/// Output channels of one tile: 8 × 3 accumulators, 3 loaded inputs and a broadcast weight
/// fill 28 of the 32 registers. Against 6 × 4 no difference showed through this machine's
/// noise; this shape leaves no narrow tile for the usual channel counts (multiples of 8), and
/// a 16×16 plane's 16·18 positions fill whole tiles.
pub(super) const CHANNELS: usize = 8;

pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where one tile reads its [`VECTORS`] input vectors (offsets into an input channel's plane,
/// to which each tap's offset is added) and writes its output vectors (offsets into an
/// output channel's values).
#[derive(Debug, Clone, Copy)]
pub(super) struct Tile {
    pub(super) src: [usize; VECTORS],
    pub(super) out: [usize; VECTORS],
}

/// For each tile and output channel r: `out`[r·out_stride + tile.out[q]..][..16] = Σ over
/// taps t and input channels c of `taps`[r / CHANNELS][t][c][r % CHANNELS] times `src`[c·plane + offsets[t] +
/// tile.src[q]..][..16]. Each output is summed in the same order (taps, then channels)
/// whatever the tile or thread.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    m: usize,
    k: usize,
    taps: &[f32],
    offsets: &[usize; 9],
    src: &[f32],
    plane: usize,
    tiles: &[Tile],
    out_stride: usize,
    out: &mut [f32],
) {
    assert!(available(), "the direct convolution needs AVX-512");
    assert!(taps.len() >= m.div_ceil(CHANNELS) * CHANNELS * 9 * k, "direct convolution: too few weights");
    let reach = offsets.iter().max().copied().unwrap_or(0) + 16;
    for t in tiles {
        for (&s, &o) in t.src.iter().zip(&t.out) {
            assert!(k == 0 || src.len() >= (k - 1) * plane + reach + s, "direct convolution: input too short");
            assert!(m == 0 || out.len() >= (m - 1) * out_stride + o + 16, "direct convolution: output too short");
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted above), and the asserts bound every read of
    // `taps` and `src` and every write of `out` that the tiles make.
    unsafe {
        x86::run(m, k, taps, offsets, src, plane, tiles, out_stride, out)
    }
}

/// `dw` [m, k, 9] = Σ over `images` and `positions` (s, d) of `dy`[image][o][d..][..16] times
/// `src`[image][c·plane + offsets[t] + s..][..16], lane by lane (images `src_stride` apart in
/// `src` and `m·dy_row` apart in `dy`, whose channels are `dy_row` apart). Each sum runs over
/// images, then positions in 16 lanes, then the lanes, in the same order whatever the thread.
#[allow(clippy::too_many_arguments)]
pub(super) fn weight_grad(
    m: usize,
    k: usize,
    images: usize,
    (dy, dy_row): (&[f32], usize),
    (src, src_stride, plane): (&[f32], usize, usize),
    positions: &[(usize, usize)],
    offsets: &[usize; 9],
    dw: &mut [f32],
) {
    assert!(available(), "the direct convolution needs AVX-512");
    assert!(m.is_multiple_of(GRAD_CHANNELS) && (9 * k).is_multiple_of(GRAD_TAPS));
    assert!(images == 0 || dy.len() >= images * m * dy_row, "direct weight gradient: dy too short");
    assert!(dw.len() >= m * k * 9, "direct weight gradient: dw too short");
    let reach = offsets.iter().max().copied().unwrap_or(0) + 16;
    for &(s, d) in positions {
        assert!(d + 16 <= dy_row, "direct weight gradient: a position past its dy row");
        assert!(
            images == 0 || k == 0 || src.len() >= (images - 1) * src_stride + (k - 1) * plane + reach + s,
            "direct weight gradient: input too short"
        );
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present, and the asserts above bound every access of the tiles.
    unsafe {
        x86::weight_grad(m, k, images, (dy, dy_row), (src, src_stride, plane), positions, offsets, dw)
    }
}

/// The weight gradient's tile: 4 output channels × 4 (input channel, tap) pairs, 16
/// accumulators.
///
/// Why not 4 × 6 (24 accumulators, fewer loads per FMA): with 4 outputs and 6 inputs loaded
/// that is 34 registers when the compiler hoists all loads of a position ahead of its FMAs,
/// and some builds did, keeping accumulators on the stack (32×32 and 16×16 layers 10.9–11.4
/// ms against 7.0–7.5 from a build that did not). 4 × 4 needs 24 registers however the
/// loads are scheduled, and measured 6.6–6.9 ms on those layers (4 × 3: 6.9–7.8).
pub(super) const GRAD_CHANNELS: usize = 4;
const GRAD_TAPS: usize = 4;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, CHANNELS, GRAD_CHANNELS, GRAD_TAPS, VECTORS};

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(
        m: usize,
        k: usize,
        taps: &[f32],
        offsets: &[usize; 9],
        src: &[f32],
        plane: usize,
        tiles: &[Tile],
        out_stride: usize,
        out: &mut [f32],
    ) {
        // Output-channel tiles outermost, so that a tile's weights are reused across positions.
        for o0 in (0..m).step_by(CHANNELS) {
            for t in tiles {
                let args = (o0, k, taps, offsets, src, plane, t);
                // SAFETY: as for `run` (the caller's asserts bound every tile).
                unsafe {
                    match m - o0 {
                        1 => tile::<1>(args, out_stride, out),
                        2 => tile::<2>(args, out_stride, out),
                        3 => tile::<3>(args, out_stride, out),
                        4 => tile::<4>(args, out_stride, out),
                        5 => tile::<5>(args, out_stride, out),
                        6 => tile::<6>(args, out_stride, out),
                        7 => tile::<7>(args, out_stride, out),
                        _ => tile::<CHANNELS>(args, out_stride, out),
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_grad(
        m: usize,
        k: usize,
        images: usize,
        (dy, dy_row): (&[f32], usize),
        (src, src_stride, plane): (&[f32], usize, usize),
        positions: &[(usize, usize)],
        offsets: &[usize; 9],
        dw: &mut [f32],
    ) {
        let pairs = 9 * k;
        for o0 in (0..m).step_by(GRAD_CHANNELS) {
            for q0 in (0..pairs).step_by(GRAD_TAPS) {
                let at: [usize; GRAD_TAPS] = std::array::from_fn(|i| (q0 + i) / 9 * plane + offsets[(q0 + i) % 9]);
                // SAFETY: `o0 + 4 <= m`, `q0 + 4 <= 9k` (the caller asserts divisibility), and
                // the caller's asserts bound the reads of every image and position.
                unsafe {
                    let mut acc = [[_mm512_setzero_ps(); GRAD_TAPS]; GRAD_CHANNELS];
                    for im in 0..images {
                        let d = dy.as_ptr().add((im * m + o0) * dy_row);
                        let x = src.as_ptr().add(im * src_stride);
                        for &(s, j) in positions {
                            let a: [__m512; GRAD_CHANNELS] =
                                std::array::from_fn(|r| _mm512_loadu_ps(d.add(r * dy_row + j)));
                            for (i, &at) in at.iter().enumerate() {
                                let b = _mm512_loadu_ps(x.add(at + s));
                                for (acc, a) in acc.iter_mut().zip(a) {
                                    acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
                                }
                            }
                        }
                    }
                    // Stored whole before any lane is summed: reduced straight from the
                    // accumulators (in a loop the compiler did not unroll), they were kept in
                    // memory and stored after every FMA, which bounded the kernel by stores
                    // (on AMD Zen 4, 2.2× the forward pass's time; 0.95–1.05× without).
                    let mut sums = [0f32; GRAD_CHANNELS * GRAD_TAPS * 16];
                    for (r, acc) in acc.iter().enumerate() {
                        for (i, a) in acc.iter().enumerate() {
                            _mm512_storeu_ps(sums.as_mut_ptr().add((r * GRAD_TAPS + i) * 16), *a);
                        }
                    }
                    for (t, lanes) in sums.chunks_exact(16).enumerate() {
                        let (r, i) = (t / GRAD_TAPS, t % GRAD_TAPS);
                        dw[(o0 + r) * pairs + q0 + i] = _mm512_reduce_add_ps(_mm512_loadu_ps(lanes.as_ptr()));
                    }
                }
            }
        }
    }

    type TileArgs<'a> = (usize, usize, &'a [f32], &'a [usize; 9], &'a [f32], usize, &'a Tile);

    /// Output channels `o0..o0 + MR` at the tile's vectors.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const MR: usize>(
        (o0, k, taps, offsets, src, plane, t): TileArgs<'_>,
        out_stride: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller keeps `o0 + MR <= m` and every read of `src` and write of `out`
        // inside their lengths (see `direct::run`).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; MR];
            for (tap, &off) in offsets.iter().enumerate() {
                let w_t = taps.as_ptr().add((o0 / CHANNELS * 9 + tap) * k * CHANNELS);
                let s_t = src.as_ptr().add(off);
                for c in 0..k {
                    let p = s_t.add(c * plane);
                    let v: [__m512; VECTORS] = std::array::from_fn(|q| _mm512_loadu_ps(p.add(t.src[q])));
                    let w = w_t.add(c * CHANNELS);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let wr = _mm512_set1_ps(*w.add(r));
                        for (a, v) in acc.iter_mut().zip(v) {
                            *a = _mm512_fmadd_ps(wr, v, *a);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let d = out.as_mut_ptr().add((o0 + r) * out_stride);
                for (q, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(d.add(t.out[q]), *a);
                }
            }
        }
    }
}
