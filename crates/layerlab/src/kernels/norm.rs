//! BatchNorm over NCHW f32 tensors on the CPU as fused custom ops (one pass per direction).
//!
//! Written with candle ops, training-mode BatchNorm took a dozen passes over the activations
//! forward and far more backward (strided reductions over the batch axis, broadcasts and their
//! gradients). Here the statistics are per-channel reductions over fixed groups of images, added
//! in a fixed order, so results do not depend on the thread count.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{built_in_pieces, f32_data, kept_or_zero, vectorized, KeptOp3, Piece};

/// Whether the fused ops handle this activation tensor.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4
}

/// Per-channel batch mean and biased variance of `x` [n, c, h, w], as a [2, c] tensor with no
/// gradient (the same values [`train`] normalises with).
pub fn batch_stats(x: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op1_no_bwd(&Stats)
}

/// Training-mode BatchNorm of `x` [n, c, h, w] with per-channel `weight` and `bias` [c], followed
/// by a ReLU when `relu`, as one op: gradients flow to all three. Also returns the batch
/// statistics it normalised with, as [`batch_stats`] gives them (a [2, c] tensor, no gradient),
/// computed once: the forward pass keeps them for the backward pass, so neither pass recomputes
/// them. The ReLU inside the op saves a separate node, whose gradient candle would accumulate
/// into a fresh zero tensor. The op itself comes back too, for a backward pass without candle's
/// graph ([`crate::backward`]).
pub fn train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, Tensor, KeptOp3)> {
    let kept = Arc::new(Mutex::new(None));
    let op: KeptOp3 = Arc::new(Box::new(Train { eps, relu, kept: kept.clone() }));
    let y = x.apply_op3_arc(weight, bias, op.clone())?;
    let Some(k) = kept.lock().expect("BatchNorm statistics lock").clone() else {
        bail!("BatchNorm forward pass kept no statistics")
    };
    let stats = k.stats.iter().map(|s| s.0 as f32).chain(k.stats.iter().map(|s| s.1 as f32)).collect::<Vec<_>>();
    let c = k.stats.len();
    Ok((y, Tensor::from_vec(stats, (2, c), x.device())?, op))
}

/// `x · scale + shift` per channel, then a ReLU when `relu`, without gradient (evaluation-mode
/// BatchNorm with the running statistics folded into `scale` and `shift`).
pub fn affine_no_grad(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
    x.apply_op3_no_bwd(scale, shift, &Affine { relu })
}

fn dims(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let &[n, c, h, w] = l.dims() else { bail!("BatchNorm wants an [n, c, h, w] tensor, got {:?}", l.dims()) };
    Ok((n, c, h * w))
}

fn per_channel<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    c: usize,
    what: &str,
) -> candle_core::Result<std::borrow::Cow<'a, [f32]>> {
    let v = f32_data(s, l)?;
    if v.len() != c {
        bail!("BatchNorm {what} has {} values for {c} channels", v.len())
    }
    Ok(v)
}

/// Sum of a slice in f32 with eight fixed lanes (vectorises; same order every time).
pub(super) fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a += f(*x);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for x in rest {
        s += f(*x);
    }
    s
}

/// A task of [`channel_sums`] takes whole images, about this many values, ...
const TASK_VALUES: usize = 1 << 16;
/// ... and at most this share of the batch, so that small layers still split over the threads.
const MIN_TASKS: usize = 8;

