//! Softmax cross-entropy and the count of right argmax predictions, fused: one op forward (the
//! mean loss and the count), one backward (the logits' gradient), on the CPU and on a GPU.
//!
//! Why: candle's `cross_entropy` is a log-softmax and a gather, about ten ops forward and twice
//! that backward, and counting right predictions took four more; on a GPU each is a kernel launch
//! and a fresh buffer, which bound the fully connected network's step. The arithmetic is the
//! fast paths' (`mlp::cross_entropy`; both take it from [`RowSoftmax`]): per row, the maximum,
//! the sum of `exp(x − max)` in order, `ln` of it, the row's loss `ln_sum − (x[label] − max)` in
//! f32; the rows' losses summed in f64 in order. The CUDA kernels (`cross_entropy_*` in `cuda.cu`) do the
//! same operations; `crates/cuda-emulation` holds them to these functions bit for bit on the CPU.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

/// Mean cross-entropy (an f32 scalar with a gradient) and the number of right argmax
/// predictions (an f32 scalar, no gradient) of `logits` [n, k] (f32) against `labels` [n] (u32).
pub fn loss_and_correct(logits: &Tensor, labels: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let out = logits.contiguous()?.apply_op2(&labels.contiguous()?, CrossEntropy)?;
    Ok((out.get(0)?, out.get(1)?.detach()))
}

/// The gradient of [`loss_and_correct`]'s loss with respect to `logits`, for an upstream
/// gradient `upstream` of the op's packed [loss, count] output ([1, 0] for the loss itself): its
/// backward pass, called without candle's graph ([`crate::backward`]).
pub fn logits_grad(logits: &Tensor, labels: &Tensor, upstream: &Tensor) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op3_no_bwd(&labels.contiguous()?, &upstream.contiguous()?, &CrossEntropyGrad)
}

/// Whether [`loss_and_correct`] takes these operands: f32 logits [n, k] and u32 labels [n], on
/// the CPU or (with the `cuda` feature) a GPU.
pub fn applies(logits: &Tensor, labels: &Tensor) -> bool {
    let device = logits.device();
    (device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda()))
        && logits.dtype() == DType::F32
        && labels.dtype() == DType::U32
        && logits.rank() == 2
        && labels.rank() == 1
}

/// One row of logits through the softmax: where its first maximum is, the maximum, and
/// `ln Σ exp(x − max)` summed in order. The one home of this arithmetic on the CPU: the op here
/// and the fast paths' [`crate::mlp::cross_entropy`] both take it from here.
pub(crate) struct RowSoftmax {
    pub best: usize,
    pub max: f32,
    pub log_sum: f32,
}

impl RowSoftmax {
    #[inline]
    pub(crate) fn of(row: &[f32]) -> RowSoftmax {
        let (mut best, mut max) = (0, f32::NEG_INFINITY);
        for (c, &v) in row.iter().enumerate() {
            if v > max {
                (best, max) = (c, v);
            }
        }
        let mut sum = 0f32;
        for &v in row {
            sum += (v - max).exp();
        }
        RowSoftmax { best, max, log_sum: sum.ln() }
    }

    /// The row's loss against `label`.
    #[inline]
    pub(crate) fn loss(&self, row: &[f32], label: usize) -> f32 {
        self.log_sum - (row[label] - self.max)
    }

    /// The row's gradient into `d`: `(softmax(x) − onehot(label)) · scale`.
    #[inline]
    pub(crate) fn grad(&self, row: &[f32], label: usize, scale: f32, d: &mut [f32]) {
        for (c, (d, &v)) in d.iter_mut().zip(row).enumerate() {
            let p = (v - self.max - self.log_sum).exp();
            *d = (p - if c == label { 1.0 } else { 0.0 }) * scale;
        }
    }
}

/// [mean loss, right predictions] of `logits` ([n, k] row-major) against `labels`.
pub fn forward_values(logits: &[f32], labels: &[u32], k: usize) -> [f32; 2] {
    let (mut loss, mut correct) = (0f64, 0u32);
    for (row, &label) in logits.chunks_exact(k.max(1)).zip(labels) {
        let softmax = RowSoftmax::of(row);
        loss += f64::from(softmax.loss(row, label as usize));
        correct += u32::from(softmax.best == label as usize);
    }
    [(loss / labels.len().max(1) as f64) as f32, correct as f32]
}

/// The logits' gradient for an upstream gradient `g` of the mean loss:
/// `(softmax(x) − onehot(label)) · (g · (1 / n))`.
pub fn grad_values(logits: &[f32], labels: &[u32], k: usize, g: f32) -> Vec<f32> {
    let scale = g * (1.0 / labels.len().max(1) as f32);
    let mut dx = vec![0f32; logits.len()];
    for ((row, d), &label) in logits.chunks_exact(k.max(1)).zip(dx.chunks_exact_mut(k.max(1))).zip(labels) {
        RowSoftmax::of(row).grad(row, label as usize, scale, d);
    }
    dx
}

