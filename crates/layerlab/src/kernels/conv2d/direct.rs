//! The direct convolution kernel behind [`shifted_image`](super::layouts::shifted_image) and
//! [`interleaved_conv`](super::layouts::interleaved_conv), in AVX-512 and in AVX2 with FMA for
//! CPUs without it ([`Isa`]), and the weight gradient's, in AVX-512.
//!
//! The two forms of the convolution compute every output lane by the same chain of fused
//! multiply-adds in the same order, so they give the same bits; a test holds each one this CPU
//! has to a scalar reference written from [`run`]'s doc comment. Only the tiles differ: AVX2 has
//! 16 registers of 8 lanes, not 32 of 16.
//!
//! The weight gradient has no AVX2 form: one was written (4 output channels × 2 (input channel,
//! tap) pairs × 8 lanes, four passes over the images per AVX-512 tile) and measured 1.0–2.4× the
//! time of im2col + `gemm` on ResNet-18's 32×32 and 16×16 layers on an AVX2 AMD EPYC, so those
//! CPUs keep `gemm` for it ([`weight_grad_available`]).

/// 16-lane registers of outputs in one tile (16 positions of one image, or one position of
/// 16 images).
pub(super) const VECTORS: usize = 3;
/// Output positions of one tile.
pub(super) const POSITIONS: usize = VECTORS * 16;
/// Output channels of one tile: 8 × 3 accumulators, 3 loaded inputs and a broadcast weight
/// fill 28 of AVX-512's 32 registers. Against 6 × 4 no difference showed through this machine's
/// noise; this shape leaves no narrow tile for the usual channel counts (multiples of 8), and
/// a 16×16 plane's 16·18 positions fill whole tiles.
pub(super) const CHANNELS: usize = 8;

/// The instruction set a direct kernel runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    Avx512,
    /// AVX2 and FMA without AVX-512: most laptop and desktop CPUs since Intel's Haswell, and
    /// AMD's Zen 1 to 3.
    Avx2,
}

impl Isa {
    /// The instruction sets this CPU runs, fastest first.
    pub(super) fn supported() -> Vec<Isa> {
        let mut found = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                found.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                found.push(Isa::Avx2);
            }
        }
        found
    }

    /// The fastest instruction set this CPU runs, if it runs any.
    pub(super) fn best() -> Option<Isa> {
        Isa::supported().first().copied()
    }
}

/// Whether this CPU runs the direct convolution (with AVX-512, or AVX2 and FMA).
pub(super) fn available() -> bool {
    Isa::best().is_some()
}

/// Whether this CPU runs the direct weight gradient (with AVX-512).
pub(super) fn weight_grad_available() -> bool {
    Isa::best() == Some(Isa::Avx512)
}

/// For each tile and output channel r: `out`[r·out_stride + tile.out[q]..][..16] = Σ over
/// taps t and input channels c of `taps`[r / CHANNELS][t][c][r % CHANNELS] times `src`[c·plane + offsets[t] +
/// tile.src[q]..][..16]. Each output is summed in the same order (taps, then channels, each
/// product fused into the running sum) whatever the tile, thread or instruction set.
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
    let isa = Isa::best().expect("the direct convolution needs AVX-512, or AVX2 and FMA");
    run_in(isa, m, k, taps, offsets, src, plane, tiles, out_stride, out)
}

