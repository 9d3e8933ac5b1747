//! Convolution on NVIDIA GPUs (the `cuda` feature): the forward pass and both gradients through
//! cuDNN, as candle custom ops.
//!
//! candle's own CUDA convolution runs only its forward pass through cuDNN; its input gradient is
//! a naive `conv_transpose2d` kernel, one thread per input value. And it lets cuDNN pick TF32
//! kernels for f32 data on Ampere and later, which round products to 10-bit mantissas. Here:
//!
//! - f32 arithmetic only (`CUDNN_FMA_MATH`), as on the CPU, unless `train.tf32` allows TF32;
//! - deterministic algorithms only (cuDNN's atomics-based gradient kernels are not), chosen by a
//!   fixed rule on the shape rather than by timing them, so that two runs on the same GPU model
//!   and cuDNN version give the same bytes. The rule ([`Plan::new`]) comes from timing every
//!   algorithm of every layer of VGG-11 and ResNet-18 at widths 1 and 0.25 on an H200
//!   (`layerlab-bench cudnn`; docs/performance.md, "GPU"): Winograd (non-fused) for 3×3
//!   stride-1 layers with enough channels, FFT for the weight gradient of narrower ones, and the
//!   plain implicit-GEMM kernels elsewhere. cuDNN's own heuristic ranking, tried first, was up to
//!   12× slower on some layers. A preferred algorithm cuDNN does not offer for a shape falls back
//!   to the first deterministic one it ranks;
//! - descriptors, algorithms and workspace sizes made once per shape and kept, per thread (a
//!   cuDNN handle may not be shared between threads) and per device.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use cudarc::cudnn::{result, sys};

use super::cuda::f32_values;
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

/// A [`Geometry`]'s input, weight and output shapes, padding and stride: what cuDNN's choices
/// depend on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Geometry {
    x: [i32; 4],
    w: [i32; 4],
    padding: i32,
    stride: i32,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], padding: usize, stride: usize) -> candle_core::Result<Geometry> {
        let ([n, c, h, wd], [m, wc, kh, kw]) = (dims4(x)?, dims4(w)?);
        if wc != c || kh != kw || h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 {
            bail!("cuDNN convolution: input {x:?} and weight {w:?} (padding {padding}, stride {stride}) do not fit")
        }
        // Padding and stride come from the architecture (at most 1 and 2).
        let g = Geometry {
            x: descriptor_dims([n, c, h, wd])?,
            w: descriptor_dims([m, c, kh, kw])?,
            padding: padding as i32,
            stride: stride as i32,
        };
        // The output is checked too: it can hold more values than the input (3 → 64 channels).
        descriptor_dims(g.y().map(|v| v as usize))?;
        Ok(g)
    }

    fn y(&self) -> [i32; 4] {
        let out = |size: i32| (size + 2 * self.padding - self.w[2]) / self.stride + 1;
        [self.x[0], self.w[0], out(self.x[2]), out(self.x[3])]
    }
}

/// The most values a tensor given to cuDNN may hold: its descriptors take `int` sizes, and past
/// 2^31 − 1 values cuDNN refuses the tensor (`CUDNN_STATUS_NOT_SUPPORTED` or `BAD_PARAM`), an
/// error that names no setting. About half of what our own kernels cover
/// ([`super::cuda::MAX_VALUES`]).
pub const MAX_TENSOR_VALUES: usize = i32::MAX as usize;

/// `dims` as a cuDNN descriptor's sizes, or an error naming the settings to lower when the tensor
/// holds more than [`MAX_TENSOR_VALUES`] values. VGG-11 at width 1 on 32×32 images reaches it at a
/// batch of 32,768 (its first activation has 65,536 values an image).
pub fn descriptor_dims(dims: [usize; 4]) -> candle_core::Result<[i32; 4]> {
    // Each size on its own too: with a size of 0 the product says nothing of the others.
    let sizes_fit = dims.iter().all(|&d| d <= MAX_TENSOR_VALUES);
    match dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) {
        Some(values) if values <= MAX_TENSOR_VALUES && sizes_fit => Ok(dims.map(|d| d as i32)),
        values => bail!(
            "a tensor of shape {dims:?} ({} values) is more than cuDNN takes in one call ({MAX_TENSOR_VALUES}): \
             lower train.batch_size or train.eval_batch_size",
            values.map_or("over 2^64".to_string(), |v| v.to_string())
        ),
    }
}