/// Per-channel sums over the planes of [n, c, hw] values: `plane(i, ch)` gives `K` sums over
/// image i's plane of channel ch (in f32), gathered per channel in f64.
///
/// Each task reads whole images in memory order and keeps partial sums for every channel; the
/// partials of the tasks are then added in order. Task sizes depend on the shapes only, so the
/// sums do not depend on the thread count. Why: taken one channel at a time, each task read one
/// plane from every image at a stride of the image size, on 2×2 planes 16 bytes of each cache
/// line, which three other tasks fetched again; the forward pass of the 8×8 to 2×2 layers took
/// 1.2 to 2.4 times as long that way (measured alone, 1 thread).
fn channel_sums<const K: usize>(
    (n, c, hw): (usize, usize, usize),
    plane: impl Fn(usize, usize) -> [f32; K] + Sync,
) -> Vec<[f64; K]> {
    let images = (TASK_VALUES / (c * hw).max(1)).clamp(1, n.div_ceil(MIN_TASKS).max(1));
    let starts: Vec<usize> = (0..n).step_by(images).collect();
    let partials: Vec<Vec<[f64; K]>> = starts
        .into_par_iter()
        .map(|i0| {
            vectorized(|| {
                let mut sums = vec![[0f64; K]; c];
                for i in i0..(i0 + images).min(n) {
                    for (ch, s) in sums.iter_mut().enumerate() {
                        for (s, v) in s.iter_mut().zip(plane(i, ch)) {
                            *s += v as f64;
                        }
                    }
                }
                sums
            })
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut total = parts.next().unwrap_or_else(|| vec![[0f64; K]; c]);
    for p in parts {
        for (t, p) in total.iter_mut().zip(p) {
            t.iter_mut().zip(p).for_each(|(t, p)| *t += p);
        }
    }
    total
}

/// Per-channel mean and biased variance (two passes, plane sums gathered in f64).
fn stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    let count = (n * hw).max(1) as f64;
    let plane = |i: usize, ch: usize| &x[(i * c + ch) * hw..][..hw];
    let mean: Vec<f64> =
        channel_sums((n, c, hw), |i, ch| [lane_sum(plane(i, ch), |v| v)]).into_iter().map(|[s]| s / count).collect();
    let var = channel_sums((n, c, hw), |i, ch| {
        let m = mean[ch] as f32;
        [lane_sum(plane(i, ch), |v| (v - m) * (v - m))]
    });
    mean.into_iter().zip(var).map(|(m, [v])| (m, v / count)).collect()
}

struct Stats;

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "layerlab-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, hw) = dims(l)?;
        let x = f32_data(s, l)?;
        let st = stats(&x, n, c, hw);
        let out = st.iter().map(|s| s.0 as f32).chain(st.iter().map(|s| s.1 as f32)).collect();
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// What a training-mode forward pass keeps for its backward pass.
#[derive(Clone)]
pub(crate) struct Kept {
    /// (mean, biased variance) per channel.
    pub(crate) stats: Vec<(f64, f64)>,
    /// The per-channel factors the output was computed with: y = x · scale + shift.
    scale: Vec<f32>,
    shift: Vec<f32>,
}

struct Train {
    eps: f64,
    relu: bool,
    kept: Arc<Mutex<Option<Kept>>>,
}

impl CustomOp3 for Train {
    fn name(&self) -> &'static str {
        "layerlab-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, hw) = dims(l1)?;
        let x = f32_data(s1, l1)?;
        let (weight, bias) = (per_channel(s2, l2, c, "weight")?, per_channel(s3, l3, c, "bias")?);
        let (y, kept) = train_forward(&x, (n, c, hw), &weight, &bias, self.eps, self.relu);
        *self.kept.lock().expect("BatchNorm statistics lock") = Some(kept);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let size = n * c * h * w;
        let Some(kept) = self.kept.lock().expect("BatchNorm statistics lock").clone() else {
            bail!("BatchNorm backward pass before its forward pass")
        };
        let op = TrainGrad { eps: self.eps, relu: self.relu, kept };
        let packed = x.apply_op3_no_bwd(grad, weight, &op)?;
        let dx = packed.narrow(0, 0, size)?.reshape((n, c, h, w))?;
        let dweight = packed.narrow(0, size, c)?.reshape(weight.shape())?;
        let dbias = packed.narrow(0, size + c, c)?.reshape(weight.shape())?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

/// Training-mode BatchNorm (and a ReLU when `relu`) of [n, c, hw] values: the output and what
/// the backward pass needs.
pub(crate) fn train_forward(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    relu: bool,
) -> (Vec<f32>, Kept) {
    let stats = stats(x, n, c, hw);
    let (scale, shift): (Vec<f32>, Vec<f32>) = stats
        .iter()
        .enumerate()
        .map(|(ch, &(mean, var))| {
            let scale = weight[ch] as f64 / (var + eps).sqrt();
            (scale as f32, (bias[ch] as f64 - mean * scale) as f32)
        })
        .unzip();
    let y = affine(x, c, hw, &scale, &shift, relu);
    (y, Kept { stats, scale, shift })
}

/// `x · scale + shift` per channel of [n, c, hw] values, then a ReLU when `relu`.
pub(crate) fn affine(x: &[f32], c: usize, hw: usize, scale: &[f32], shift: &[f32], relu: bool) -> Vec<f32> {
    built_in_pieces(x.len(), c * hw, |i, y| {
        vectorized(|| {
            for (ch, x) in x[i * c * hw..][..c * hw].chunks_exact(hw.max(1)).enumerate() {
                let (a, b) = (scale[ch], shift[ch]);
                if relu {
                    y.extend(x.iter().map(|x| (x * a + b).max(0.0)));
                } else {
                    y.extend(x.iter().map(|x| x * a + b));
                }
            }
        })
    })
}

/// Evaluation-mode BatchNorm as per-channel (scale, shift) for [`affine`]: the running statistics
/// folded in with the same f32 operations, in the same order, as `model.rs`'s candle ops.
pub(crate) fn eval_factors(mean: &[f32], var: &[f32], weight: &[f32], bias: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    mean.iter()
        .zip(var)
        .zip(weight.iter().zip(bias))
        .map(|((&m, &v), (&w, &b))| {
            let scale = (v + eps as f32).sqrt().recip() * w;
            (scale, b - m * scale)
        })
        .unzip()
}

struct TrainGrad {
    eps: f64,
    relu: bool,
    kept: Kept,
}

impl CustomOp3 for TrainGrad {
    fn name(&self) -> &'static str {
        "layerlab-batch-norm-train-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, hw) = dims(l1)?;
        if l2.dims() != l1.dims() {
            bail!("BatchNorm gradient {:?} does not match its input {:?}", l2.dims(), l1.dims())
        }
        let (x, dy) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let weight = per_channel(s3, l3, c, "weight")?;
        let (mut out, dweight, dbias) = train_backward(&x, &dy, (n, c, hw), &weight, &self.kept, self.eps, self.relu);
        out.extend(dweight);
        out.extend(dbias);
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

/// The gradients of [`train_forward`] from its input `x` and output gradient `dy`: (dx, d weight,
/// d bias).
pub(crate) fn train_backward(
    x: &[f32],
    dy: &[f32],
    (n, c, hw): (usize, usize, usize),
    weight: &[f32],
    kept: &Kept,
    eps: f64,
    relu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let count = (n * hw).max(1) as f64;
    let st = &kept.stats;
    // Through the ReLU first: the gradient passes where the output was positive, which the
    // forward pass's own factors tell again from x. Both passes below apply the mask as they
    // read dy, rather than a pass of its own writing a masked copy.
    let mask = |ch: usize| relu.then(|| (kept.scale[ch], kept.shift[ch]));
    // Per channel: Σdy and Σdy·(x - mean), each plane in f32 lanes, planes summed in f64.
    let sums = channel_sums((n, c, hw), |i, ch| {
        let plane = (i * c + ch) * hw..(i * c + ch + 1) * hw;
        let (sum, dot) = sum_and_dot_centered(&x[plane.clone()], &dy[plane], st[ch].0 as f32, mask(ch));
        [sum, dot]
    });
    // dx = a·dy + b·x + d with a = weight·inv_std,
    // b = -a·inv_std²·Σdy(x - mean)/M and d = -a·Σdy/M - b·mean.
    let (mut coef, mut dweight, mut dbias) = (Vec::with_capacity(c), Vec::with_capacity(c), Vec::with_capacity(c));
    for ch in 0..c {
        let (mean, var) = st[ch];
        let [s_dy, s_dyx] = sums[ch];
        let inv_std = 1.0 / (var + eps).sqrt();
        let a = weight[ch] as f64 * inv_std;
        let b = -a * inv_std * inv_std * s_dyx / count;
        let d = -a * s_dy / count - b * mean;
        coef.push((a as f32, b as f32, d as f32));
        dweight.push((s_dyx * inv_std) as f32);
        dbias.push(s_dy as f32);
    }
    let dx = built_in_pieces(x.len(), c * hw, |i, dx| {
        let image = i * c * hw..(i + 1) * c * hw;
        let planes = x[image.clone()].chunks_exact(hw.max(1)).zip(dy[image].chunks_exact(hw.max(1)));
        for (ch, (x, dy)) in planes.enumerate() {
            input_grad(x, dy, coef[ch], mask(ch), dx);
        }
    });
    (dx, dweight, dbias)
}

/// Σ dy and Σ dy·(x - m) in eight fixed lanes each, dy taken as 0 where `mask` = (a, b) gives
/// x·a + b ≤ 0 (the ReLU after BatchNorm did not pass it).
#[inline(always)]
fn sum_and_dot_centered(x: &[f32], dy: &[f32], m: f32, mask: Option<(f32, f32)>) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::sum_and_dot_centered(x, dy, m, mask) };
    }
    portable::sum_and_dot_centered(x, dy, m, mask)
}