fn dims(logits: &Layout, labels: &Layout) -> candle_core::Result<(usize, usize)> {
    let &[n, k] = logits.dims() else { bail!("cross-entropy wants logits [n, k], got {:?}", logits.dims()) };
    if labels.dims() != [n] {
        bail!("cross-entropy: logits {:?} but labels {:?}", logits.dims(), labels.dims())
    }
    Ok((n, k))
}

fn cpu_operands<'a>(
    logits: &'a CpuStorage,
    ll: &Layout,
    labels: &'a CpuStorage,
    lb: &Layout,
) -> candle_core::Result<(&'a [f32], &'a [u32], usize)> {
    let (_, k) = dims(ll, lb)?;
    let (CpuStorage::F32(x), CpuStorage::U32(y)) = (logits, labels) else {
        bail!("cross-entropy wants f32 logits and u32 labels")
    };
    let (Some((x0, x1)), Some((y0, y1))) = (ll.contiguous_offsets(), lb.contiguous_offsets()) else {
        bail!("cross-entropy wants contiguous operands")
    };
    let labels = &y[y0..y1];
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= k) {
        bail!("cross-entropy: label {bad} is not one of the {k} classes")
    }
    Ok((&x[x0..x1], labels, k))
}

/// (logits, labels) → [mean loss, right predictions].
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "layerlab-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, y, k) = cpu_operands(s1, l1, s2, l2)?;
        Ok((CpuStorage::F32(forward_values(x, y, k).to_vec()), Shape::from(2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, k) = dims(l1, l2)?;
        super::cuda::cross_entropy(s1, l1, s2, l2, n, k)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = logits.apply_op3_no_bwd(labels, &grad.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(dx), None))
    }
}

/// (logits, labels, the output's gradient [2]) → the logits' gradient [n, k].
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "layerlab-cross-entropy-grad"
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
        let (x, y, k) = cpu_operands(s1, l1, s2, l2)?;
        let CpuStorage::F32(g) = s3 else { bail!("cross-entropy gradient wants an f32 upstream gradient") };
        let g = g[l3.start_offset()];
        Ok((CpuStorage::F32(grad_values(x, y, k, g)), l1.shape().clone()))
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
        let (n, k) = dims(l1, l2)?;
        super::cuda::cross_entropy_grad(s1, l1, s2, l2, s3, l3, n, k)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn logits_and_labels() -> (Tensor, Tensor) {
        let v: Vec<f32> = (0..7 * 10).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37).collect();
        let labels: Vec<u32> = (0..7).map(|i| (i * 3 % 10) as u32).collect();
        (Tensor::from_vec(v, (7, 10), &Device::Cpu).unwrap(), Tensor::new(labels.as_slice(), &Device::Cpu).unwrap())
    }

    #[test]
    fn loss_count_and_gradient_match_candles_ops() {
        let (x, y) = logits_and_labels();
        let var = Var::from_tensor(&x).unwrap();
        let (loss, correct) = loss_and_correct(var.as_tensor(), &y).unwrap();
        let reference = candle_nn::loss::cross_entropy(&x, &y).unwrap().to_scalar::<f32>().unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        assert!((got - reference).abs() <= 1e-6 * reference.abs(), "{got} vs {reference}");
        let predicted = x.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let right = predicted.iter().zip(y.to_vec1::<u32>().unwrap()).filter(|(p, l)| **p == *l).count();
        assert_eq!(correct.to_scalar::<f32>().unwrap(), right as f32);

        // Gradient of 3 · loss, against candle's.
        let grad = (loss * 3.0).unwrap().backward().unwrap().get(var.as_tensor()).unwrap().clone();
        let var2 = Var::from_tensor(&x).unwrap();
        let reference = (candle_nn::loss::cross_entropy(var2.as_tensor(), &y).unwrap() * 3.0).unwrap();
        let expected = reference.backward().unwrap().get(var2.as_tensor()).unwrap().clone();
        let (a, b) = (
            grad.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let gap = a.iter().zip(&b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(gap <= 1e-6, "gradient differs by {gap}");
    }

    #[test]
    fn a_label_past_the_classes_is_refused() {
        let (x, _) = logits_and_labels();
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 10], &Device::Cpu).unwrap();
        let err = loss_and_correct(&x, &y).unwrap_err();
        assert!(format!("{err}").contains("label 10 is not one of the 10 classes"), "{err}");
    }
}
