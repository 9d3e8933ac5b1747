//! ReLU and 2×2 max-pooling as single-pass CPU custom ops, plus the per-channel sum that gives a
//! bias its gradient.
//!
//! candle's ReLU backward takes four passes and its max-pool backward six; worse, candle 0.11.1's
//! max-pool gradient is scaled wrongly (a unique maximum receives a quarter of the gradient, four
//! tied maxima the whole gradient each). These ops follow PyTorch: the max-pool gradient goes to
//! the first maximum of each window (row-major, NaN counting as the maximum) and the ReLU
//! gradient passes where the output is positive. On a GPU (the `cuda` feature) both ops run CUDA
//! kernels with the same rules (`kernels::cuda`); other devices and dtypes keep candle's ops.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::norm::lane_sum;
use super::{built_in_pieces, f32_data, kept_or_zero, vectorized};

/// Elementwise work is cut into pieces of at least this many values.
const MIN_PIECE: usize = 1 << 14;

fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `max(x, 0)`, with PyTorch's gradient (passed where the output is positive).
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast(x) {
        x.apply_op1(Relu)
    } else if cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32 {
        // One kernel each way: candle's ReLU backward is four kernels, each with its own buffer.
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

/// The ReLU's input gradient from its output `y` and the output gradient (no gradient of its
/// own): for ops with a ReLU folded in.
pub(crate) fn relu_grad(y: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    y.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ReluGrad)
}

/// 2×2 max-pooling with stride 2 over [n, c, h, w] (odd edges dropped), with PyTorch's gradient.
pub fn max_pool2(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast(x) && x.rank() == 4 {
        x.apply_op1(MaxPool2)
    } else if cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32 && x.rank() == 4 {
        // Our kernels: candle's own max-pool gradient is wrong (see `kernels::cuda`).
        x.contiguous()?.apply_op1(MaxPool2)
    } else {
        x.max_pool2d(2)
    }
}

/// The input gradient of [`max_pool2`] at input `x` (as its backward pass computes it: each
/// output's gradient to the first maximum of its window).
pub(crate) fn max_pool2_grad(x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    if !(fast(x) || (cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32)) || x.rank() != 4 {
        bail!(
            "max-pool gradient: {:?} {:?} is pooled by candle's own op, whose gradient only candle's autograd computes",
            x.dtype(),
            x.dims()
        )
    }
    x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2Grad)
}

/// Sum over n, h and w of an [n, c, h, w] tensor: [c] (no gradient).
pub(super) struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "layerlab-channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, c, h, w] = l.dims() else { bail!("channel sum wants [n, c, h, w], got {:?}", l.dims()) };
        let x = f32_data(s, l)?;
        Ok((CpuStorage::F32(channel_sum(&x, n, c, h * w)), Shape::from(c)))
    }
}

/// Sum over n and the `hw` positions of [n, c, hw] values, per channel, in a fixed order.
pub(crate) fn channel_sum(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            vectorized(|| (0..n).map(|i| lane_sum(&x[(i * c + ch) * hw..][..hw], |v| v) as f64).sum::<f64>() as f32)
        })
        .collect()
}

/// `max(x, 0)` on values, in parallel pieces.
pub(crate) fn relu_values(x: &[f32]) -> Vec<f32> {
    zip_map(x, x, |v, _| if v < 0.0 { 0.0 } else { v })
}

/// The ReLU's input gradient from its output `y` and output gradient.
pub(crate) fn relu_grad_values(y: &[f32], grad: &[f32]) -> Vec<f32> {
    zip_map(y, grad, |y, g| kept_or_zero(y > 0.0, g))
}

/// `dst[i] = f(a[i], b[i])` in parallel pieces.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(MIN_PIECE).zip(a.par_chunks(MIN_PIECE)).zip(b.par_chunks(MIN_PIECE)).for_each(|((o, a), b)| {
        vectorized(|| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = f(*a, *b);
            }
        })
    });
    out
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "layerlab-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        Ok((CpuStorage::F32(relu_values(&x)), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::relu(s, l)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(relu_grad(res, grad)?))
    }
}