/// [`run`] in the given instruction set (the tests run each one the CPU has).
#[allow(clippy::too_many_arguments)]
fn run_in(
    isa: Isa,
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
    assert!(Isa::supported().contains(&isa), "the direct convolution: this CPU lacks {isa:?}");
    assert!(taps.len() >= m.div_ceil(CHANNELS) * CHANNELS * 9 * k, "direct convolution: too few weights");
    let reach = offsets.iter().max().copied().unwrap_or(0) + 16;
    for t in tiles {
        for (&s, &o) in t.src.iter().zip(&t.out) {
            assert!(k == 0 || src.len() >= (k - 1) * plane + reach + s, "direct convolution: input too short");
            assert!(m == 0 || out.len() >= (m - 1) * out_stride + o + 16, "direct convolution: output too short");
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU runs `isa` (asserted above), and the asserts bound every read of `taps`
    // and `src` and every write of `out` that the tiles make.
    unsafe {
        match isa {
            Isa::Avx512 => x86::run(m, k, taps, offsets, src, plane, tiles, out_stride, out),
            Isa::Avx2 => avx2::run(m, k, taps, offsets, src, plane, tiles, out_stride, out),
        }
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
    assert!(weight_grad_available(), "the direct weight gradient needs AVX-512");
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

/// The convolution in AVX2 with FMA: each 16-lane vector of the AVX-512 kernel is two 8-lane
/// halves, and the tiles are cut smaller to fit 16 registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, CHANNELS};

    /// Output channels of one AVX2 tile, which covers one 16-lane vector of a [`Tile`]: 4 × 2
    /// accumulators, the two halves of the input and a broadcast weight, 11 of the 16 registers.
    const ROWS: usize = 4;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
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
        // Output-channel blocks outermost, as in AVX-512, so that a block's weights stay in L1
        // across positions.
        for o0 in (0..m).step_by(CHANNELS) {
            let rows = (m - o0).min(CHANNELS);
            for t in tiles {
                for (&s, &o) in t.src.iter().zip(&t.out) {
                    for r0 in (0..rows).step_by(ROWS) {
                        let args = (o0, r0, k, taps, offsets, src, plane, s, o);
                        // SAFETY: as for `run` (the caller's asserts bound every tile).
                        unsafe {
                            match rows - r0 {
                                1 => tile::<1>(args, out_stride, out),
                                2 => tile::<2>(args, out_stride, out),
                                3 => tile::<3>(args, out_stride, out),
                                _ => tile::<ROWS>(args, out_stride, out),
                            }
                        }
                    }
                }
            }
        }
    }

    type TileArgs<'a> = (usize, usize, usize, &'a [f32], &'a [usize; 9], &'a [f32], usize, usize, usize);

    /// Output channels `o0 + r0..o0 + r0 + R` at one 16-lane vector, read at `s` and written at
    /// `o`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        (o0, r0, k, taps, offsets, src, plane, s, o): TileArgs<'_>,
        out_stride: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller keeps `o0 + r0 + R <= m` and every read of `src` and write of `out`
        // inside their lengths (see `direct::run`).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for (tap, &off) in offsets.iter().enumerate() {
                let w_t = taps.as_ptr().add((o0 / CHANNELS * 9 + tap) * k * CHANNELS + r0);
                let s_t = src.as_ptr().add(off + s);
                for c in 0..k {
                    let p = s_t.add(c * plane);
                    let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
                    let w = w_t.add(c * CHANNELS);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let wr = _mm256_set1_ps(*w.add(r));
                        acc[0] = _mm256_fmadd_ps(wr, v[0], acc[0]);
                        acc[1] = _mm256_fmadd_ps(wr, v[1], acc[1]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let d = out.as_mut_ptr().add((o0 + r0 + r) * out_stride + o);
                _mm256_storeu_ps(d, acc[0]);
                _mm256_storeu_ps(d.add(8), acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) from a seeded xorshift, every 17th scaled by 10⁴ so that rounding
    /// differs between summation orders.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                if i % 17 == 0 {
                    v * 1e4
                } else {
                    v
                }
            })
            .collect()
    }

    /// The forward kernel's sum, lane by lane in scalar code, in the order its doc comment gives.
    #[allow(clippy::too_many_arguments)]
    fn reference_run(
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
        for t in tiles {
            for q in 0..VECTORS {
                for r in 0..m {
                    for lane in 0..16 {
                        let mut acc = 0f32;
                        for (tap, &off) in offsets.iter().enumerate() {
                            for c in 0..k {
                                let w = taps[((r / CHANNELS) * 9 + tap) * k * CHANNELS + c * CHANNELS + r % CHANNELS];
                                acc = w.mul_add(src[c * plane + off + t.src[q] + lane], acc);
                            }
                        }
                        out[r * out_stride + t.out[q] + lane] = acc;
                    }
                }
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn every_instruction_set_convolves_to_the_reference_bits() {
        let isas = Isa::supported();
        #[cfg(target_arch = "x86_64")]
        assert!(!isas.is_empty(), "an x86-64 test machine without AVX2: the direct convolution is not tested");
        eprintln!("the direct convolution tested in {isas:?}");
        // A 6×6 plane with its zero border (8 wide), 13 output channels (a full block of 8 and a
        // tail of 5: the AVX2 tiles of 4, then 1), 5 input channels.
        let (m, k, wp): (usize, usize, usize) = (13, 5, 8);
        let plane = wp * wp + 64;
        let offsets: [usize; 9] = std::array::from_fn(|t| (t / 3) * wp + t % 3);
        let taps = values(m.div_ceil(CHANNELS) * CHANNELS * 9 * k, 1);
        let src = values(k * plane + 64, 2);
        let tiles = [Tile { src: [0, 16, 32], out: [0, 16, 32] }, Tile { src: [3, 21, 40], out: [48, 64, 80] }];
        let out_stride = 96;
        let mut want = vec![0f32; m * out_stride];
        reference_run(m, k, &taps, &offsets, &src, plane, &tiles, out_stride, &mut want);
        for &isa in &isas {
            let mut got = vec![0f32; m * out_stride];
            run_in(isa, m, k, &taps, &offsets, &src, plane, &tiles, out_stride, &mut got);
            assert_eq!(bits(&got), bits(&want), "{isa:?}: the forward kernel");
        }
    }
}