fn dims4(d: &[usize]) -> candle_core::Result<[usize; 4]> {
    match d {
        &[a, b, c, e] => Ok([a, b, c, e]),
        _ => bail!("cuDNN convolution: expected 4 dimensions, got {d:?}"),
    }
}

fn check(status: Result<(), result::CudnnError>, what: &str) -> candle_core::Result<()> {
    made(status, what)
}

/// cuDNN's error as candle's, naming the call that failed.
fn made<T>(r: Result<T, result::CudnnError>, what: &str) -> candle_core::Result<T> {
    r.map_err(|e| candle_core::Error::Msg(format!("cuDNN {what}: {e:?}")))
}

/// A cuDNN handle bound to one candle device's stream.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: made by `create_handle`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

/// The descriptors of one [`Geometry`] and the algorithm chosen for each pass.
struct Plan {
    handle: Rc<Handle>,
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    forward: (sys::cudnnConvolutionFwdAlgo_t, usize),
    grad_input: (sys::cudnnConvolutionBwdDataAlgo_t, usize),
    grad_weight: (sys::cudnnConvolutionBwdFilterAlgo_t, usize),
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was made by `Plan::new` and is destroyed once.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_convolution_descriptor(self.conv);
        }
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<candle_core::cuda_backend::DeviceId, Rc<Handle>>> = RefCell::new(HashMap::new());
    /// Plans by device, shapes and whether TF32 is allowed.
    static PLANS: RefCell<HashMap<(candle_core::cuda_backend::DeviceId, Geometry, bool), Rc<Plan>>> =
        RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> candle_core::Result<Rc<Handle>> {
    HANDLES.with(|handles| {
        if let Some(h) = handles.borrow().get(&dev.id()) {
            return Ok(h.clone());
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
        let raw = result::create_handle().map_err(|e| candle_core::Error::Msg(format!("cuDNN handle: {e:?}")))?;
        let h = Rc::new(Handle(raw));
        // SAFETY: a live handle and the device's live stream.
        check(unsafe { result::set_stream(raw, stream.cu_stream() as *mut _) }, "set stream")?;
        handles.borrow_mut().insert(dev.id(), h.clone());
        Ok(h)
    })
}

fn plan(dev: &CudaDevice, g: Geometry, tf32: bool) -> candle_core::Result<Rc<Plan>> {
    if let Some(p) = PLANS.with(|plans| plans.borrow().get(&(dev.id(), g, tf32)).cloned()) {
        return Ok(p);
    }
    let p = Rc::new(Plan::new(handle(dev)?, g, tf32)?);
    PLANS.with(|plans| plans.borrow_mut().insert((dev.id(), g, tf32), p.clone()));
    Ok(p)
}

const F32: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
const NCHW: sys::cudnnTensorFormat_t = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;

impl Plan {
    /// The descriptors and algorithms for shapes `g`; with `tf32`, cuDNN may use TF32 tensor
    /// cores (`train.tf32`), else it stays in f32.
    fn new(handle: Rc<Handle>, g: Geometry, tf32: bool) -> candle_core::Result<Plan> {
        let mut plan = Plan {
            handle,
            x: made(result::create_tensor_descriptor(), "descriptor")?,
            y: made(result::create_tensor_descriptor(), "descriptor")?,
            w: made(result::create_filter_descriptor(), "descriptor")?,
            conv: made(result::create_convolution_descriptor(), "descriptor")?,
            forward: (sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, 0),
            grad_input: (sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, 0),
            grad_weight: (sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, 0),
        };
        let (p, s) = (g.padding, g.stride);
        // SAFETY: descriptors made just above.
        unsafe {
            check(result::set_tensor4d_descriptor(plan.x, NCHW, F32, g.x), "input descriptor")?;
            check(result::set_tensor4d_descriptor(plan.y, NCHW, F32, g.y()), "output descriptor")?;
            check(result::set_filter4d_descriptor(plan.w, F32, NCHW, g.w), "weight descriptor")?;
            let cross = sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;
            check(result::set_convolution2d_descriptor(plan.conv, p, p, s, s, 1, 1, cross, F32), "convolution")?;
            // FMA math keeps cuDNN in f32; default math lets it use TF32 tensor cores.
            let math =
                if tf32 { sys::cudnnMathType_t::CUDNN_DEFAULT_MATH } else { sys::cudnnMathType_t::CUDNN_FMA_MATH };
            check(result::set_convolution_math_type(plan.conv, math), "math type")?;
        }
        let (k, stride, c) = (g.w[2], g.stride, g.x[1]);
        let plane = g.x[2] * g.x[3];
        let same_3x3 = k == 3 && stride == 1;
        use sys::cudnnConvolutionBwdDataAlgo_t as D;
        use sys::cudnnConvolutionBwdFilterAlgo_t as F;
        use sys::cudnnConvolutionFwdAlgo_t as Fw;
        let forward = if same_3x3 && c >= 64 && (c >= 128 || plane >= 256) {
            Fw::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED
        } else {
            Fw::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM
        };
        let grad_input = if same_3x3 {
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED
        } else {
            D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1
        };
        let grad_weight = match (same_3x3, c) {
            (true, c) if c >= 64 => F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            (true, c) if c > 3 => F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
            _ => F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        };
        let all = listed(&plan)?;
        if let Algo::Forward(algo) = choose(&all, Algo::Forward(forward), tf32) {
            plan.forward = (algo, workspace(&plan, Algo::Forward(algo))?);
        }
        if let Algo::GradInput(algo) = choose(&all, Algo::GradInput(grad_input), tf32) {
            plan.grad_input = (algo, workspace(&plan, Algo::GradInput(algo))?);
        }
        if let Algo::GradWeight(algo) = choose(&all, Algo::GradWeight(grad_weight), tf32) {
            plan.grad_weight = (algo, workspace(&plan, Algo::GradWeight(algo))?);
        }
        Ok(plan)
    }
}

/// One algorithm cuDNN's heuristics list for a pass, with what they say of it.
struct Listed {
    algo: Algo,
    status: sys::cudnnStatus_t,
    determinism: sys::cudnnDeterminism_t,
    math: sys::cudnnMathType_t,
    memory: usize,
}

/// Every algorithm cuDNN's heuristics list for the three passes of `plan`, best ranked first.
fn listed(plan: &Plan) -> candle_core::Result<Vec<Listed>> {
    const N: usize = 16;
    let (h, mut count, mut all) = (plan.handle.0, 0, Vec::new());
    // SAFETY: the plan's live descriptors; each call writes at most N entries and says how many.
    unsafe {
        let mut fwd: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = std::mem::zeroed();
        let (x, w, y, conv) = (plan.x, plan.w, plan.y, plan.conv);
        let r = result::get_convolution_forward_algorithm(h, x, w, conv, y, N as i32, &mut count, fwd.as_mut_ptr());
        check(r, "forward heuristics")?;
        all.extend(fwd[..count as usize].iter().map(|a| Listed {
            algo: Algo::Forward(a.algo),
            status: a.status,
            determinism: a.determinism,
            math: a.mathType,
            memory: a.memory,
        }));
        let mut data: [sys::cudnnConvolutionBwdDataAlgoPerf_t; N] = std::mem::zeroed();
        let r =
            result::get_convolution_backward_data_algorithm(h, w, y, conv, x, N as i32, &mut count, data.as_mut_ptr());
        check(r, "input-gradient heuristics")?;
        all.extend(data[..count as usize].iter().map(|a| Listed {
            algo: Algo::GradInput(a.algo),
            status: a.status,
            determinism: a.determinism,
            math: a.mathType,
            memory: a.memory,
        }));
        let mut filter: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; N] = std::mem::zeroed();
        let r = result::get_convolution_backward_filter_algorithm(
            h,
            x,
            y,
            conv,
            w,
            N as i32,
            &mut count,
            filter.as_mut_ptr(),
        );
        check(r, "weight-gradient heuristics")?;
        all.extend(filter[..count as usize].iter().map(|a| Listed {
            algo: Algo::GradWeight(a.algo),
            status: a.status,
            determinism: a.determinism,
            math: a.mathType,
            memory: a.memory,
        }));
    }
    Ok(all)
}