/// `grad` where the ReLU output is positive, else 0.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "layerlab-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!("relu gradient {:?} does not match its output {:?}", l2.dims(), l1.dims())
        }
        let (y, grad) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        Ok((CpuStorage::F32(relu_grad_values(&y, &grad)), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::relu_grad(s1, l1, s2, l2)
    }
}

struct MaxPool2;

/// Index (0..4, row-major) of the first maximum of a 2×2 window, NaN counting as the maximum.
#[inline]
fn window_argmax(v: [f32; 4]) -> u8 {
    let mut best = 0;
    for i in 1..4 {
        if v[i] > v[best] || (v[i].is_nan() && !v[best].is_nan()) {
            best = i;
        }
    }
    best as u8
}

/// Copies each h × w plane of `src` into the middle of the (h + 2·pad) × (w + 2·pad) planes of
/// `dst`, leaving their borders as they are (callers zero them). `dst` may run on past its last
/// plane.
pub(crate) fn pad_planes(dst: &mut [f32], src: &[f32], h: usize, w: usize, pad: usize) {
    let wp = w + 2 * pad;
    for (plane, src) in dst.chunks_exact_mut((h + 2 * pad) * wp).zip(src.chunks_exact(h * w)) {
        for (row, src) in plane.chunks_exact_mut(wp).skip(pad).zip(src.chunks_exact(w)) {
            row[pad..pad + w].copy_from_slice(src);
        }
    }
}

/// 2×2 max-pooling of `planes` planes of h × w values: the pooled values and, for each, where
/// its window's first maximum lies (0..4, row-major; NaN counting as the maximum), which is where
/// the backward pass ([`max_pool2_grad_from`]) sends its gradient.
///
/// Why the positions: the backward pass then reads a byte per window instead of the whole input
/// again, and the tape can drop the input as soon as the pooled values exist.
pub(crate) fn max_pool2_with_argmax(x: &[f32], planes: usize, h: usize, w: usize) -> (Vec<f32>, Vec<u8>) {
    let (ho, wo) = (h / 2, w / 2);
    let (mut y, mut at) = (vec![0f32; planes * ho * wo], vec![0u8; planes * ho * wo]);
    if ho * wo > 0 {
        let group = plane_group(ho * wo);
        let min_groups = MIN_PIECE.div_ceil(group * h * w);
        let (y_groups, at_groups) = (y.par_chunks_mut(group * ho * wo), at.par_chunks_mut(group * ho * wo));
        y_groups.zip(at_groups).with_min_len(min_groups).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(top, bottom), (i, (y, at))| {
                let x = &x[i * group * h * w..][..y.len() / (ho * wo) * h * w];
                if w >= WIDE_ROW {
                    let rows = x.chunks_exact(h * w).flat_map(|plane| plane.chunks_exact(2 * w).take(ho));
                    for ((pair, y), at) in rows.zip(y.chunks_exact_mut(wo)).zip(at.chunks_exact_mut(wo)) {
                        pool_rows(&pair[..w], &pair[w..], y, at);
                    }
                } else {
                    // Narrow planes: the upper and the lower rows of all windows each laid end
                    // to end, so that the group's windows make one long row.
                    let (r0, r1): (&mut Vec<f32>, &mut Vec<f32>) = (top, bottom);
                    r0.clear();
                    r1.clear();
                    for pair in x.chunks_exact(h * w).flat_map(|plane| plane.chunks_exact(2 * w).take(ho)) {
                        r0.extend_from_slice(&pair[..2 * wo]);
                        r1.extend_from_slice(&pair[w..w + 2 * wo]);
                    }
                    pool_rows(r0, r1, y, at);
                }
            },
        );
    }
    (y, at)
}

/// Planes pooled together, so that a group has at least 64 windows (eight vectors' worth) when
/// the planes are small: a function of the shape only.
fn plane_group(windows: usize) -> usize {
    64usize.div_ceil(windows.max(1))
}

/// Rows at least this wide are pooled in place; narrower ones are first laid end to end.
const WIDE_ROW: usize = 16;

/// 2×2 max-pooling of `planes` planes of h × w values (odd edges dropped).
pub(crate) fn max_pool2_values(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    max_pool2_with_argmax(x, planes, h, w).0
}

