//! The compute device: chosen at run time (`--device auto|cpu|cuda|cuda:N`), described for stamps,
//! tables and reports.
//!
//! The device is not part of any stage key: the same experiment computed on another device is the
//! same experiment. What it ran on is recorded beside the results instead (`stamp.json`'s `device`,
//! every table's `device` metadata), so that a reader can tell runs apart.

use std::fmt;
use std::str::FromStr;

use anyhow::Result;
use candle_core::Device;

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The GPU when this binary has CUDA and a GPU is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The N-th visible NVIDIA GPU (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<DeviceChoice, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("unknown device '{s}' (devices: auto, cpu, cuda, cuda:N)")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const HAS_CUDA: bool = cfg!(feature = "cuda");

/// Lets a GPU's matrix products (cuBLAS) use TF32 (`train.tf32`), or keeps them in f32 (the
/// default). This is candle's own setting and process-wide: a stage sets it once, after choosing
/// its device and before computing. Our cuDNN convolutions take theirs from the executor's
/// [`crate::kernels::KernelOptions`]. No effect on the CPU, or in a build without CUDA.
pub fn allow_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// What the GPU's libraries say when its memory runs out: the driver's error (candle's buffers,
/// our kernels' and cuDNN's workspaces), and cuDNN's and cuBLAS's own allocation failures. A
/// host allocation failure (`..._HOST_ALLOCATION_FAILED`) is not among them.
/// (cuDNN 9's `CUDNN_STATUS_ALLOC_FAILED` is another name of the host's, and prints as it.)
const OUT_OF_GPU_MEMORY: [&str; 3] =
    ["CUDA_ERROR_OUT_OF_MEMORY", "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", "CUBLAS_STATUS_ALLOC_FAILED"];

/// Whether `e` (anywhere in its chain) is the GPU running out of memory.
pub fn is_out_of_gpu_memory(e: &anyhow::Error) -> bool {
    let said = format!("{e:#}");
    OUT_OF_GPU_MEMORY.iter().any(|code| said.contains(code))
}

/// `e` with the settings to lower said first when it is the GPU running out of memory, and
/// unchanged otherwise: the driver's code alone does not tell a user which setting asked for too
/// much. `settings`: each setting that sizes the failed work, with its value.
pub fn name_memory_settings(e: anyhow::Error, settings: &[(&str, u32)]) -> anyhow::Error {
    if !is_out_of_gpu_memory(&e) {
        return e;
    }
    let values: Vec<String> = settings.iter().map(|(name, value)| format!("{name} = {value}")).collect();
    let names: Vec<&str> = settings.iter().map(|(name, _)| *name).collect();
    e.context(format!("{} does not fit in the GPU's memory: lower {}", values.join(" or "), names.join(" or ")))
}

/// The device a choice resolves to, and a description of it.
pub fn select(choice: DeviceChoice) -> Result<(Device, String)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, describe_cpu())),
        DeviceChoice::Auto => match cuda_device(0) {
            Ok(found) => Ok(found),
            Err(why) => {
                if HAS_CUDA {
                    tracing::info!("--device auto: no usable GPU ({why:#}); computing on the CPU");
                }
                Ok((Device::Cpu, describe_cpu()))
            }
        },
        DeviceChoice::Cuda(n) => cuda_device(n),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(n: usize) -> Result<(Device, String)> {
    use anyhow::Context;
    let device = Device::new_cuda(n).with_context(|| format!("cannot open GPU cuda:{n}"))?;
    let cuda = device.as_cuda_device()?;
    // SAFETY: every op layerlab runs on a device, candle's and its own (cuDNN, the SGD kernel),
    // goes to that device's one stream, in order, so the events that let tensors be shared
    // between streams only cost time (two made per buffer, one recorded per use).
    unsafe { cuda.disable_event_tracking() };
    keep_freed_memory(cuda).with_context(|| format!("cannot set up GPU memory on cuda:{n}"))?;
    let description = describe_cuda(&device, n);
    Ok((device, description))
}

/// The stream-ordered pool candle allocates from on `cuda`'s device (the device's default
/// pool), or `None` where the device has no such pool (candle then allocates directly).
#[cfg(feature = "cuda")]
fn default_pool(cuda: &candle_core::CudaDevice) -> Result<Option<cudarc::driver::sys::CUmemoryPool>> {
    let context = cuda.cuda_stream().context().clone();
    if !context.has_async_alloc() {
        return Ok(None);
    }
    let mut pool = std::ptr::null_mut();
    // SAFETY: the context's device; the call writes one pool handle.
    unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()).result()? };
    Ok(Some(pool))
}

