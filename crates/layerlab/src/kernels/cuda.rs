//! layerlab's own CUDA kernels (the `cuda` feature), compiled once per process by NVRTC (which
//! candle's CUDA backend loads anyway) for whatever GPU the binary meets:
//!
//! - the SGD update ([`sgd_update_all`]): one kernel over all parameter tensors (32 per launch),
//!   updating each parameter and its momentum buffer in place. Written as candle tensor ops
//!   ([`crate::optim::Sgd`]'s `update_tensors`) one update is six kernels and as many fresh buffers,
//!   then a copy into the `Var`; a small network's step is bound by such launches. The kernel does
//!   the same f32 operations in the same order as the CPU's `update_slices`,
//!   each rounded on its own (`__fmul_rn`, `__fadd_rn`: never contracted into a fused
//!   multiply-add), so both give the same bits from the same inputs;
//! - the Adam and AdamW update ([`adam_update_all`]), likewise: `kernels::update::AdamStep`'s
//!   operations in its order, each rounded on its own;
//! - the 2×2 max-pool, forward and input gradient ([`max_pool2`], [`max_pool2_grad`]), with the
//!   CPU kernel's rule: each gradient goes to the first maximum of its window. candle's own
//!   max-pool gradient multiplies by the share of a window's values that are its maximum instead
//!   of dividing by their count, so a unique maximum gets a quarter of its gradient;
//! - ReLU, forward and input gradient ([`relu`], [`relu_grad`]): one kernel each way, where
//!   candle's backward is four;
//! - evaluation-mode BatchNorm as one per-channel scale and shift, with its ReLU
//!   ([`channel_affine`]);
//! - softmax cross-entropy with the count of right predictions, forward and backward
//!   ([`cross_entropy`], [`cross_entropy_grad`]; `kernels::loss` has the rule);
//! - BatchNorm's running statistics after a training step ([`running_stats`]), one kernel;
//! - the batch gather ([`gather_batch`]): a training or evaluation batch made on the GPU from the
//!   dataset's u8 images held there (`kernels::pixels` has the rule and the CPU reference).

use std::sync::OnceLock;

use candle_core::{bail, CudaStorage, Layout, Shape, Tensor};
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

/// The CUDA source of every kernel here.
pub const SOURCE: &str = include_str!("cuda.cu");

const MODULE: &str = "layerlab";

/// [`SOURCE`] compiled by NVRTC to PTX, once per process. NVRTC is a compiler library: this
/// needs no GPU (a test runs it in CI).
pub fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    let compiled =
        PTX.get_or_init(|| cudarc::nvrtc::compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| format!("{e:?}")));
    match compiled {
        Ok(ptx) => Ok(ptx),
        Err(e) => bail!("cannot compile layerlab's CUDA kernels with NVRTC: {e}"),
    }
}

/// The most values one launch of ours covers. The kernels index values with 32-bit integers, and
/// an index past the end of a launch (a grid rounded up to whole blocks, or a grid-stride loop's
/// last stride) must not wrap around: 2^20 below 2^32 leaves room for both.
pub const MAX_VALUES: usize = u32::MAX as usize - (1 << 20);
// The widest overshoot: a grid rounded up by one block of 1024, or the SGD kernel's grid-stride
// loop taking one more stride (at most 1024 blocks of 256 threads).
const _: () = assert!(MAX_VALUES + 1024 * 256 < u32::MAX as usize);

/// `n` values as a kernel's 32-bit count, or an error when there are more than [`MAX_VALUES`]:
/// past it a count would wrap and the kernel silently cover only part of its tensor.
pub fn launch_count(n: usize) -> candle_core::Result<u32> {
    if n > MAX_VALUES {
        bail!(
            "a tensor of {n} values is more than layerlab's CUDA kernels cover in one launch ({MAX_VALUES}): \
             lower train.batch_size or train.eval_batch_size"
        )
    }
    Ok(n as u32)
}

/// Tensors per launch of the update kernels (`SGD_TENSORS`, `ADAM_TENSORS`): their tables of
/// pointers are passed by value, and kernel parameters are limited to 4 KB.
const UPDATE_TENSORS: usize = 32;