/// `preferred` when cuDNN lists it as usable, else the first usable algorithm it lists for the
/// same pass, else `preferred` all the same (cuDNN then says what is wrong when it runs).
fn choose(all: &[Listed], preferred: Algo, tf32: bool) -> Algo {
    let pass = std::mem::discriminant(&preferred);
    let usable_here =
        |l: &&Listed| std::mem::discriminant(&l.algo) == pass && usable(l.status, l.determinism, l.math, tf32);
    all.iter()
        .filter(usable_here)
        .find(|l| l.algo == preferred)
        .or_else(|| all.iter().find(usable_here))
        .map_or(preferred, |l| l.algo)
}

/// The workspace `algo` needs on `plan`'s shapes, in bytes.
fn workspace(plan: &Plan, algo: Algo) -> candle_core::Result<usize> {
    let (h, x, w, y, conv) = (plan.handle.0, plan.x, plan.w, plan.y, plan.conv);
    // SAFETY: the plan's live descriptors.
    let size = unsafe {
        match algo {
            Algo::Forward(a) => result::get_convolution_forward_workspace_size(h, x, w, conv, y, a),
            Algo::GradInput(a) => result::get_convolution_backward_data_workspace_size(h, w, y, conv, x, a),
            Algo::GradWeight(a) => result::get_convolution_backward_filter_workspace_size(h, x, y, conv, w, a),
        }
    };
    made(size, "workspace size")
}