/// One row of windows: the maxima of the windows over rows `r0` and `r1` into `y`, their
/// positions into `at`.
#[inline]
fn pool_rows(r0: &[f32], r1: &[f32], y: &mut [f32], at: &mut [u8]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        done = unsafe { avx2::pool_rows(r0, r1, y, at) };
    }
    for ox in done..y.len() {
        let i = 2 * ox;
        at[ox] = window_argmax([r0[i], r0[i + 1], r1[i], r1[i + 1]]);
        y[ox] = [r0[i], r0[i + 1], r1[i], r1[i + 1]][at[ox] as usize];
    }
}

/// [`pool_rows`] eight windows at a time in AVX2, with [`window_argmax`]'s choices.
///
/// Why by hand: written plainly, the choice between a window's values compiled to a branch per
/// value, and pooling ran at 2 GB/s or less.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Pools the first windows of [`super::pool_rows`]'s rows in groups of eight; returns how many.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pool_rows(r0: &[f32], r1: &[f32], y: &mut [f32], at: &mut [u8]) -> usize {
        let groups = y.len().min(at.len()).min(r0.len() / 2).min(r1.len() / 2) / 8;
        for g in 0..groups {
            // SAFETY: window 8g + 7 reads values up to 16g + 15 < r0.len(), r1.len(); the writes
            // stop at 8g + 7 < y.len(), at.len().
            unsafe {
                let (top, bottom) = (split(r0.as_ptr().add(16 * g)), split(r1.as_ptr().add(16 * g)));
                let (mut best, mut pos) = (top.0, _mm256_setzero_ps());
                for (k, v) in [(1.0, top.1), (2.0, bottom.0), (3.0, bottom.1)] {
                    // v replaces the best so far where it is larger, or NaN while the best is not.
                    let larger = _mm256_cmp_ps::<_CMP_GT_OQ>(v, best);
                    let nan = _mm256_andnot_ps(
                        _mm256_cmp_ps::<_CMP_UNORD_Q>(best, best),
                        _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v),
                    );
                    let take = _mm256_or_ps(larger, nan);
                    best = _mm256_blendv_ps(best, v, take);
                    pos = _mm256_blendv_ps(pos, _mm256_set1_ps(k), take);
                }
                _mm256_storeu_ps(y.as_mut_ptr().add(8 * g), best);
                let mut p = [0i32; 8];
                _mm256_storeu_si256(p.as_mut_ptr().cast(), _mm256_cvtps_epi32(pos));
                for (a, p) in at[8 * g..][..8].iter_mut().zip(p) {
                    *a = p as u8;
                }
            }
        }
        8 * groups
    }

    /// [`super::unpool_rows`] for the first windows, in groups of eight; returns how many.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn unpool_rows(at: &[u8], grad: &[f32], top: &mut [f32], bottom: &mut [f32]) -> usize {
        let groups = at.len().min(grad.len()).min(top.len() / 2).min(bottom.len() / 2) / 8;
        for g in 0..groups {
            // SAFETY: group g reads `at` and `grad` at 8g..8g + 8 and writes `top` and `bottom` at
            // 16g..16g + 16, all inside their lengths.
            unsafe {
                let pos = _mm256_cvtepu8_epi32(_mm_loadl_epi64(at.as_ptr().add(8 * g).cast()));
                let v = _mm256_loadu_ps(grad.as_ptr().add(8 * g));
                let at_k =
                    |k: i32| _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(pos, _mm256_set1_epi32(k))));
                for (row, (left, right)) in
                    [(top.as_mut_ptr(), (at_k(0), at_k(1))), (bottom.as_mut_ptr(), (at_k(2), at_k(3)))]
                {
                    // Left and right values of each window side by side: windows 0, 1 | 4, 5 and
                    // 2, 3 | 6, 7, then the halves put in order.
                    let (lo, hi) = (_mm256_unpacklo_ps(left, right), _mm256_unpackhi_ps(left, right));
                    _mm256_storeu_ps(row.add(16 * g), _mm256_permute2f128_ps::<0x20>(lo, hi));
                    _mm256_storeu_ps(row.add(16 * g + 8), _mm256_permute2f128_ps::<0x31>(lo, hi));
                }
            }
        }
        8 * groups
    }

    /// The 16 values at `r` as (the left values of eight windows, the right values).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn split(r: *const f32) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 16 readable values at `r`.
        let (a, b) = unsafe { (_mm256_loadu_ps(r), _mm256_loadu_ps(r.add(8))) };
        // Within each 128-bit half: [a0 a2 b0 b2 | a4 a6 b4 b6]; the middle quarters swapped then
        // put the eight in order.
        let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
        (order(_mm256_shuffle_ps::<0b10_00_10_00>(a, b)), order(_mm256_shuffle_ps::<0b11_01_11_01>(a, b)))
    }
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "layerlab-max-pool2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, c, h, w] = l.dims() else { bail!("max-pool wants [n, c, h, w], got {:?}", l.dims()) };
        let (ho, wo) = (h / 2, w / 2);
        let x = f32_data(s, l)?;
        let y = max_pool2_values(&x, n * c, h, w);
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::max_pool2(s, l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2Grad)?))
    }
}