/// The SGD kernel's table of tensors, laid out as its `SgdTable`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SgdTable {
    p: [u64; UPDATE_TENSORS],
    m: [u64; UPDATE_TENSORS],
    g: [u64; UPDATE_TENSORS],
    n: [u32; UPDATE_TENSORS],
    count: u32,
}

// SAFETY: plain old data, laid out as the kernel's struct (pointers as 64-bit addresses).
unsafe impl cudarc::driver::DeviceRepr for SgdTable {}

/// The device address of a contiguous f32 tensor's first value on a GPU.
fn address(t: &Tensor, what: &str) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else { bail!("optimizer update: the {what} is not on a GPU") };
    if !layout.is_contiguous() || t.dtype() != candle_core::DType::F32 {
        bail!("optimizer update: the {what} must be contiguous f32")
    }
    let slice = s.as_cuda_slice::<f32>()?;
    let stream = s.device.cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    Ok(ptr + 4 * layout.start_offset() as u64)
}

/// One launch of an update kernel: for each of up to [`UPDATE_TENSORS`] updates, the addresses
/// of its `B` tensors (parameter, buffers, gradient, all of one shape) and its size; and the
/// geometry: blocks of 256 along x (at most 1024, the kernel striding over the rest), one row of
/// blocks per update.
struct UpdateLaunch<const B: usize> {
    addresses: [[u64; UPDATE_TENSORS]; B],
    sizes: [u32; UPDATE_TENSORS],
    count: u32,
    config: LaunchConfig,
}