/// dx = a·dy + b·x + d over one plane (`coef` = (a, b, d)), dy masked as in
/// [`sum_and_dot_centered`], appended to `out`.
#[inline(always)]
fn input_grad(x: &[f32], dy: &[f32], coef: (f32, f32, f32), mask: Option<(f32, f32)>, out: &mut Piece<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::input_grad(x, dy, coef, mask, out) };
    }
    portable::input_grad(x, dy, coef, mask, out)
}

/// The sum of eight lanes, in a fixed order.
#[inline(always)]
fn fold8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// [`sum_and_dot_centered`] and [`input_grad`] for any CPU.
mod portable {
    use super::{fold8, kept_or_zero, Piece};

    #[inline(always)]
    pub(super) fn sum_and_dot_centered(x: &[f32], dy: &[f32], m: f32, mask: Option<(f32, f32)>) -> (f32, f32) {
        let masked = |x: f32, dy: f32| match mask {
            Some((a, b)) => kept_or_zero(x * a + b > 0.0, dy),
            None => dy,
        };
        let (mut sum, mut dot) = ([0f32; 8], [0f32; 8]);
        let (xc, dc) = (x.chunks_exact(8), dy.chunks_exact(8));
        let (xr, dr) = (xc.remainder(), dc.remainder());
        for (x, d) in xc.zip(dc) {
            for l in 0..8 {
                let d = masked(x[l], d[l]);
                sum[l] += d;
                dot[l] += (x[l] - m) * d;
            }
        }
        let (mut s, mut t) = (fold8(sum), fold8(dot));
        for (x, d) in xr.iter().zip(dr) {
            let d = masked(*x, *d);
            s += d;
            t += (x - m) * d;
        }
        (s, t)
    }

