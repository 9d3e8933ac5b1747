//! The convolution's candle custom ops on the CPU: the forward pass (with or without a bias)
//! with its backward for candle's autograd, and each gradient alone.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::geom::Geom;
use super::passes::{forward, grad_input};
use super::weight_grad::grad_weight;
use crate::kernels::{f32_data, layers};

/// The forward op: `x` [n, c, h, w] and `weight` [o, c, k, k] to [n, o, ho, wo].
#[derive(Debug, Clone, Copy)]
pub(super) struct Conv2d {
    pub(super) padding: usize,
    pub(super) stride: usize,
}

/// The input gradient: `grad` [n, o, ho, wo] and `weight` [o, c, k, k] to [n, c, h, w].
#[derive(Debug, Clone, Copy)]
pub(super) struct Conv2dGradInput {
    pub(super) padding: usize,
    pub(super) stride: usize,
    pub(super) h: usize,
    pub(super) w: usize,
}

/// The weight gradient: `x` [n, c, h, w] and `grad` [n, o, ho, wo] to [o, c, k, k].
#[derive(Debug, Clone, Copy)]
pub(super) struct Conv2dGradWeight {
    pub(super) padding: usize,
    pub(super) stride: usize,
    pub(super) k: usize,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "layerlab-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.padding, self.stride)?;
        let (x, weight) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let y = forward(&g, &x, &weight, None);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, k, _) = weight.dims4()?;
        let grad = grad.contiguous()?;
        let gi = Conv2dGradInput { padding: self.padding, stride: self.stride, h, w };
        let gw = Conv2dGradWeight { padding: self.padding, stride: self.stride, k };
        // Inputs that need no gradient (the images entering the first layer) cost nothing.
        let grad_x = if x.track_op() { Some(grad.apply_op2_no_bwd(weight, &gi)?) } else { None };
        let grad_w = if weight.track_op() { Some(x.apply_op2_no_bwd(&grad, &gw)?) } else { None };
        Ok((grad_x, grad_w))
    }
}

/// The same op with a bias [o] as third argument.
impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "layerlab-conv2d-bias"
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
        let g = Geom::new(l1.dims(), l2.dims(), self.padding, self.stride)?;
        let (x, weight, bias) = (f32_data(s1, l1)?, f32_data(s2, l2)?, f32_data(s3, l3)?);
        if bias.len() != g.o {
            bail!("conv2d: bias {:?} does not fit weight {:?}", l3.dims(), l2.dims())
        }
        let y = forward(&g, &x, &weight, Some(&bias));
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_w) = CustomOp2::bwd(self, x, weight, res, grad)?;
        let grad_b = if bias.track_op() {
            Some(grad.apply_op1_no_bwd(&layers::ChannelSum)?.reshape(bias.shape())?)
        } else {
            None
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

impl CustomOp2 for Conv2dGradInput {
    fn name(&self) -> &'static str {
        "layerlab-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[n, o, ho, wo], &[_, c, ..]) = (l1.dims(), l2.dims()) else {
            bail!("conv2d input gradient: unexpected shapes {:?} and {:?}", l1.dims(), l2.dims())
        };
        let g = Geom::new(&[n, c, self.h, self.w], l2.dims(), self.padding, self.stride)?;
        if (g.o, g.ho, g.wo) != (o, ho, wo) {
            bail!("conv2d input gradient: gradient {:?} does not fit {g:?}", l1.dims())
        }
        let (grad, weight) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let dx = grad_input(&g, &grad, &weight);
        Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

impl CustomOp2 for Conv2dGradWeight {
    fn name(&self) -> &'static str {
        "layerlab-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[_, c, ..], &[_, o, ho, wo]) = (l1.dims(), l2.dims()) else {
            bail!("conv2d weight gradient: unexpected shapes {:?} and {:?}", l1.dims(), l2.dims())
        };
        let g = Geom::new(l1.dims(), &[o, c, self.k, self.k], self.padding, self.stride)?;
        if (g.n, g.ho, g.wo) != (l2.dims()[0], ho, wo) {
            bail!("conv2d weight gradient: gradient {:?} does not fit {g:?}", l2.dims())
        }
        let (x, grad) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let dw = grad_weight(&g, &x, &grad);
        Ok((CpuStorage::F32(dw), Shape::from((g.o, g.c, g.k, g.k))))
    }
}