/// [`UpdateLaunch`] of `chunk` (at most [`UPDATE_TENSORS`] updates), each tensor checked (one
/// shape per update, contiguous f32 on a GPU) and named by `names` in errors.
fn update_launch<const B: usize>(
    kernel: &str,
    names: [&str; B],
    chunk: &[[&Tensor; B]],
) -> candle_core::Result<UpdateLaunch<B>> {
    let mut addresses = [[0u64; UPDATE_TENSORS]; B];
    let mut sizes = [0u32; UPDATE_TENSORS];
    let mut largest = 1;
    for (k, tensors) in chunk.iter().enumerate() {
        let dims = tensors[0].dims();
        if tensors.iter().any(|t| t.dims() != dims) {
            let shapes: Vec<String> = names.iter().zip(tensors).map(|(n, t)| format!("{n} {:?}", t.dims())).collect();
            bail!("{kernel}: {} differ in shape", shapes.join(", "))
        }
        for (b, t) in tensors.iter().enumerate() {
            addresses[b][k] = address(t, names[b])?;
        }
        sizes[k] = launch_count(tensors[0].elem_count())?;
        largest = largest.max(tensors[0].elem_count());
    }
    let config = LaunchConfig {
        grid_dim: ((largest.div_ceil(256)).min(1024) as u32, chunk.len() as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok(UpdateLaunch { addresses, sizes, count: chunk.len() as u32, config })
}

/// The SGD update of every (parameter, momentum buffer, gradient) triple, each three f32
/// tensors of one shape on one GPU, parameters and buffers updated in place: one launch per 32
/// tensors, where a kernel per tensor made a small network's step wait on launches. The
/// optimizer's settings come as plain values (learning rate, momentum, weight decay, Nesterov),
/// so that the kernels do not depend on the optimizer's types.
///
/// The parameters and buffers are written through their addresses, not through candle: candle
/// runs every op of a device on its one stream, in order, so no other kernel sees them
/// half-written. Tensors that share a `Var`'s memory (a `Trainer::state`'s, as candle's
/// `detach` shares it) see the update, as they would `Var::set`'s on the CPU: their callers read
/// them before the next step.
pub fn sgd_update_all(
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
    updates: &[(&Tensor, &Tensor, &Tensor)],
) -> candle_core::Result<()> {
    let Some((first, _, _)) = updates.first() else { return Ok(()) };
    let candle_core::Device::Cuda(dev) = first.device() else { bail!("the CUDA SGD update was given CPU tensors") };
    let func = dev.get_or_load_custom_func("sgd_update_all", MODULE, ptx()?)?;
    let (lr, mu, wd, nesterov) = (lr as f32, momentum as f32, weight_decay as f32, nesterov as i32);
    // Gradients that are views get a contiguous copy, kept alive until the launch is queued.
    let grads = updates.iter().map(|(_, _, g)| g.contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
    let rows: Vec<[&Tensor; 3]> = updates.iter().zip(&grads).map(|((p, m, _), g)| [*p, *m, g]).collect();
    for chunk in rows.chunks(UPDATE_TENSORS) {
        let l = update_launch("SGD update", ["parameter", "momentum buffer", "gradient"], chunk)?;
        let [p, m, g] = l.addresses;
        let table = SgdTable { p, m, g, n: l.sizes, count: l.count };
        let mut launch = func.builder();
        launch.arg(&table);
        launch.arg(&lr);
        launch.arg(&mu);
        launch.arg(&wd);
        launch.arg(&nesterov);
        // SAFETY: the arguments match the kernel's signature; each address holds `n` f32s of a
        // live tensor (the caller's, or `grads`, which outlives the launch's queuing).
        unsafe { launch.launch(l.config) }.map_err(candle_core::Error::wrap)?;
    }
    Ok(())
}

/// The Adam kernel's table of tensors, laid out as its `AdamTable`.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamTable {
    p: [u64; UPDATE_TENSORS],
    m: [u64; UPDATE_TENSORS],
    v: [u64; UPDATE_TENSORS],
    g: [u64; UPDATE_TENSORS],
    n: [u32; UPDATE_TENSORS],
    count: u32,
}

// SAFETY: plain old data, laid out as the kernel's struct (pointers as 64-bit addresses).
unsafe impl cudarc::driver::DeviceRepr for AdamTable {}

/// The Adam (or AdamW) update of every (parameter, exp_avg, exp_avg_sq, gradient), each four f32
/// tensors of one shape on one GPU, the first three updated in place, with `step`'s constants:
/// one launch per 32 tensors, as [`sgd_update_all`] (which says why writing through addresses
/// is safe). The kernel does `AdamStep::apply`'s f32 operations in its order.
pub fn adam_update_all(
    step: &super::update::AdamStep,
    updates: &[(&Tensor, &Tensor, &Tensor, &Tensor)],
) -> candle_core::Result<()> {
    let Some((first, ..)) = updates.first() else { return Ok(()) };
    let candle_core::Device::Cuda(dev) = first.device() else { bail!("the CUDA Adam update was given CPU tensors") };
    let func = dev.get_or_load_custom_func("adam_update_all", MODULE, ptx()?)?;
    let grads = updates.iter().map(|(.., g)| g.contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
    let rows: Vec<[&Tensor; 4]> = updates.iter().zip(&grads).map(|((p, m, v, _), g)| [*p, *m, *v, g]).collect();
    for chunk in rows.chunks(UPDATE_TENSORS) {
        let names = ["parameter", "exp_avg buffer", "exp_avg_sq buffer", "gradient"];
        let l = update_launch("Adam update", names, chunk)?;
        let [p, m, v, g] = l.addresses;
        let table = AdamTable { p, m, v, g, n: l.sizes, count: l.count };
        let flags = (step.decoupled as i32, step.l2 as i32, step.lerp_from_start as i32);
        let mut launch = func.builder();
        launch.arg(&table);
        launch.arg(&step.shrink);
        launch.arg(&step.step_size);
        launch.arg(&step.bias_correction2_sqrt);
        launch.arg(&step.beta1_weight);
        launch.arg(&step.beta2);
        launch.arg(&step.one_minus_beta2);
        launch.arg(&step.eps);
        launch.arg(&step.weight_decay);
        launch.arg(&flags.0);
        launch.arg(&flags.1);
        launch.arg(&flags.2);
        // SAFETY: the arguments match the kernel's signature; each address holds `n` f32s of a
        // live tensor (the caller's, or `grads`, which outlives the launch's queuing).
        unsafe { launch.launch(l.config) }.map_err(candle_core::Error::wrap)?;
    }
    Ok(())
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
    // SAFETY: the kernel writes every value. (Every buffer here holds at least one value: an
    // allocation of none fails on CUDA, where the CPU op returns an empty tensor.)
    let mut y = unsafe { dev.alloc::<f32>((n * c * ho * wo).max(1))? };
    let outputs = launch_count(n * c * ho * wo)?;
    let (planes, h32, w32) = ((n * c) as u32, h as u32, w as u32);
    let func = dev.get_or_load_custom_func("max_pool2_forward", MODULE, ptx()?)?;
    let mut launch = func.builder();
    launch.arg(&x);
    launch.arg(&mut y);
    launch.arg(&planes);
    launch.arg(&h32);
    launch.arg(&w32);
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    unsafe { launch.launch(LaunchConfig::for_num_elems(outputs.max(1))) }.map_err(candle_core::Error::wrap)?;
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
    let mut dx = unsafe { dev.alloc::<f32>((n * c * h * w).max(1))? };
    let inputs = launch_count(n * c * h * w)?;
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
    unsafe { launch.launch(LaunchConfig::for_num_elems(inputs.max(1))) }.map_err(candle_core::Error::wrap)?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
}

/// The CUDA side of the batch gather (`kernels::pixels::Gather`, which checks the operands and
/// gives their sizes `[count, c, h, w, n]`): u8 images [N, c, h, w], u32 positions [n] and
/// packed shifts [n], all on one GPU.
pub fn gather_batch(
    images: &CudaStorage,
    li: &Layout,
    positions: &CudaStorage,
    lp: &Layout,
    shifts: &CudaStorage,
    ls: &Layout,
    [count, c, h, w, n]: [usize; 5],
) -> candle_core::Result<(CudaStorage, Shape)> {
    let images = images.as_cuda_slice::<u8>()?.slice(li.start_offset()..li.start_offset() + count * c * h * w);
    let dev = positions.device.clone();
    let shifts = shifts.as_cuda_slice::<u32>()?.slice(ls.start_offset()..ls.start_offset() + n);
    let positions = positions.as_cuda_slice::<u32>()?.slice(lp.start_offset()..lp.start_offset() + n);
    let total = n * c * h * w;
    // SAFETY: the kernel writes every value.
    let mut out = unsafe { dev.alloc::<f32>(total.max(1))? };
    let total32 = launch_count(total)?;
    let (n32, c32, h32, w32) = (n as u32, c as u32, h as u32, w as u32);
    let func = dev.get_or_load_custom_func("gather_batch", MODULE, ptx()?)?;
    let mut launch = func.builder();
    launch.arg(&images);
    launch.arg(&positions);
    launch.arg(&shifts);
    launch.arg(&mut out);
    launch.arg(&n32);
    launch.arg(&c32);
    launch.arg(&h32);
    launch.arg(&w32);
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes. Positions are
    // not checked against N here (that would read them back): `resident` makes them from the
    // examples it holds.
    unsafe { launch.launch(LaunchConfig::for_num_elems(total32.max(1))) }.map_err(candle_core::Error::wrap)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, c, h, w))))
}

