//! ReLU and 2×2 max-pooling as single-pass CPU custom ops, plus the per-channel sum that gives a
//! bias its gradient.
//!
//! candle's ReLU backward takes four passes and its max-pool backward six; worse, candle 0.11.1's
//! max-pool gradient is scaled wrongly (a unique maximum receives a quarter of the gradient, four
//! tied maxima the whole gradient each). These ops follow PyTorch: the max-pool gradient goes to
//! the first maximum of each window (row-major, NaN counting as the maximum) and the ReLU
//! gradient passes where the output is positive. Other devices and dtypes keep candle's ops.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::norm::lane_sum;
use super::{f32_data, kept_or_zero, vectorized};

/// Elementwise work is cut into pieces of at least this many values.
const MIN_PIECE: usize = 1 << 14;

fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `max(x, 0)`, with PyTorch's gradient (passed where the output is positive).
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast(x) {
        x.apply_op1(Relu)
    } else {
        x.relu()
    }
}

/// 2×2 max-pooling with stride 2 over [n, c, h, w] (odd edges dropped), with PyTorch's gradient.
pub fn max_pool2(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast(x) && x.rank() == 4 {
        x.apply_op1(MaxPool2)
    } else {
        x.max_pool2d(2)
    }
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

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(grad, &ReluGrad)?))
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
}

struct MaxPool2;

/// Index (0..4, row-major) of the first maximum of a 2×2 window, NaN counting as the maximum.
#[inline]
fn window_argmax(v: [f32; 4]) -> usize {
    let mut best = 0;
    for i in 1..4 {
        if v[i] > v[best] || (v[i].is_nan() && !v[best].is_nan()) {
            best = i;
        }
    }
    best
}

/// Runs `f(plane of x, plane of the pooled output)` over all planes of `x` [planes, h, w].
fn for_pooled_planes(out: &mut [f32], out_plane: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.is_empty() || out_plane == 0 {
        return;
    }
    let min_planes = MIN_PIECE.div_ceil(out_plane * 4);
    out.par_chunks_mut(out_plane).with_min_len(min_planes).enumerate().for_each(|(p, o)| vectorized(|| f(p, o)));
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

/// The larger of two values, NaN counting as the largest: [`window_argmax`]'s comparison, as a
/// select that vectorises.
#[inline]
fn larger(a: f32, b: f32) -> f32 {
    if b > a || (b.is_nan() && !a.is_nan()) {
        b
    } else {
        a
    }
}

/// 2×2 max-pooling of `planes` planes of h × w values.
///
/// Each window's maximum is taken down the two rows first, over whole rows at once, then across
/// each pair of columns: the same value as [`window_argmax`]'s (the maximum, NaN when the window
/// has one), in a form the compiler vectorises. Picking the window's position one value at a
/// time took 9.3 of the 57 s of a VGG reset grid.
pub(crate) fn max_pool2_values(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut y = vec![0f32; planes * ho * wo];
    for_pooled_planes(&mut y, ho * wo, |p, y| {
        let x = &x[p * h * w..][..h * w];
        let mut rows = [0f32; 64];
        for (oy, y) in y.chunks_exact_mut(wo).enumerate() {
            let (r0, r1) = (&x[2 * oy * w..][..2 * wo], &x[(2 * oy + 1) * w..][..2 * wo]);
            for (chunk, (r0, r1)) in y.chunks_mut(32).zip(r0.chunks(64).zip(r1.chunks(64))) {
                let rows = &mut rows[..r0.len()];
                rows.iter_mut().zip(r0.iter().zip(r1)).for_each(|(m, (a, b))| *m = larger(*a, *b));
                for (y, pair) in chunk.iter_mut().zip(rows.chunks_exact(2)) {
                    *y = larger(pair[0], pair[1]);
                }
            }
        }
    });
    y
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

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(grad, &MaxPool2Grad)?))
    }
}

/// The input gradient of [`max_pool2_values`]: each pooled gradient goes to the first maximum of
/// its window, read again from the input `x`.
pub(crate) fn max_pool2_grad_values(x: &[f32], grad: &[f32], h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut dx = vec![0f32; x.len()];
    if ho * wo > 0 {
        let min_planes = MIN_PIECE.div_ceil(h * w);
        dx.par_chunks_mut(h * w).with_min_len(min_planes).enumerate().for_each(|(p, dx)| {
            vectorized(|| {
                let (x, grad) = (&x[p * h * w..][..h * w], &grad[p * ho * wo..][..ho * wo]);
                for oy in 0..ho {
                    let (i0, i1) = (2 * oy * w, (2 * oy + 1) * w);
                    for ox in 0..wo {
                        let at = [i0 + 2 * ox, i0 + 2 * ox + 1, i1 + 2 * ox, i1 + 2 * ox + 1];
                        let best = window_argmax(at.map(|i| x[i]));
                        dx[at[best]] = grad[oy * wo + ox];
                    }
                }
            })
        });
    }
    dx
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
