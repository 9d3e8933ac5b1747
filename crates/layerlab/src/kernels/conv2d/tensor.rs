//! The convolution's tensor API: what the models, the backward pass and the benchmarks call,
//! each picking cuDNN, our CPU ops or candle's own convolution for its operands.

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::geom::Geom;
use super::ops::{Conv2d, Conv2dGradInput, Conv2dGradWeight};
#[cfg(feature = "cuda")]
use crate::kernels::cudnn;
use crate::kernels::{layers, KernelOptions};

/// Square-kernel convolution with equal padding on every side (dilation 1, one group).
///
/// `x` is [n, cin, h, w] and `weight` [cout, cin, k, k] (PyTorch layout). Gradients flow to both.
/// On a GPU, `kernels` says whether cuDNN computes it (and may use TF32).
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize, kernels: &KernelOptions) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.cudnn_conv && cudnn::applies(x, weight) {
        return Ok(cudnn::conv2d(x, weight, padding, stride, kernels.tf32)?);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = kernels;
    if fast_path_applies(x, weight, padding, stride) {
        let op = Conv2d { padding, stride };
        return Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?);
    }
    Ok(x.conv2d(weight, padding, stride, 1, 1)?)
}

/// [`conv2d`] followed by a per-channel `bias` [cout], added inside the same op on the fast path.
pub fn conv2d_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    stride: usize,
    kernels: &KernelOptions,
) -> Result<Tensor> {
    if fast_path_applies(x, weight, padding, stride) && bias.dtype() == DType::F32 && bias.device().is_cpu() {
        let op = Conv2d { padding, stride };
        return Ok(x.contiguous()?.apply_op3(&weight.contiguous()?, bias, op)?);
    }
    Ok(conv2d(x, weight, padding, stride, kernels)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)?)
}

/// The gradients of [`conv2d`] (`bias` `None`) or [`conv2d_bias`] at input `x`, from the
/// output's gradient `grad`: the input's (only when `need_input`: the images entering the first
/// layer need none), the weight's and the bias's. The same kernels, called the same way, as the
/// backward pass candle's autograd runs for those ops on the same device, so the same values:
/// this is the convolution's step of [`crate::backward`].
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    grad: &Tensor,
    (padding, stride): (usize, usize),
    need_input: bool,
    kernels: &KernelOptions,
) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    let fast = fast_path_applies(x, weight, padding, stride);
    let grad_bias = match bias {
        None => None,
        // The fused op's (`Conv2d` as a CustomOp3): one pass of our own.
        Some(b) if fast && b.dtype() == DType::F32 && b.device().is_cpu() => {
            Some(grad.apply_op1_no_bwd(&layers::ChannelSum)?.reshape(b.shape())?)
        }
        // A broadcast add's, as candle computes it: a sum over the dimensions it broadcast.
        Some(b) => {
            let dims = [0, 2, 3].into_iter().filter(|&d| grad.dims().get(d) != Some(&1)).collect::<Vec<_>>();
            Some(grad.sum_keepdim(dims)?.reshape(b.shape())?)
        }
    };
    let (_, _, h, w) = x.dims4()?;
    let k = weight.dim(2)?;
    #[cfg(feature = "cuda")]
    if kernels.cudnn_conv && cudnn::applies(x, weight) {
        let (grad, tf32) = (grad.contiguous()?, kernels.tf32);
        let grad_x =
            if need_input { Some(cudnn::grad_input(&grad, weight, padding, stride, (h, w), tf32)?) } else { None };
        return Ok((grad_x, cudnn::grad_weight(x, &grad, padding, stride, k, tf32)?, grad_bias));
    }
    if !fast {
        anyhow::bail!(
            "the convolution of {:?} by {:?} runs as candle's own op, whose gradient only candle's autograd computes",
            x.dims(),
            weight.dims()
        )
    }
    let grad = grad.contiguous()?;
    let grad_x =
        if need_input { Some(conv2d_grad_input(&grad, weight, padding, stride, (h, w), kernels)?) } else { None };
    Ok((grad_x, conv2d_grad_weight(x, &grad, padding, stride, k, kernels)?, grad_bias))
}

/// The input gradient of [`conv2d`] alone: `grad` [n, cout, ho, wo] and `weight` [cout, cin, k, k]
/// to [n, cin, h, w], for an input of `h` × `w`. Timed by `layerlab-bench profile`.
pub fn conv2d_grad_input(
    grad: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    (h, w): (usize, usize),
    kernels: &KernelOptions,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.cudnn_conv && cudnn::applies(grad, weight) {
        return Ok(cudnn::grad_input(grad, weight, padding, stride, (h, w), kernels.tf32)?);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = kernels;
    Ok(grad.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &Conv2dGradInput { padding, stride, h, w })?)
}