/// Kernel `name(inputs..., out, n)` over `n` values, one thread each: its output buffer.
fn elementwise(
    dev: &candle_core::CudaDevice,
    name: &str,
    inputs: &[&cudarc::driver::CudaView<'_, f32>],
    n: usize,
) -> candle_core::Result<cudarc::driver::CudaSlice<f32>> {
    let n32 = launch_count(n)?;
    // SAFETY: the kernel writes every value.
    let mut out = unsafe { dev.alloc::<f32>(n.max(1))? };
    let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
    {
        let mut launch = func.builder();
        for x in inputs {
            launch.arg(*x);
        }
        launch.arg(&mut out);
        launch.arg(&n32);
        // SAFETY: the caller names a kernel taking these inputs, then the output and the count;
        // every buffer holds `n` f32s.
        unsafe { launch.launch(LaunchConfig::for_num_elems(n32.max(1))) }.map_err(candle_core::Error::wrap)?;
    }
    Ok(out)
}

/// `max(x, 0)` of a contiguous f32 tensor's values (`super::layers`' ReLU op on a GPU).
pub fn relu(s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
    let y = elementwise(&s.device, "relu_forward", &[&f32_values(s, l)?], l.shape().elem_count())?;
    Ok((CudaStorage::wrap_cuda_slice(y, s.device.clone()), l.shape().clone()))
}

/// The ReLU's input gradient from its output `ys` and the output gradient `gs`.
pub fn relu_grad(
    ys: &CudaStorage,
    yl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    if yl.dims() != gl.dims() {
        bail!("ReLU gradient {:?} does not fit output {:?}", gl.dims(), yl.dims())
    }
    let (y, g) = (f32_values(ys, yl)?, f32_values(gs, gl)?);
    let dx = elementwise(&ys.device, "relu_backward", &[&y, &g], yl.shape().elem_count())?;
    Ok((CudaStorage::wrap_cuda_slice(dx, ys.device.clone()), yl.shape().clone()))
}

/// Evaluation-mode BatchNorm of `xs` [n, c, h, w] with per-channel `scale` and `shift` [c], and a
/// ReLU when `relu` (`super::norm`'s affine op on a GPU): one pass where candle's ops make four.
pub fn channel_affine(
    xs: &CudaStorage,
    xl: &Layout,
    scale: &CudaStorage,
    sl: &Layout,
    shift: &CudaStorage,
    tl: &Layout,
    relu: bool,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let &[_, c, h, w] = xl.dims() else { bail!("BatchNorm wants [n, c, h, w], got {:?}", xl.dims()) };
    let (x, a, b) = (f32_values(xs, xl)?, f32_values(scale, sl)?, f32_values(shift, tl)?);
    let total = xl.shape().elem_count();
    let dev = xs.device.clone();
    // SAFETY: the kernel writes every value.
    let mut y = unsafe { dev.alloc::<f32>(total.max(1))? };
    let (total32, c32, hw32, relu32) = (launch_count(total)?, c as u32, (h * w).max(1) as u32, relu as i32);
    let func = dev.get_or_load_custom_func("channel_affine", MODULE, ptx()?)?;
    let mut launch = func.builder();
    launch.arg(&x);
    launch.arg(&a);
    launch.arg(&b);
    launch.arg(&mut y);
    launch.arg(&total32);
    launch.arg(&c32);
    launch.arg(&hw32);
    launch.arg(&relu32);
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    unsafe { launch.launch(LaunchConfig::for_num_elems(total32.max(1))) }.map_err(candle_core::Error::wrap)?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
}

/// `max(y, 0)` over a buffer in place (`relu_forward`'s rule), queued on `dev`'s stream.
pub fn relu_in_place(dev: &candle_core::CudaDevice, y: &mut cudarc::driver::CudaSlice<f32>) -> candle_core::Result<()> {
    let n32 = launch_count(y.len())?;
    let func = dev.get_or_load_custom_func("relu_in_place", MODULE, ptx()?)?;
    let mut launch = func.builder();
    launch.arg(y);
    launch.arg(&n32);
    // SAFETY: the arguments match the kernel's signature; the buffer holds `n` f32s.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n32.max(1))) }.map_err(candle_core::Error::wrap)?;
    Ok(())
}

/// BatchNorm's running statistics after a training step, PyTorch's rule with `momentum`:
/// r ← r · (1 − momentum) + batch · momentum, for the running mean and the running variance [c]
/// each, from the step's `batch` statistics [2c] (the mean, then the unbiased variance). One
/// kernel, where candle's ops took six, and the result as one [2c] tensor: the new mean, then
/// the new variance.
pub fn running_stats(mean: &Tensor, var: &Tensor, batch: &Tensor, momentum: f64) -> candle_core::Result<Tensor> {
    mean.contiguous()?.apply_op3_no_bwd(&var.contiguous()?, &batch.contiguous()?, &RunningStats { momentum })
}

struct RunningStats {
    momentum: f64,
}

impl candle_core::CustomOp3 for RunningStats {
    fn name(&self) -> &'static str {
        "layerlab-running-stats"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        bail!("{} runs on a GPU only", self.name())
    }

    fn cuda_fwd(
        &self,
        ms: &CudaStorage,
        ml: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let c = ml.shape().elem_count();
        if vl.shape().elem_count() != c || bl.shape().elem_count() != 2 * c {
            bail!("running statistics: mean {:?}, variance {:?}, batch {:?}", ml.dims(), vl.dims(), bl.dims())
        }
        let (m, v, b) = (f32_values(ms, ml)?, f32_values(vs, vl)?, f32_values(bs, bl)?);
        let dev = ms.device.clone();
        // SAFETY: the kernel writes every value.
        let mut out = unsafe { dev.alloc::<f32>((2 * c).max(1))? };
        let (values, c32) = (launch_count(2 * c)?, c as u32);
        let (keep, take) = ((1.0 - self.momentum) as f32, self.momentum as f32);
        let func = dev.get_or_load_custom_func("running_stats", MODULE, ptx()?)?;
        let mut launch = func.builder();
        launch.arg(&m);
        launch.arg(&v);
        launch.arg(&b);
        launch.arg(&mut out);
        launch.arg(&c32);
        launch.arg(&keep);
        launch.arg(&take);
        // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
        unsafe { launch.launch(LaunchConfig::for_num_elems(values.max(1))) }.map_err(candle_core::Error::wrap)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(2 * c)))
    }
}

