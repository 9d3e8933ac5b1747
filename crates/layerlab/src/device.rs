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
    Ok((device, format!("cuda:{n}")))
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