/// The weight gradient of [`conv2d`] alone: `x` [n, cin, h, w] and `grad` [n, cout, ho, wo] to
/// [cout, cin, k, k]. Timed by `layerlab-bench profile`.
pub fn conv2d_grad_weight(
    x: &Tensor,
    grad: &Tensor,
    padding: usize,
    stride: usize,
    k: usize,
    kernels: &KernelOptions,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kernels.cudnn_conv && cudnn::applies(x, grad) {
        return Ok(cudnn::grad_weight(x, grad, padding, stride, k, kernels.tf32)?);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = kernels;
    Ok(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &Conv2dGradWeight { padding, stride, k })?)
}

/// The reference: candle's own convolution, whatever the device and dtype.
pub fn conv2d_candle(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    Ok(x.conv2d(weight, padding, stride, 1, 1)?)
}

fn fast_path_applies(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> bool {
    x.device().is_cpu()
        && weight.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && Geom::new(x.dims(), weight.dims(), padding, stride).is_ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Deterministic values in [-1, 1) from a small xorshift generator.
    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    type ConvFn = fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>;

    /// Our convolution with the default kernel options (on the CPU they change nothing).
    fn ours(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
        conv2d(x, w, padding, stride, &KernelOptions::default())
    }

    /// Output, input gradient and weight gradient of `sum(conv(x, w) * r)`.
    fn run(f: ConvFn, x: &Tensor, w: &Tensor, r: &Tensor, pad: usize, stride: usize) -> [Tensor; 3] {
        let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let y = f(xv.as_tensor(), wv.as_tensor(), pad, stride).unwrap();
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xv.as_tensor()).unwrap().clone();
        let gw = grads.get(wv.as_tensor()).unwrap().clone();
        [y, gx, gw]
    }

    #[test]
    fn matches_candle_forward_and_gradients() {
        // (n, cin, h, w, cout, k, pad, stride)
        let cases = [
            (1, 3, 8, 8, 5, 3, 1, 1),
            (3, 4, 7, 9, 6, 3, 1, 1),
            (2, 5, 9, 7, 3, 3, 1, 2),
            (2, 3, 6, 6, 4, 3, 0, 1),
            (3, 3, 9, 11, 2, 3, 0, 2),
            (2, 6, 5, 7, 4, 1, 0, 1),
            // 1×1 at stride 1 (a bottleneck's), over many chunks of images and on 4×4 planes.
            (70, 12, 8, 8, 20, 1, 0, 1),
            (33, 24, 4, 4, 8, 1, 0, 1),
            (4, 4, 9, 9, 7, 1, 0, 2),
            (1, 2, 3, 3, 3, 3, 1, 2),
            (1, 2, 1, 1, 3, 3, 1, 1),
            // Through the interleaved products (see `interleaved`): partial groups of images,
            // a last tile of positions filled up, output channels in narrower tiles; 4×4 and 2×2
            // planes keep `gemm` for the weight gradient, 8×8 ones take the interleaved one.
            (19, 8, 4, 4, 16, 3, 1, 1),
            (20, 16, 2, 2, 12, 3, 1, 1),
            (9, 8, 2, 3, 20, 3, 1, 1),
            // The interleaved forward pass at stride 2 (see `interleaved_strided`), odd sizes too,
            // and from 16×16 inputs up its weight gradient too.
            (18, 8, 8, 8, 12, 3, 1, 2),
            (3, 12, 9, 7, 8, 3, 1, 2),
            (18, 8, 16, 16, 12, 3, 1, 2),
            (3, 12, 17, 19, 8, 3, 1, 2),
            (33, 8, 8, 8, 12, 3, 1, 1),
            (5, 12, 8, 8, 8, 3, 1, 1),
            (17, 12, 7, 11, 20, 3, 1, 1),
            // Through the shifted products (see `shifted`).
            (3, 8, 16, 16, 12, 3, 1, 1),
            (2, 12, 18, 15, 12, 3, 1, 1),
        ];
        for (i, &(n, c, h, w, o, k, pad, stride)) in cases.iter().enumerate() {
            let x = random(&[n, c, h, w], 3 * i as u64 + 1);
            let wt = random(&[o, c, k, k], 3 * i as u64 + 2);
            let ho = (h + 2 * pad - k) / stride + 1;
            let wo = (w + 2 * pad - k) / stride + 1;
            let r = random(&[n, o, ho, wo], 3 * i as u64 + 3);
            let ours = run(ours, &x, &wt, &r, pad, stride);
            let reference = run(conv2d_candle, &x, &wt, &r, pad, stride);
            for (what, a, b) in [("output", 0, 0), ("input grad", 1, 1), ("weight grad", 2, 2)] {
                let d = max_rel_diff(&ours[a], &reference[b]);
                assert!(d < 1e-4, "case {:?}: {what} differs by {d}", cases[i]);
            }
        }
    }

    /// candle's own backward mishandles stride 2 when height and width leave different
    /// remainders, so such shapes are checked by the adjoint identities instead: the loss
    /// `sum(conv(x, w) * r)` is linear in x and in w, so it equals `sum(x * gx)` and `sum(w * gw)`.
    #[test]
    fn gradients_are_adjoint_for_uneven_strides() {
        for (i, &(n, c, h, w, o, k, pad)) in
            [(3, 3, 9, 8, 2, 3, 0), (2, 4, 8, 7, 5, 3, 1), (2, 3, 6, 5, 4, 1, 0), (17, 8, 17, 16, 12, 3, 1)]
                .iter()
                .enumerate()
        {
            let x = random(&[n, c, h, w], 40 + i as u64);
            let wt = random(&[o, c, k, k], 50 + i as u64);
            let (ho, wo) = ((h + 2 * pad - k) / 2 + 1, (w + 2 * pad - k) / 2 + 1);
            let r = random(&[n, o, ho, wo], 60 + i as u64);
            let [y, gx, gw] = run(ours, &x, &wt, &r, pad, 2);
            let dot = |a: &Tensor, b: &Tensor| (a * b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            let loss = dot(&y, &r);
            assert!((dot(&x, &gx) - loss).abs() < 1e-4 * loss.abs().max(1.0), "case {i}: input gradient");
            assert!((dot(&wt, &gw) - loss).abs() < 1e-4 * loss.abs().max(1.0), "case {i}: weight gradient");
        }
    }

    #[test]
    fn bias_is_added_and_gets_its_gradient() {
        let (x, w, b) = (random(&[3, 4, 6, 5], 71), random(&[5, 4, 3, 3], 72), random(&[5], 73));
        let r = random(&[3, 5, 6, 5], 74);
        let grads = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
            let vars = [&x, &w, &b].map(|t| Var::from_tensor(t).unwrap());
            let y = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor());
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y.clone(),
                g.get(vars[0].as_tensor()).unwrap().clone(),
                g.get(vars[1].as_tensor()).unwrap().clone(),
                g.get(vars[2].as_tensor()).unwrap().clone(),
            ]
        };
        let ours = grads(&|x, w, b| conv2d_bias(x, w, b, 1, 1, &KernelOptions::default()).unwrap());
        let theirs = grads(&|x, w, b| {
            conv2d_candle(x, w, 1, 1).unwrap().broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap()
        });
        for k in 0..4 {
            assert!(max_rel_diff(&ours[k], &theirs[k]) < 1e-4, "result {k} differs");
        }
    }

    #[test]
    fn strided_inputs_are_read_through_their_layout() {
        let x = random(&[2, 3, 6, 5], 11).transpose(2, 3).unwrap();
        let w = random(&[4, 3, 3, 3], 12).transpose(2, 3).unwrap();
        let ours = conv2d(&x, &w, 1, 1, &KernelOptions::default()).unwrap();
        let reference = conv2d_candle(&x, &w, 1, 1).unwrap();
        assert!(max_rel_diff(&ours, &reference) < 1e-4);
        // The op itself, fed a strided layout directly.
        let direct = x.apply_op2_no_bwd(&w, &Conv2d { padding: 1, stride: 1 }).unwrap();
        assert!(max_rel_diff(&direct, &reference) < 1e-4);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // Through im2col + gemm (stride 2), through the interleaved products, and through the
        // 1×1 products.
        for (size, stride, k) in [(10, 2, 3), (8, 1, 3), (8, 1, 1)] {
            let x = random(&[37, 8, size, size], 21);
            let w = random(&[16, 8, k, k], 22);
            let out = (size - 1) / stride + 1;
            let r = random(&[37, 16, out, out], 23);
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| run(ours, &x, &w, &r, k / 2, stride))
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            let one = on(1);
            for threads in [2, 3, 5] {
                assert!(on(threads) == one, "{k}×{k}, stride {stride}: {threads} threads changed the result");
            }
        }
    }

    #[test]
    fn other_dtypes_fall_back_to_candle() {
        let x = random(&[1, 2, 5, 5], 31).to_dtype(DType::F64).unwrap();
        let w = random(&[3, 2, 3, 3], 32).to_dtype(DType::F64).unwrap();
        let y = conv2d(&x, &w, 1, 1, &KernelOptions::default()).unwrap();
        assert_eq!((y.dims(), y.dtype()), (&[1, 3, 5, 5][..], DType::F64));
    }
}