/// Keeps the memory that buffers free in the stream-ordered pool candle allocates from. By
/// default the pool hands it back to the driver at every synchronization (each step reads its
/// loss), so the next step's buffers would be mapped afresh.
#[cfg(feature = "cuda")]
fn keep_freed_memory(cuda: &candle_core::CudaDevice) -> Result<()> {
    use cudarc::driver::sys;
    let Some(pool) = default_pool(cuda)? else { return Ok(()) };
    let mut threshold = u64::MAX;
    let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    // SAFETY: the device's pool; the attribute takes a u64.
    unsafe {
        sys::cuMemPoolSetAttribute(pool, attribute, &mut threshold as *mut u64 as *mut std::ffi::c_void).result()?
    };
    Ok(())
}

/// Gives the memory that freed buffers left in the device's pool (kept there by
/// `keep_freed_memory`) back to the driver, once the device's queued work is done. Allocations
/// that do not come from the pool (a new cuBLAS or cuDNN handle, a module loaded, another
/// process) cannot use what the pool keeps. No effect on the CPU.
pub fn release_freed_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if let Some(pool) = default_pool(cuda)? {
            device.synchronize()?;
            // SAFETY: the device's pool, with its queued work done.
            unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool, 0).result()? };
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}

/// `cuda:N: <model>, compute X.Y, M GiB, driver CUDA a.b, cuDNN c.d.e`: what a reader needs to
/// tell results of two GPUs apart (cuDNN picks its kernels by model and version).
#[cfg(feature = "cuda")]
fn describe_cuda(device: &Device, n: usize) -> String {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let Ok(cuda) = device.as_cuda_device() else { return format!("cuda:{n}") };
    let context = cuda.cuda_stream().context().clone();
    let model = context.name().unwrap_or_else(|_| "unknown GPU".into());
    let attr = |a| context.attribute(a).unwrap_or(0);
    let (major, minor) =
        (attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR), attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR));
    let gib = context.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let mut driver = 0i32;
    // SAFETY: cuDriverGetVersion writes one int; the driver is loaded (the context exists).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
    let cudnn = cudarc::cudnn::result::get_version();
    format!(
        "cuda:{n}: {model}, compute {major}.{minor}, {gib:.0} GiB, driver CUDA {}.{}, cuDNN {}.{}.{}",
        driver / 1000,
        driver % 1000 / 10,
        cudnn / 10000,
        cudnn % 10000 / 100,
        cudnn % 100
    )
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(n: usize) -> Result<(Device, String)> {
    anyhow::bail!(
        "--device cuda:{n}: this binary was built without CUDA; build it with `--features cuda` \
         (README, \"On a GPU\")"
    )
}

/// `cpu: <model name>, N threads`, from /proc/cpuinfo where there is one.
pub fn describe_cpu() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = rayon::current_num_threads();
    format!("cpu: {model}, {threads} thread{}", if threads == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_names_the_settings_and_other_errors_pass_unchanged() {
        for code in OUT_OF_GPU_MEMORY {
            let oom = anyhow::anyhow!("cuDNN convolution: CudnnError({code})").context("training step 3");
            assert!(is_out_of_gpu_memory(&oom), "{code}");
            let said = format!("{:#}", name_memory_settings(oom, &[("train.batch_size", 4096)]));
            assert!(
                said.starts_with("train.batch_size = 4096 does not fit in the GPU's memory: lower train.batch_size:"),
                "{said}"
            );
            assert!(said.contains(code), "the driver's words are kept: {said}");
        }
        let two = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let said =
            format!("{:#}", name_memory_settings(two, &[("train.eval_batch_size", 1000), ("train.batch_size", 128)]));
        assert!(said.starts_with("train.eval_batch_size = 1000 or train.batch_size = 128 does not fit"), "{said}");
        assert!(said.contains("lower train.eval_batch_size or train.batch_size"), "{said}");
        for other in ["shape mismatch", "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"] {
            let e = anyhow::anyhow!("{other}");
            assert!(!is_out_of_gpu_memory(&e), "{other}");
            assert_eq!(format!("{:#}", name_memory_settings(e, &[("train.batch_size", 8)])), other);
        }
    }

    #[test]
    fn choices_parse_and_print_back() {
        for text in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap().to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        let err = "gpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("auto, cpu, cuda, cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn auto_falls_back_to_the_cpu_and_cuda_fails_clearly_without_a_gpu() {
        if select(DeviceChoice::Cuda(0)).is_ok() {
            // A GPU is visible: `auto` rightly picks it (the GPU tests cover that case).
            return;
        }
        let (device, description) = select(DeviceChoice::Auto).unwrap();
        assert!(device.is_cpu());
        assert!(description.starts_with("cpu: "), "{description}");
        if !HAS_CUDA {
            let err = format!("{:#}", select(DeviceChoice::Cuda(0)).unwrap_err());
            assert!(err.contains("built without CUDA") && err.contains("--features cuda"), "{err}");
        }
    }
}