/// The input gradient of [`max_pool2_values`]: each pooled gradient goes to the first maximum of
/// its window, read again from the input `x`.
pub(crate) fn max_pool2_grad_values(x: &[f32], grad: &[f32], h: usize, w: usize) -> Vec<f32> {
    let planes = x.len() / (h * w).max(1);
    let (_, at) = max_pool2_with_argmax(x, planes, h, w);
    max_pool2_grad_from(&at, grad, planes, h, w)
}

/// The input gradient [planes, h, w] of a 2×2 max-pool from the positions of its windows' maxima
/// ([`max_pool2_with_argmax`]) and its output gradient: each gradient to its window's maximum,
/// zero elsewhere (and on the odd edges the pool dropped).
pub(crate) fn max_pool2_grad_from(at: &[u8], grad: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    if wo * ho == 0 {
        return vec![0.0; planes * h * w];
    }
    let group = plane_group(ho * wo);
    built_in_pieces(planes * h * w, group * h * w, |i, dx| {
        let windows = i * group * ho * wo..((i + 1) * group).min(planes) * ho * wo;
        let (at, grad) = (&at[windows.clone()], &grad[windows]);
        let (mut top, mut bottom) = (vec![0f32; 2 * at.len()], vec![0f32; 2 * at.len()]);
        unpool_rows(at, grad, &mut top, &mut bottom);
        let pairs = top.chunks_exact(2 * wo).zip(bottom.chunks_exact(2 * wo));
        for (k, (r0, r1)) in pairs.enumerate() {
            for r in [r0, r1] {
                dx.extend(r.iter().copied());
                dx.extend((2 * wo..w).map(|_| 0.0));
            }
            if k % ho == ho - 1 {
                // The plane's last row, when h is odd.
                dx.extend((2 * ho * w..h * w).map(|_| 0.0));
            }
        }
    })
}

/// The gradients of one row of windows (maxima at `at`, gradients `grad`) into the windows'
/// upper row `top` and lower row `bottom`: each gradient at its maximum, zero elsewhere.
#[inline]
fn unpool_rows(at: &[u8], grad: &[f32], top: &mut [f32], bottom: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        done = unsafe { avx2::unpool_rows(at, grad, top, bottom) };
    }
    for i in done..at.len().min(grad.len()) {
        let keep = |k: u8| kept_or_zero(at[i] == k, grad[i]);
        (top[2 * i], top[2 * i + 1], bottom[2 * i], bottom[2 * i + 1]) = (keep(0), keep(1), keep(2), keep(3));
    }
}

/// Routes each pooled gradient to the first maximum of its window.
struct MaxPool2Grad;

impl CustomOp2 for MaxPool2Grad {
    fn name(&self) -> &'static str {
        "layerlab-max-pool2-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, c, h, w] = l1.dims() else { bail!("max-pool wants [n, c, h, w], got {:?}", l1.dims()) };
        let (ho, wo) = (h / 2, w / 2);
        if l2.dims() != [n, c, ho, wo] {
            bail!("max-pool gradient {:?} does not fit input {:?}", l2.dims(), l1.dims())
        }
        let (x, grad) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let dx = max_pool2_grad_values(&x, &grad, h, w);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::max_pool2_grad(s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::conv2d::tests::{max_rel_diff, random};

    fn grad_of(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor());
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    }