    #[inline(always)]
    pub(super) fn input_grad(
        x: &[f32],
        dy: &[f32],
        (a, b, d): (f32, f32, f32),
        mask: Option<(f32, f32)>,
        out: &mut Piece<'_>,
    ) {
        match mask {
            Some((sa, sb)) => {
                out.extend(x.iter().zip(dy).map(|(x, dy)| a * kept_or_zero(x * sa + sb > 0.0, *dy) + b * x + d))
            }
            None => out.extend(x.iter().zip(dy).map(|(x, dy)| a * dy + b * x + d)),
        }
    }
}

/// [`sum_and_dot_centered`] and [`input_grad`] in AVX2 intrinsics, with the same operations in
/// the same order (no fused multiply-adds), so that results equal the portable code's.
///
/// Why not left to the compiler: with the ReLU's mask it tested each lane with a branch (a
/// select between a loaded value and zero), mispredicted half the time on real activations;
/// BatchNorm's backward pass with the mask took 3.5 times as long as without.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{fold8, kept_or_zero, portable, Piece};

    /// dy where x·a + b > 0 (false for NaN, as [`kept_or_zero`]'s test), else +0.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn masked(x: __m256, dy: __m256, mask: Option<(__m256, __m256)>) -> __m256 {
        match mask {
            Some((a, b)) => {
                let pass = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_add_ps(_mm256_mul_ps(x, a), b), _mm256_setzero_ps());
                _mm256_and_ps(dy, pass)
            }
            None => dy,
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum_and_dot_centered(x: &[f32], dy: &[f32], m: f32, mask: Option<(f32, f32)>) -> (f32, f32) {
        let len = x.len().min(dy.len());
        let body = len - len % 8;
        let vmask = mask.map(|(a, b)| (_mm256_set1_ps(a), _mm256_set1_ps(b)));
        let vm = _mm256_set1_ps(m);
        let (mut sum, mut dot) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= body <= the length of both slices.
            let (xv, dv) = unsafe { (_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(dy.as_ptr().add(i))) };
            let d = masked(xv, dv, vmask);
            sum = _mm256_add_ps(sum, d);
            dot = _mm256_add_ps(dot, _mm256_mul_ps(_mm256_sub_ps(xv, vm), d));
        }
        let lanes = |v: __m256| {
            let mut a = [0f32; 8];
            // SAFETY: `a` holds eight f32s.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
            a
        };
        let (mut s, mut t) = (fold8(lanes(sum)), fold8(lanes(dot)));
        for (x, d) in x[body..len].iter().zip(&dy[body..len]) {
            let d = match mask {
                Some((a, b)) => kept_or_zero(x * a + b > 0.0, *d),
                None => *d,
            };
            s += d;
            t += (x - m) * d;
        }
        (s, t)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn input_grad(
        x: &[f32],
        dy: &[f32],
        (a, b, d): (f32, f32, f32),
        mask: Option<(f32, f32)>,
        out: &mut Piece<'_>,
    ) {
        let len = x.len().min(dy.len()).min(out.rest().len());
        let body = len - len % 8;
        let vmask = mask.map(|(a, b)| (_mm256_set1_ps(a), _mm256_set1_ps(b)));
        let (va, vb, vd) = (_mm256_set1_ps(a), _mm256_set1_ps(b), _mm256_set1_ps(d));
        let dst = out.rest().as_mut_ptr().cast::<f32>();
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= body <= the length of both inputs and of the piece's rest.
            unsafe {
                let (xv, dv) = (_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(dy.as_ptr().add(i)));
                let g = masked(xv, dv, vmask);
                let v = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(va, g), _mm256_mul_ps(vb, xv)), vd);
                _mm256_storeu_ps(dst.add(i), v);
            }
        }
        // SAFETY: the loop above wrote the first `body` values.
        unsafe { out.advance(body) };
        portable::input_grad(&x[body..len], &dy[body..len], (a, b, d), mask, out);
    }
}