/// An algorithm that ran in the heuristics, gives the same bytes every time, and computes in f32
/// (or uses tensor cores, where `tf32` allows it).
fn usable(
    status: sys::cudnnStatus_t,
    determinism: sys::cudnnDeterminism_t,
    math: sys::cudnnMathType_t,
    tf32: bool,
) -> bool {
    status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
        && determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
        && (tf32
            || !matches!(
                math,
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
                    | sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
            ))
}

/// Which of the three passes a [`CudnnConv`] op runs.
#[derive(Clone, Copy, Debug)]
enum Pass {
    /// (x, w) → y.
    Forward,
    /// (dy, w) → dx, for an input of this height and width.
    GradInput { h: usize, w: usize },
    /// (x, dy) → dw, for a kernel of this size.
    GradWeight { k: usize },
}

/// One pass of a convolution with square kernels, equal padding and one stride, on f32; with
/// `tf32`, cuDNN may round its inputs to TF32.
struct CudnnConv {
    padding: usize,
    stride: usize,
    pass: Pass,
    tf32: bool,
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "cudnn-conv2d",
            Pass::GradInput { .. } => "cudnn-conv2d-grad-input",
            Pass::GradWeight { .. } => "cudnn-conv2d-grad-weight",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("{} runs on a GPU only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let (a, b) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let (d1, d2) = (l1.dims(), l2.dims());
        let g = match self.pass {
            Pass::Forward => Geometry::new(d1, d2, self.padding, self.stride)?,
            Pass::GradInput { h, w } => Geometry::new(&[d1[0], d2[1], h, w], d2, self.padding, self.stride)?,
            Pass::GradWeight { k } => Geometry::new(d1, &[d2[1], d1[1], k, k], self.padding, self.stride)?,
        };
        let plan = plan(&dev, g, self.tf32)?;
        let (out_dims, workspace_bytes) = match self.pass {
            Pass::Forward => (g.y(), plan.forward.1),
            Pass::GradInput { .. } => (g.x, plan.grad_input.1),
            Pass::GradWeight { .. } => (g.w, plan.grad_weight.1),
        };
        // cuDNN is told the shapes; a gradient of another shape would be read out of bounds.
        if matches!(self.pass, Pass::GradInput { .. }) && d1 != g.y().map(|v| v as usize) {
            bail!("cuDNN input gradient: gradient {d1:?} does not match the output {:?}", g.y())
        }
        if matches!(self.pass, Pass::GradWeight { .. }) && d2 != g.y().map(|v| v as usize) {
            bail!("cuDNN weight gradient: gradient {d2:?} does not match the output {:?}", g.y())
        }
        let out_dims = out_dims.map(|v| v as usize);
        let algo = match self.pass {
            Pass::Forward => Algo::Forward(plan.forward.0),
            Pass::GradInput { .. } => Algo::GradInput(plan.grad_input.0),
            Pass::GradWeight { .. } => Algo::GradWeight(plan.grad_weight.0),
        };
        // SAFETY: every value of `out` is written by cuDNN (beta = 0) before anyone reads it.
        let mut out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(out_dims.iter().product::<usize>().max(1))? };
        run(&dev, &plan, algo, &a, &b, &mut out, workspace_bytes)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(out_dims.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !matches!(self.pass, Pass::Forward) {
            bail!("{}: no second derivative", self.name())
        }
        let dy = dy.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        // The input gradient of the first layer (the images) is never used: skip it.
        let (p, s, tf32) = (self.padding, self.stride, self.tf32);
        let dx = if x.track_op() { Some(grad_input(&dy, w, p, s, (h, wd), tf32)?) } else { None };
        let dw = grad_weight(x, &dy, p, s, w.dim(2)?, tf32)?;
        Ok((dx, Some(dw)))
    }
}