    #[test]
    fn max_pool_matches_candle_forward_and_routes_gradient_to_the_first_maximum() {
        // Odd sizes, and rows longer than the 64 values pooled at a time.
        for shape in [[2, 3, 7, 6], [1, 2, 5, 133]] {
            let x = random(&shape, 1);
            assert!(max_rel_diff(&max_pool2(&x).unwrap(), &x.max_pool2d(2).unwrap()) == 0.0, "{shape:?}");
        }
        // A NaN anywhere in a window is its maximum.
        for at in 0..4 {
            let mut v = vec![1f32, 2., 3., 4.];
            v[at] = f32::NAN;
            let x = Tensor::from_vec(v, (1, 1, 2, 2), &Device::Cpu).unwrap();
            let y = max_pool2(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(y[0].is_nan(), "NaN at {at} gave {y:?}");
        }
        let x = Tensor::new(&[[[[1f32, 5., 0., 0.], [5., 2., 0., 0.], [3., 4., 9., 9.]]]], &Device::Cpu).unwrap();
        let r = Tensor::new(&[[[[10f32, 20.]]]], &Device::Cpu).unwrap();
        let (y, gx) = grad_of(|x| max_pool2(x).unwrap(), &x, &r);
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [5., 0.]);
        let want = [0f32, 10., 20., 0., 0., 0., 0., 0., 0., 0., 0., 0.];
        assert_eq!(gx.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }

    /// The vector path (eight windows at a time) against the one-window rule, on rows long enough
    /// for it and with a tail: NaNs and ties in every position of a window, and the gradient
    /// routed by the positions against a scatter by hand.
    #[test]
    fn pooling_picks_each_windows_first_maximum_and_routes_its_gradient_there() {
        // Wide rows pooled in place (with a tail), and narrow odd-sized planes laid end to end.
        for (planes, h, w) in [(3, 4, 38), (40, 5, 7)] {
            let mut x = random(&[planes, h, w], 5 + w as u64).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, v) in x.iter_mut().enumerate() {
                match i % 23 {
                    0 => *v = f32::NAN,
                    5 | 6 => *v = 7.0, // two tied maxima in one window, or in neighbouring ones
                    _ => {}
                }
            }
            let (y, at) = max_pool2_with_argmax(&x, planes, h, w);
            let (ho, wo) = (h / 2, w / 2);
            let mut want_dx = vec![0f32; x.len()];
            let grad: Vec<f32> = (0..y.len()).map(|i| i as f32 + 1.0).collect();
            for p in 0..planes {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let idx = [0, 1, w, w + 1].map(|d| p * h * w + 2 * oy * w + 2 * ox + d);
                        let best = window_argmax(idx.map(|i| x[i]));
                        let o = (p * ho + oy) * wo + ox;
                        assert_eq!(at[o], best, "window ({p}, {oy}, {ox})");
                        assert_eq!(y[o].to_bits(), x[idx[best as usize]].to_bits(), "window ({p}, {oy}, {ox})");
                        want_dx[idx[best as usize]] = grad[o];
                    }
                }
            }
            assert!(at.contains(&3) && y.iter().any(|v| v.is_nan()));
            assert_eq!(max_pool2_grad_from(&at, &grad, planes, h, w), want_dx);
        }
    }

    #[test]
    fn relu_matches_candle_away_from_zero() {
        let x = random(&[3, 4, 5, 6], 2);
        let r = random(&[3, 4, 5, 6], 3);
        let (y, g) = grad_of(|x| relu(x).unwrap(), &x, &r);
        let (y_ref, g_ref) = grad_of(|x| x.relu().unwrap(), &x, &r);
        assert!(max_rel_diff(&y, &y_ref) == 0.0 && max_rel_diff(&g, &g_ref) == 0.0);
    }

    #[test]
    fn channel_sum_sums_all_but_the_channel_axis() {
        let x = random(&[3, 4, 5, 2], 4);
        let ours = x.apply_op1_no_bwd(&ChannelSum).unwrap();
        let theirs = x.sum_keepdim(0).unwrap().sum_keepdim(2).unwrap().sum_keepdim(3).unwrap().flatten_all().unwrap();
        assert!(max_rel_diff(&ours, &theirs) < 1e-5);
    }
}