/// The labels [n] of a contiguous u32 tensor, from its layout's offset.
fn u32_values<'a>(s: &'a CudaStorage, l: &Layout, n: usize) -> candle_core::Result<cudarc::driver::CudaView<'a, u32>> {
    if !l.is_contiguous() {
        bail!("layerlab's GPU ops take contiguous tensors")
    }
    Ok(s.as_cuda_slice::<u32>()?.slice(l.start_offset()..l.start_offset() + n))
}

/// `super::loss`'s forward op on a GPU: logits [n, k] (f32) and labels [n] (u32) → [mean loss,
/// right predictions]. Labels are not checked against k here (that would read them back):
/// datasets are checked when they are loaded.
pub fn cross_entropy(
    xs: &CudaStorage,
    xl: &Layout,
    ys: &CudaStorage,
    yl: &Layout,
    n: usize,
    k: usize,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (x, y) = (f32_values(xs, xl)?, u32_values(ys, yl, n)?);
    let dev = xs.device.clone();
    // SAFETY: the kernels write every value.
    let (mut loss, mut right, mut out) =
        unsafe { (dev.alloc::<f32>(n.max(1))?, dev.alloc::<u32>(n.max(1))?, dev.alloc::<f32>(2)?) };
    let (n32, k32) = (launch_count(n)?, k as u32);
    let rows = dev.get_or_load_custom_func("cross_entropy_rows", MODULE, ptx()?)?;
    let mut launch = rows.builder();
    launch.arg(&x);
    launch.arg(&y);
    launch.arg(&mut loss);
    launch.arg(&mut right);
    launch.arg(&n32);
    launch.arg(&k32);
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n32.max(1))) }.map_err(candle_core::Error::wrap)?;
    let sum = dev.get_or_load_custom_func("cross_entropy_sum", MODULE, ptx()?)?;
    let mut launch = sum.builder();
    launch.arg(&loss);
    launch.arg(&right);
    launch.arg(&mut out);
    launch.arg(&n32);
    // SAFETY: as above; one thread does the sum.
    unsafe { launch.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 }) }
        .map_err(candle_core::Error::wrap)?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(2)))
}

/// `super::loss`'s backward op on a GPU: the logits' gradient [n, k] from the logits, the labels
/// and the gradient of the forward op's output (its first value, the loss's).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_grad(
    xs: &CudaStorage,
    xl: &Layout,
    ys: &CudaStorage,
    yl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    n: usize,
    k: usize,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (x, y, g) = (f32_values(xs, xl)?, u32_values(ys, yl, n)?, f32_values(gs, gl)?);
    let dev = xs.device.clone();
    // SAFETY: the kernel writes every value.
    let mut dx = unsafe { dev.alloc::<f32>((n * k).max(1))? };
    let (values, n32, k32) = (launch_count(n * k)?, n as u32, k as u32);
    let func = dev.get_or_load_custom_func("cross_entropy_grad", MODULE, ptx()?)?;
    let mut launch = func.builder();
    launch.arg(&x);
    launch.arg(&y);
    launch.arg(&g);
    launch.arg(&mut dx);
    launch.arg(&n32);
    launch.arg(&k32);
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    unsafe { launch.launch(LaunchConfig::for_num_elems(values.max(1))) }.map_err(candle_core::Error::wrap)?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
}
