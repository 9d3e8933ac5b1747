//! `layerlab-bench gaps`: where the GPU's training steps part from the CPU's, tensor by tensor,
//! with each of layerlab's GPU kernels switched off in turn (cuDNN's convolution, cuDNN's
//! BatchNorm, the optimizer's update kernel), each setting a `KernelOptions` value handed to the executor. With
//! cuDNN's convolution or BatchNorm off, the steps are candle's autograd
//! (`KernelOptions::tape_applies`).
//!
//! A measurement, not a test: the GPU test `training_steps_match_the_cpu` holds what training
//! uses (every kernel on) to 1e-4 of the CPU's weights. With a kernel off the gap is candle's, for
//! which the code justifies no bound (its convolution lets cuDNN use TF32: 7e-3 after one step and
//! 1e-1 after two, docs/performance.md); the figures say which kernel a gap comes from.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use layerlab::config::TrainConfig;
use layerlab::kernels::KernelOptions;
use layerlab::model::{Architecture, State};
use layerlab::pipeline::ComputePath;
use rand_core::RngCore;
use serde_json::{json, Value};

/// Every kernel on (what training uses), then each of cuDNN's convolution, cuDNN's BatchNorm and
/// the optimizer's update kernel off in turn.
pub const SETTINGS: [KernelOptions; 4] = {
    let on = KernelOptions {
        cudnn_conv: true,
        cudnn_batch_norm: true,
        fused_update: true,
        taped_backward: true,
        tf32: false,
    };
    [
        on,
        KernelOptions { cudnn_conv: false, ..on },
        KernelOptions { cudnn_batch_norm: false, ..on },
        KernelOptions { fused_update: false, ..on },
    ]
};

/// The tensors shown per line, worst first.
const SHOWN: usize = 6;

/// Prints one JSON line per step count and kernel setting: the network, the setting, and the
/// tensors whose weights part most from the CPU's (max |cpu − gpu| / max |cpu|). A build without
/// CUDA says so (`device::select`).
pub fn on_the_gpu(arch: &Architecture, label: &str, steps: &[u64]) -> Result<()> {
    let (gpu, description) = layerlab::device::select(layerlab::device::DeviceChoice::Cuda(0))?;
    eprintln!("computing on {description}");
    for row in measure(arch, label, &gpu, steps)? {
        println!("{row}");
    }
    Ok(())
}

/// The figures of [`on_the_gpu`] for `device` against the CPU, one row per step count and
/// setting of [`SETTINGS`].
pub fn measure(arch: &Architecture, label: &str, device: &Device, steps: &[u64]) -> Result<Vec<Value>> {
    let initial = arch.initial_state(7, &Device::Cpu)?;
    let mut rows = Vec::new();
    for &n in steps {
        let cpu = trained(arch, &initial, &Device::Cpu, n, KernelOptions::default())?;
        for kernels in SETTINGS {
            let worst = gaps(&cpu, &trained(arch, &initial, device, n, kernels)?)?;
            let shown: Vec<Value> = worst.iter().take(SHOWN).map(|(name, gap)| json!([name, gap])).collect();
            rows.push(json!({
                "workload": label, "steps": n, "cudnn_conv": kernels.cudnn_conv,
                "cudnn_batch_norm": kernels.cudnn_batch_norm, "update_kernel": kernels.fused_update,
                "largest_relative_gap": worst.first().map_or(0.0, |w| w.1), "worst_tensors": shown,
            }));
        }
    }
    Ok(rows)
}

/// `steps` SGD steps (lr 0.05, momentum 0.9, weight decay 5e-4) from `state` on `device`, each on
/// 16 random 3×32×32 images of its own, through the GPU kernels `kernels` allows; the state
/// after them, on the CPU.
fn trained(arch: &Architecture, state: &State, device: &Device, steps: u64, kernels: KernelOptions) -> Result<State> {
    let on_device = state.iter().map(|(k, v)| -> Result<(String, Tensor)> { Ok((k.clone(), v.to_device(device)?)) });
    let on_device = on_device.collect::<Result<State>>()?;
    let cfg = TrainConfig { lr: 0.05, momentum: 0.9, weight_decay: 5e-4, ..TrainConfig::default() };
    let executor = layerlab::exec::choose(arch, device, ComputePath::Fast, kernels);
    let mut trainer = executor.trainer(&on_device, layerlab::optim::from_settings(&cfg), None)?;
    let shape = [16, 3, 32, 32];
    for step in 0..steps {
        let mut rng = layerlab::random::rng(100 + step);
        let pixels: Vec<u8> = (0..shape.iter().product::<usize>()).map(|_| rng.next_u32() as u8).collect();
        let labels: Vec<u32> = (0..shape[0]).map(|_| rng.next_u32() % 10).collect();
        let at = layerlab::optim::StepAt { lr: cfg.lr, number: step + 1 };
        let (loss, _) = trainer.step(&pixels, shape, &labels, at)?;
        ensure!(loss.is_finite(), "{}: loss {loss} at step {step}", arch.name);
    }
    let on_cpu = |(k, v): (String, Tensor)| -> Result<(String, Tensor)> { Ok((k, v.to_device(&Device::Cpu)?)) };
    trainer.state()?.into_iter().map(on_cpu).collect()
}

/// Each tensor's max |a − b| / max |a|, largest first.
fn gaps(a: &State, b: &State) -> Result<Vec<(String, f64)>> {
    let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
    let mut out = Vec::new();
    for (name, x) in a {
        let y = b.get(name).ok_or_else(|| anyhow::anyhow!("{name} is missing from the device's state"))?;
        let (x, y) = (values(x)?, values(y)?);
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-12);
        let gap = x.iter().zip(&y).fold(0f64, |m, (p, q)| m.max((*p as f64 - *q as f64).abs())) / scale;
        out.push((name.clone(), gap));
    }
    out.sort_by(|p, q| q.1.total_cmp(&p.1));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU against itself the measurement runs every setting and finds no gap (training is
    /// deterministic, and the GPU kernels' options change nothing on the CPU).
    #[test]
    fn the_cpu_against_itself_has_no_gap() {
        let (arch, label) = crate::bench_arch("vgg11", 0.125).unwrap();
        let rows = measure(&arch, &label, &Device::Cpu, &[1]).unwrap();
        assert_eq!(rows.len(), SETTINGS.len());
        for (row, kernels) in rows.iter().zip(SETTINGS) {
            assert_eq!(row["largest_relative_gap"], 0.0, "{row}");
            assert_eq!(row["worst_tensors"].as_array().unwrap().len(), SHOWN, "{row}");
            assert_eq!(row["update_kernel"], kernels.fused_update, "{row}");
        }
    }

    /// Each setting but the first switches exactly one kernel off.
    #[test]
    fn each_setting_switches_one_kernel_off() {
        let on = KernelOptions::default();
        assert_eq!(SETTINGS[0], on);
        for k in &SETTINGS[1..] {
            let off = [k.cudnn_conv, k.cudnn_batch_norm, k.fused_update].iter().filter(|v| !**v).count();
            assert_eq!(off, 1, "{k:?}");
            assert_eq!((k.taped_backward, k.tf32), (on.taped_backward, on.tf32), "{k:?}");
        }
    }
}