/// One of cuDNN's algorithms for one of the three passes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    GradInput(sys::cudnnConvolutionBwdDataAlgo_t),
    GradWeight(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// Runs `algo` of `plan` on `a` and `b` (x and w, dy and w, or x and dy) into `out`, with a
/// workspace of `workspace_bytes`.
fn run(
    dev: &CudaDevice,
    plan: &Plan,
    algo: Algo,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    out: &mut CudaSlice<f32>,
    workspace_bytes: usize,
) -> candle_core::Result<()> {
    let stream = dev.cuda_stream();
    // SAFETY: cuDNN only writes the workspace.
    let mut workspace: CudaSlice<u8> = unsafe { dev.alloc::<u8>(workspace_bytes.max(1))? };
    let (one, zero) = (1f32, 0f32);
    let (alpha, beta) = (&one as *const f32 as *const c_void, &zero as *const f32 as *const c_void);
    let (a_ptr, _a_guard) = a.device_ptr(&stream);
    let (b_ptr, _b_guard) = b.device_ptr(&stream);
    let (o_ptr, _o_guard) = out.device_ptr_mut(&stream);
    let (ws_ptr, _ws_guard) = workspace.device_ptr_mut(&stream);
    let (a_ptr, b_ptr, o_ptr) = (a_ptr as *const c_void, b_ptr as *const c_void, o_ptr as *mut c_void);
    let (ws, n) = (ws_ptr as *mut c_void, workspace_bytes);
    let (h, p) = (plan.handle.0, plan);
    // SAFETY: the descriptors describe these contiguous f32 buffers (shapes checked by the caller),
    // and the workspace has the size cuDNN asked for this algorithm.
    let r = unsafe {
        match algo {
            Algo::Forward(al) => {
                result::convolution_forward(h, alpha, p.x, a_ptr, p.w, b_ptr, p.conv, al, ws, n, beta, p.y, o_ptr)
            }
            Algo::GradInput(al) => {
                result::convolution_backward_data(h, alpha, p.w, b_ptr, p.y, a_ptr, p.conv, al, ws, n, beta, p.x, o_ptr)
            }
            Algo::GradWeight(al) => result::convolution_backward_filter(
                h, alpha, p.x, a_ptr, p.y, b_ptr, p.conv, al, ws, n, beta, p.w, o_ptr,
            ),
        }
    };
    check(r, &format!("{algo:?}"))
}

/// Every algorithm cuDNN's heuristics list for the three passes of one convolution, each timed
/// (the best of 5 runs after 2), as JSON lines: what `layerlab-bench cudnn` prints to choose
/// the rule in [`Plan::new`] from, in f32 (TF32 not allowed, as training by default). `device`
/// must be a GPU.
pub fn survey(
    device: &candle_core::Device,
    x: [usize; 4],
    w: [usize; 4],
    padding: usize,
    stride: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let dev = device.as_cuda_device()?.clone();
    let g = Geometry::new(&x, &w, padding, stride)?;
    let plan = Plan::new(handle(&dev)?, g, false)?;
    let y = g.y().map(|v| v as usize);
    let random = |shape: [usize; 4]| Tensor::rand(-1f32, 1f32, shape.to_vec(), device);
    let (xt, wt, dyt) = (random(x)?, random(w)?, random(y)?);
    let storage = |t: &Tensor| -> anyhow::Result<CudaSlice<f32>> {
        let (s, _) = t.storage_and_layout();
        match &*s {
            candle_core::Storage::Cuda(c) => Ok(c.as_cuda_slice::<f32>()?.clone()),
            _ => anyhow::bail!("not on a GPU"),
        }
    };
    let (xs, ws, dys) = (storage(&xt)?, storage(&wt)?, storage(&dyt)?);
    let mut lines = Vec::new();
    let chosen = [
        format!("{:?}", Algo::Forward(plan.forward.0)),
        format!("{:?}", Algo::GradInput(plan.grad_input.0)),
        format!("{:?}", Algo::GradWeight(plan.grad_weight.0)),
    ];
    for (rank, Listed { algo, status, determinism, math, memory }) in listed(&plan)?.into_iter().enumerate() {
        let (pass, a, b, out_len) = match algo {
            Algo::Forward(_) => ("forward", xs.slice(..), ws.slice(..), y.iter().product()),
            Algo::GradInput(_) => ("input grad", dys.slice(..), ws.slice(..), x.iter().product()),
            Algo::GradWeight(_) => ("weight grad", xs.slice(..), dys.slice(..), w.iter().product()),
        };
        let mut ms = None;
        if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
            // SAFETY: written by cuDNN before it is read (never read here).
            let mut out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(out_len)? };
            let mut best = f64::MAX;
            for i in 0..7 {
                dev.cuda_stream().synchronize()?;
                let t0 = std::time::Instant::now();
                if run(&dev, &plan, algo, &a, &b, &mut out, memory).is_err() {
                    break;
                }
                dev.cuda_stream().synchronize()?;
                if i >= 2 {
                    best = best.min(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            ms = (best < f64::MAX).then_some(best);
        }
        let name = format!("{algo:?}");
        lines.push(serde_json::json!({
            "x": x, "w": w, "padding": padding, "stride": stride, "pass": pass, "rank": rank,
            "chosen": chosen.contains(&name), "algo": name, "status": format!("{status:?}"),
            "deterministic": determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
            "math": format!("{math:?}"), "workspace_mb": memory as f64 / 1e6, "ms": ms,
        }));
    }
    Ok(lines)
}

/// Whether [`conv2d`] takes these operands: f32 on one CUDA device. (Whether it should is the
/// caller's `KernelOptions::cudnn_conv`; off, convolutions go through candle's own.)
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cuda()
        && x.device().same_device(weight.device())
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
}

/// `x` [n, cin, h, w] ⊛ `weight` [cout, cin, k, k] through cuDNN, with its backward; TF32
/// allowed when `tf32`.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize, tf32: bool) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, CudnnConv { padding, stride, pass: Pass::Forward, tf32 })
}