struct Affine {
    relu: bool,
}

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "layerlab-channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, hw) = dims(l1)?;
        let x = f32_data(s1, l1)?;
        let (scale, shift) = (per_channel(s2, l2, c, "scale")?, per_channel(s3, l3, c, "shift")?);
        let y = affine(&x, c, hw, &scale, &shift, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, c, _) = dims(l1)?;
        if l2.shape().elem_count() != c || l3.shape().elem_count() != c {
            bail!("BatchNorm scale {:?} and shift {:?} do not fit {c} channels", l2.dims(), l3.dims())
        }
        super::cuda::channel_affine(s1, l1, s2, l2, s3, l3, self.relu)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::kernels::conv2d::tests::{max_rel_diff, random};

    /// The candle-op BatchNorm that `model.rs` used before these ops.
    fn reference(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
        let centered = x.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
        let inv_std = (var + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
        let scale = inv_std.broadcast_mul(&weight.reshape((1, (), 1, 1)).unwrap()).unwrap();
        centered.broadcast_mul(&scale).unwrap().broadcast_add(&bias.reshape((1, (), 1, 1)).unwrap()).unwrap()
    }

    type Bn = fn(&Tensor, &Tensor, &Tensor) -> Tensor;

    fn run(f: Bn, x: &Tensor, weight: &Tensor, bias: &Tensor, r: &Tensor) -> [Tensor; 4] {
        let vars = [x, weight, bias].map(|t| Var::from_tensor(t).unwrap());
        let y = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor());
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = |i: usize| grads.get(vars[i].as_tensor()).unwrap().clone();
        [y, g(0), g(1), g(2)]
    }

    /// The AVX2 passes of the backward pass against the portable ones, bit for bit: plane lengths
    /// with and without a tail, with and without the ReLU's mask, values on the mask's edge.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_and_portable_backward_passes_agree_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let values = |len: usize, seed: u64| random(&[len], seed).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, len) in [0usize, 5, 8, 37, 64].into_iter().enumerate() {
            let mut x = values(len, 90 + i as u64);
            // x·2 - 1 = 0 exactly: the mask must stop these.
            x.iter_mut().step_by(7).for_each(|v| *v = 0.5);
            let dy = values(len, 95 + i as u64);
            for mask in [None, Some((2.0, -1.0))] {
                // SAFETY: the CPU has AVX2, checked above.
                let fast = unsafe { avx2::sum_and_dot_centered(&x, &dy, 0.25, mask) };
                let slow = portable::sum_and_dot_centered(&x, &dy, 0.25, mask);
                assert_eq!(
                    (fast.0.to_bits(), fast.1.to_bits()),
                    (slow.0.to_bits(), slow.1.to_bits()),
                    "sums, {len} values"
                );
                let coef = (0.7, -0.3, 0.05);
                // SAFETY: as above.
                let fast = built_in_pieces(len, len, |_, p| unsafe { avx2::input_grad(&x, &dy, coef, mask, p) });
                let slow = built_in_pieces(len, len, |_, p| portable::input_grad(&x, &dy, coef, mask, p));
                assert_eq!(
                    fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                if mask.is_some() && len > 0 {
                    assert_eq!(slow[0], -0.3 * 0.5 + 0.05, "a masked value keeps only b·x + d");
                }
            }
        }
    }

    #[test]
    fn train_matches_candle_ops() {
        for (i, &shape) in [[4, 3, 5, 5], [2, 8, 2, 2], [9, 2, 3, 7], [1, 4, 6, 6]].iter().enumerate() {
            let x = random(&shape, 70 + i as u64).affine(3.0, 0.5).unwrap();
            let weight = (random(&[shape[1]], 80 + i as u64) + 1.5).unwrap();
            let bias = random(&[shape[1]], 90 + i as u64);
            let r = random(&shape, 100 + i as u64);
            let ours = run(|x, w, b| train(x, w, b, 1e-5, false).unwrap().0, &x, &weight, &bias, &r);
            let theirs = run(reference, &x, &weight, &bias, &r);
            for (k, what) in ["output", "input grad", "weight grad", "bias grad"].iter().enumerate() {
                let d = max_rel_diff(&ours[k], &theirs[k]);
                assert!(d < 1e-4, "shape {shape:?}: {what} differs by {d}");
            }
            let st = batch_stats(&x).unwrap();
            let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
            assert!(max_rel_diff(&st.get(0).unwrap(), &mean.flatten_all().unwrap()) < 1e-5);
        }
    }

    #[test]
    fn fused_relu_equals_a_separate_relu_and_the_kept_statistics_are_batch_stats() {
        let shape = [6, 5, 4, 3];
        let x = random(&shape, 7).affine(2.0, 0.3).unwrap();
        let weight = random(&[5], 8);
        let bias = random(&[5], 9);
        let r = random(&shape, 10);
        let fused = run(|x, w, b| train(x, w, b, 1e-5, true).unwrap().0, &x, &weight, &bias, &r);
        let separate = run(
            |x, w, b| crate::kernels::layers::relu(&train(x, w, b, 1e-5, false).unwrap().0).unwrap(),
            &x,
            &weight,
            &bias,
            &r,
        );
        for (k, what) in ["output", "input grad", "weight grad", "bias grad"].iter().enumerate() {
            let (a, b) = (
                fused[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                separate[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(a == b, "{what} differs between the fused and the separate ReLU");
        }
        // Some outputs are clipped, or the test proves nothing about the mask.
        assert!(fused[0].flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|v| **v == 0.0).count() > 10);
        let (_, kept, _) = train(&x, &weight, &bias, 1e-5, true).unwrap();
        let direct = batch_stats(&x).unwrap();
        assert!(
            kept.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == direct.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn affine_scales_each_channel() {
        let x = random(&[2, 3, 2, 2], 5);
        let scale = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let shift = Tensor::new(&[0f32, 1., -1.], &Device::Cpu).unwrap();
        let ours = affine_no_grad(&x, &scale, &shift, false).unwrap();
        let theirs = x
            .broadcast_mul(&scale.reshape((1, 3, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&shift.reshape((1, 3, 1, 1)).unwrap())
            .unwrap();
        assert!(max_rel_diff(&ours, &theirs) < 1e-6);
    }
}
