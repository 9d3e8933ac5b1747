//! layerlab's own CUDA kernels (the `cuda` feature), compiled once per process by NVRTC (which
//! candle's CUDA backend loads anyway) for whatever GPU the binary meets:
//!
//! - the SGD update ([`sgd_update`]): one kernel per parameter tensor, updating the parameter and
//!   its momentum buffer in place. Written as candle tensor ops
//!   ([`crate::sgd::Sgd::update_tensors`]) one update is six kernels and as many fresh buffers,
//!   then a copy into the `Var`; a small network's step is bound by such launches. The kernel does
//!   the same f32 operations in the same order as the CPU's [`crate::sgd::Sgd::update_slices`],
//!   each rounded on its own (`__fmul_rn`, `__fadd_rn`: never contracted into a fused
//!   multiply-add), so both give the same bits from the same inputs;
//! - the 2×2 max-pool, forward and input gradient ([`max_pool2`], [`max_pool2_grad`]), with the
//!   CPU kernel's rule: each gradient goes to the first maximum of its window. candle's own
//!   max-pool gradient multiplies by the share of a window's values that are its maximum instead
//!   of dividing by their count, so a unique maximum gets a quarter of its gradient.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CudaStorage, InplaceOp3, Layout, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::sgd::Sgd;

const SOURCE: &str = r#"
__device__ int first_max(const float v[4]) {
    int best = 0;
    for (int k = 1; k < 4; k++) {
        if (v[k] > v[best] || (isnan(v[k]) && !isnan(v[best]))) best = k;
    }
    return best;
}

// x [planes, h, w] -> y [planes, h/2, w/2]; one thread per output value.
extern "C" __global__ void max_pool2_forward(const float* x, float* y, unsigned int planes,
                                             unsigned int h, unsigned int w) {
    unsigned int ho = h / 2, wo = w / 2;
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * ho * wo) return;
    unsigned int p = i / (ho * wo), r = i % (ho * wo), oy = r / wo, ox = r % wo;
    const float* t = x + (size_t)p * h * w + (size_t)(2 * oy) * w + 2 * ox;
    float v[4] = {t[0], t[1], t[w], t[w + 1]};
    y[i] = v[first_max(v)];
}

// The input gradient dx [planes, h, w] from x and the output gradient g; one thread per input
// value, zero off its window's first maximum and on the odd edges the pool dropped.
extern "C" __global__ void max_pool2_backward(const float* x, const float* g, float* dx,
                                              unsigned int planes, unsigned int h, unsigned int w) {
    unsigned int ho = h / 2, wo = w / 2;
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * h * w) return;
    unsigned int p = i / (h * w), r = i % (h * w), iy = r / w, ix = r % w;
    unsigned int oy = iy / 2, ox = ix / 2;
    if (oy >= ho || ox >= wo) { dx[i] = 0.0f; return; }
    const float* t = x + (size_t)p * h * w + (size_t)(2 * oy) * w + 2 * ox;
    float v[4] = {t[0], t[1], t[w], t[w + 1]};
    int at = (int)((iy % 2) * 2 + (ix % 2));
    dx[i] = first_max(v) == at ? g[(size_t)p * ho * wo + (size_t)oy * wo + ox] : 0.0f;
}

extern "C" __global__ void sgd_update(float* p, float* m, const float* g, unsigned int n,
                                      float lr, float mu, float wd, int nesterov) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float pi = p[i];
    float gi = g[i];
    if (wd > 0.0f) gi = __fadd_rn(gi, __fmul_rn(pi, wd));
    float mi = __fadd_rn(__fmul_rn(m[i], mu), gi);
    m[i] = mi;
    float step = nesterov ? __fadd_rn(gi, __fmul_rn(mi, mu)) : mi;
    p[i] = __fsub_rn(pi, __fmul_rn(step, lr));
}
"#;

/// Off: the SGD update runs as candle tensor ops, to cross-check its kernel in the GPU tests.
pub static SGD_ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

const MODULE: &str = "layerlab";

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    let compiled =
        PTX.get_or_init(|| cudarc::nvrtc::compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| format!("{e:?}")));
    match compiled {
        Ok(ptx) => Ok(ptx),
        Err(e) => bail!("cannot compile the SGD update kernel with NVRTC: {e}"),
    }
}

/// `p`, `m` and `g` are f32 tensors of one shape on one GPU, `p` and `m` contiguous with their
/// own storage (a `Var` and a momentum buffer). Updates `p` and `m` in place.
pub fn sgd_update(sgd: &Sgd, lr: f64, p: &Tensor, m: &Tensor, g: &Tensor) -> candle_core::Result<()> {
    if p.dims() != m.dims() || p.dims() != g.dims() {
        bail!(
            "SGD update: parameter {:?}, momentum {:?} and gradient {:?} differ in shape",
            p.dims(),
            m.dims(),
            g.dims()
        )
    }
    let op = Update { lr: lr as f32, mu: sgd.momentum as f32, wd: sgd.weight_decay as f32, nesterov: sgd.nesterov };
    p.inplace_op3(m, &g.contiguous()?, &op)
}