/// The input gradient alone: `dy` [n, cout, ho, wo] and `weight` to [n, cin, h, w].
pub fn grad_input(
    dy: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    (h, w): (usize, usize),
    tf32: bool,
) -> candle_core::Result<Tensor> {
    let op = CudnnConv { padding, stride, pass: Pass::GradInput { h, w }, tf32 };
    dy.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op)
}

/// The weight gradient alone: `x` [n, cin, h, w] and `dy` [n, cout, ho, wo] to [cout, cin, k, k].
pub fn grad_weight(
    x: &Tensor,
    dy: &Tensor,
    padding: usize,
    stride: usize,
    k: usize,
    tf32: bool,
) -> candle_core::Result<Tensor> {
    let op = CudnnConv { padding, stride, pass: Pass::GradWeight { k }, tf32 };
    x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &op)
}

/// Whether [`batch_norm_train`] takes this activation tensor: f32 [n, c, h, w] on a GPU.
/// (Whether it should is the caller's `KernelOptions::cudnn_batch_norm`; off, training-mode
/// BatchNorm runs as candle ops.)
pub fn batch_norm_applies(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::F32 && x.rank() == 4
}

/// Training-mode BatchNorm of `x` [n, c, h, w] with `weight` and `bias` [c] through cuDNN
/// (spatial mode, whose backward pass has no atomics), followed by a ReLU when `relu`: the
/// output, with gradients to all three, and the batch statistics it normalised with, as one
/// [2c] tensor with no gradient: the mean, then the unbiased variance (what running statistics
/// take); and the op, for a backward pass without candle's graph ([`crate::backward`]).
///
/// As candle ops this is about a dozen kernels forward and twenty backward per layer; here one
/// each way (two with the ReLU). The op's output is `y` itself, so candle's backward pass meets
/// one node per layer. (An earlier version packed `y` and the statistics into one output and
/// viewed `y` out of it; candle's backward then built a zero-padded copy of every BatchNorm
/// gradient, and gave the view and the packed tensor each their own zero tensor to add into.)
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, Tensor, super::KeptOp3)> {
    let c = x.dims4()?.1;
    let stats = Arc::new(Mutex::new(None));
    let op: super::KeptOp3 = Arc::new(Box::new(BatchNormTrain { eps, relu, stats: stats.clone() }));
    let y = x.contiguous()?.apply_op3_arc(&weight.contiguous()?, &bias.contiguous()?, op.clone())?;
    let stats = x.apply_op1_no_bwd(&Kept { stats, len: 2 * c })?;
    Ok((y, stats, op))
}

/// The batch statistics a [`BatchNormTrain`] forward pass left, as the output of an op of their
/// own (the one way to make a tensor of GPU memory written by another op). The operand is
/// ignored.
struct Kept {
    stats: Arc<Mutex<Option<CudaStorage>>>,
    len: usize,
}

impl candle_core::CustomOp1 for Kept {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm-stats"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("{} runs on a GPU only", self.name())
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match self.stats.lock().expect("BatchNorm statistics lock").take() {
            Some(stats) => Ok((stats, Shape::from(self.len))),
            None => bail!("BatchNorm statistics taken before the forward pass made them"),
        }
    }
}

/// A cuDNN tensor descriptor, destroyed on drop.
struct Descriptor(sys::cudnnTensorDescriptor_t);

impl Descriptor {
    fn nchw(dims: [usize; 4]) -> candle_core::Result<Descriptor> {
        let dims = descriptor_dims(dims)?;
        let d = Descriptor(made(result::create_tensor_descriptor(), "descriptor")?);
        // SAFETY: a descriptor just made.
        check(unsafe { result::set_tensor4d_descriptor(d.0, NCHW, F32, dims) }, "descriptor")?;
        Ok(d)
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: made by `Descriptor::nchw`, destroyed once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

const SPATIAL: sys::cudnnBatchNormMode_t = sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;

/// (x, weight, bias) → y [n, c, h, w] (after a ReLU when `relu`); the batch mean and unbiased
/// batch variance (c each) go to `stats`.
struct BatchNormTrain {
    eps: f64,
    relu: bool,
    stats: Arc<Mutex<Option<CudaStorage>>>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("{} runs on a GPU only", self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = dims4(xl.dims())?;
        let (c, values) = (dims[1], dims.iter().product::<usize>());
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            bail!("BatchNorm: weight {:?} and bias {:?} for {c} channels", wl.dims(), bl.dims())
        }
        let (x, w, b) = (f32_values(xs, xl)?, f32_values(ws, wl)?, f32_values(bs, bl)?);
        let dev = xs.device.clone();
        let stream = dev.cuda_stream();
        // SAFETY: cuDNN writes every value of y (beta = 0).
        let mut y: CudaSlice<f32> = unsafe { dev.alloc::<f32>(values.max(1))? };
        // The statistics are written as running averages with factor 1 (old · 0 + new): they
        // must start as numbers, not whatever the memory held.
        let mut stats: CudaSlice<f32> = dev.alloc_zeros::<f32>(2 * c)?;
        let (xd, pd) = (Descriptor::nchw(dims)?, Descriptor::nchw([1, c, 1, 1])?);
        let handle = handle(&dev)?;
        let (one, zero) = (1f32, 0f32);
        {
            let (x_ptr, _g1) = x.device_ptr(&stream);
            let (w_ptr, _g2) = w.device_ptr(&stream);
            let (b_ptr, _g3) = b.device_ptr(&stream);
            let (y_ptr, _g4) = y.device_ptr_mut(&stream);
            let (s_ptr, _g5) = stats.device_ptr_mut(&stream);
            let mean = s_ptr as *mut c_void;
            let var = (s_ptr + 4 * c as u64) as *mut c_void;
            // SAFETY: the descriptors describe these contiguous f32 buffers; `stats` holds both
            // statistics at the offsets given.
            let status = unsafe {
                sys::cudnnBatchNormalizationForwardTraining(
                    handle.0,
                    SPATIAL,
                    &one as *const f32 as *const c_void,
                    &zero as *const f32 as *const c_void,
                    xd.0,
                    x_ptr as *const c_void,
                    xd.0,
                    y_ptr as *mut c_void,
                    pd.0,
                    w_ptr as *const c_void,
                    b_ptr as *const c_void,
                    1.0,
                    mean,
                    var,
                    self.eps,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            check(status.result(), "BatchNorm forward")?;
        }
        if values == c {
            // One value per channel (a batch of one at 1×1): the unbiased variance's N/(N−1)
            // would divide by zero; the CPU's rule (`model.rs`) gives the biased variance, 0.
            stream.memset_zeros(&mut stats.slice_mut(c..2 * c)).map_err(candle_core::Error::wrap)?;
        }
        if self.relu {
            super::cuda::relu_in_place(&dev, &mut y)?;
        }
        *self.stats.lock().expect("BatchNorm statistics lock") = Some(CudaStorage::wrap_cuda_slice(stats, dev.clone()));
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(dims.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, wd) = x.dims4()?;
        let values = n * c * h * wd;
        // Through the ReLU first: the gradient where its output was positive.
        let dy = if self.relu { super::layers::relu_grad(y, grad)? } else { grad.contiguous()? };
        let packed = x.apply_op3_no_bwd(&dy, w, &BatchNormGrad { eps: self.eps })?;
        let dx = packed.narrow(0, 0, values)?.reshape((n, c, h, wd))?;
        let dw = packed.narrow(0, values, c)?;
        let db = packed.narrow(0, values + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (x, dy as [n·c·h·w], weight) → [dx | d weight (c) | d bias (c)], the batch statistics
/// recomputed from x.
struct BatchNormGrad {
    eps: f64,
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("{} runs on a GPU only", self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = dims4(xl.dims())?;
        let (c, values) = (dims[1], dims.iter().product::<usize>());
        if gl.shape().elem_count() != values {
            bail!("BatchNorm gradient: {} values for an input of {dims:?}", gl.shape().elem_count())
        }
        if wl.shape().elem_count() != c {
            bail!("BatchNorm gradient: weight {:?} for {c} channels", wl.dims())
        }
        let (x, g, w) = (f32_values(xs, xl)?, f32_values(gs, gl)?, f32_values(ws, wl)?);
        let dev = xs.device.clone();
        let stream = dev.cuda_stream();
        // SAFETY: cuDNN writes every value (beta = 0 for both results).
        let mut out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(values + 2 * c)? };
        let (xd, pd) = (Descriptor::nchw(dims)?, Descriptor::nchw([1, c, 1, 1])?);
        let handle = handle(&dev)?;
        let (one, zero) = (1f32, 0f32);
        let (one, zero) = (&one as *const f32 as *const c_void, &zero as *const f32 as *const c_void);
        {
            let (x_ptr, _g1) = x.device_ptr(&stream);
            let (g_ptr, _g2) = g.device_ptr(&stream);
            let (w_ptr, _g3) = w.device_ptr(&stream);
            let (o_ptr, _g4) = out.device_ptr_mut(&stream);
            let dx = o_ptr as *mut c_void;
            let dw = (o_ptr + 4 * values as u64) as *mut c_void;
            let db = (o_ptr + 4 * (values + c) as u64) as *mut c_void;
            // SAFETY: as in the forward pass; no saved statistics, so cuDNN recomputes them.
            let status = unsafe {
                sys::cudnnBatchNormalizationBackward(
                    handle.0,
                    SPATIAL,
                    one,
                    zero,
                    one,
                    zero,
                    xd.0,
                    x_ptr as *const c_void,
                    xd.0,
                    g_ptr as *const c_void,
                    xd.0,
                    dx,
                    pd.0,
                    w_ptr as *const c_void,
                    dw,
                    db,
                    self.eps,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            check(status.result(), "BatchNorm backward")?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(values + 2 * c)))
    }
}