struct Update {
    lr: f32,
    mu: f32,
    wd: f32,
    nesterov: bool,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        bail!("the CUDA SGD update was given CPU tensors")
    }

    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        lp: &Layout,
        m: &CudaStorage,
        lm: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        if !(lp.is_contiguous() && lm.is_contiguous() && lg.is_contiguous()) {
            bail!("SGD update: every operand must be contiguous")
        }
        let n = lp.shape().elem_count();
        let dev = p.device.clone();
        let func = dev.get_or_load_custom_func("sgd_update", MODULE, ptx()?)?;
        let (m, g) = (f32_values(m, lm)?, f32_values(g, lg)?);
        let po = lp.start_offset();
        let mut p = p.as_cuda_slice_mut::<f32>()?.slice_mut(po..po + n);
        let (count, nesterov) = (n as u32, self.nesterov as i32);
        let mut launch = func.builder();
        launch.arg(&mut p);
        // The momentum buffer is written through the op's second operand: candle runs every op of
        // a device on its one stream, in order, so no other kernel sees it half-written.
        launch.arg(&m);
        launch.arg(&g);
        launch.arg(&count);
        launch.arg(&self.lr);
        launch.arg(&self.mu);
        launch.arg(&self.wd);
        launch.arg(&nesterov);
        // SAFETY: the arguments match the kernel's signature; all three buffers hold `n` f32s.
        unsafe { launch.launch(LaunchConfig::for_num_elems(count)) }.map_err(candle_core::Error::wrap)?;
        Ok(())
    }
}

/// The contiguous f32 values of a storage, from its layout's offset: how every GPU op of ours
/// (here and in [`super::cudnn`]) reads its operands.
pub(crate) fn f32_values<'a>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<cudarc::driver::CudaView<'a, f32>> {
    if !l.is_contiguous() {
        bail!("layerlab's GPU ops take contiguous tensors")
    }
    let start = l.start_offset();
    Ok(s.as_cuda_slice::<f32>()?.slice(start..start + l.shape().elem_count()))
}

/// 2×2 max-pool of `s` [n, c, h, w] (contiguous f32), as the CPU's `MaxPool2` op computes it.
pub fn max_pool2(s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
    let &[n, c, h, w] = l.dims() else { bail!("max-pool wants [n, c, h, w], got {:?}", l.dims()) };
    let (ho, wo) = (h / 2, w / 2);
    let x = f32_values(s, l)?;
    let dev = s.device.clone();
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<f32>(n * c * ho * wo)? };
    let (planes, h32, w32) = ((n * c) as u32, h as u32, w as u32);
    let func = dev.get_or_load_custom_func("max_pool2_forward", MODULE, ptx()?)?;
    let mut launch = func.builder();
    launch.arg(&x);
    launch.arg(&mut y);
    launch.arg(&planes);
    launch.arg(&h32);
    launch.arg(&w32);
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    unsafe { launch.launch(LaunchConfig::for_num_elems((n * c * ho * wo).max(1) as u32)) }
        .map_err(candle_core::Error::wrap)?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((n, c, ho, wo))))
}

/// The input gradient of [`max_pool2`]: input `xs` [n, c, h, w] and output gradient `gs`.
pub fn max_pool2_grad(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let &[n, c, h, w] = xl.dims() else { bail!("max-pool wants [n, c, h, w], got {:?}", xl.dims()) };
    if gl.dims() != [n, c, h / 2, w / 2] {
        bail!("max-pool gradient {:?} does not fit input {:?}", gl.dims(), xl.dims())
    }
    let (x, g) = (f32_values(xs, xl)?, f32_values(gs, gl)?);
    let dev = xs.device.clone();
    // SAFETY: the kernel writes every value.
    let mut dx = unsafe { dev.alloc::<f32>(n * c * h * w)? };
    let (planes, h32, w32) = ((n * c) as u32, h as u32, w as u32);
    let func = dev.get_or_load_custom_func("max_pool2_backward", MODULE, ptx()?)?;
    let mut launch = func.builder();
    launch.arg(&x);
    launch.arg(&g);
    launch.arg(&mut dx);
    launch.arg(&planes);
    launch.arg(&h32);
    launch.arg(&w32);
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    unsafe { launch.launch(LaunchConfig::for_num_elems((n * c * h * w).max(1) as u32)) }
        .map_err(candle_core::Error::wrap)?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
}
