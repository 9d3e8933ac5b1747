//! GPU tests: `cargo xtask test --gpu` (a `--features cuda` build). In a build without CUDA (the
//! ordinary `cargo xtask test`) the tests that need a GPU are ignored; in a build with it they
//! run, and one that cannot open a GPU fails, saying why. None passes by skipping.
//!
//! What they hold the GPU path to: the same training step as the CPU's (same initial bytes, same
//! batch, weights within 1e-4 relative), the same bytes from two GPU runs, evaluation within
//! rounding of the CPU's, and the CPU's bits from the kernels that do no arithmetic beyond
//! single roundings (batch gather, ReLU, evaluation-mode BatchNorm).
//!
//! Three need no GPU and run in CI's CUDA build: the kernels' source compiles with NVRTC, and a
//! count too large for the kernels' 32-bit indices, or a tensor too large for cuDNN, is refused.

use candle_core::{DType, Device, Tensor};
use layerlab::config::{ModelConfig, TrainConfig};
use layerlab::device::{select, DeviceChoice, HAS_CUDA};
use layerlab::kernels::pixels::Shift;
use layerlab::kernels::KernelOptions;
use layerlab::model::{Architecture, BnMode, State};
use layerlab::pipeline::{Arch, ComputePath};
use layerlab::resident::ResidentSplit;
use rand_core::RngCore;

/// The GPU, held by one test at a time: one test fills the card's memory on purpose, and a test
/// running beside it would run out. So `cargo test` needs no `--test-threads 1` to be right.
/// (Which of layerlab's GPU kernels a test uses is a `KernelOptions` value it hands to the
/// executor, not a process-wide switch.)
struct Gpu {
    device: Device,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for Gpu {
    type Target = Device;
    fn deref(&self) -> &Device {
        &self.device
    }
}

/// The GPU; a test that cannot have it fails, saying why (it was asked to run: in a build without
/// CUDA the GPU tests are ignored unless `--ignored` is given).
fn gpu(test: &str) -> Gpu {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if !HAS_CUDA {
        panic!("{test} needs a GPU and this build has no CUDA: run `cargo xtask test --gpu`");
    }
    // A test that failed while holding the GPU poisons the lock; the others still run.
    let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match select(DeviceChoice::Cuda(0)) {
        Ok((device, description)) => {
            eprintln!("{test}: on {description}");
            Gpu { device, _turn: turn }
        }
        Err(why) => panic!("{test} needs a GPU and none opens: {why:#}"),
    }
}

/// The three kinds of network, small enough for a test: FCN on 1×28×28, VGG-11-BN and ResNet-18
/// at width 1/8 on 3×32×32.
fn networks() -> Vec<(Architecture, [usize; 3])> {
    let fcn = ModelConfig { arch: Arch::Fcn, depth: 2, width: 64, ..ModelConfig::default() };
    let vgg = ModelConfig { arch: Arch::Vgg11, width_mult: 0.125, batch_norm: true, ..ModelConfig::default() };
    let resnet = ModelConfig { arch: Arch::Resnet18, width_mult: 0.125, ..ModelConfig::default() };
    vec![
        (Architecture::build(&fcn, [1, 28, 28], 10).unwrap(), [1, 28, 28]),
        (Architecture::build(&vgg, [3, 32, 32], 10).unwrap(), [3, 32, 32]),
        (Architecture::build(&resnet, [3, 32, 32], 10).unwrap(), [3, 32, 32]),
    ]
}

fn batch(n: usize, shape: [usize; 3], seed: u64) -> (Vec<u8>, Vec<u32>, [usize; 4]) {
    let mut rng = layerlab::random::rng(seed);
    let pixels = (0..n * shape.iter().product::<usize>()).map(|_| rng.next_u32() as u8).collect();
    let labels = (0..n).map(|_| rng.next_u32() % 10).collect();
    (pixels, labels, [n, shape[0], shape[1], shape[2]])
}

fn train_cfg() -> TrainConfig {
    TrainConfig { lr: 0.05, momentum: 0.9, weight_decay: 5e-4, ..TrainConfig::default() }
}

/// `steps` SGD steps from `state` on `device`; the state after them, on the CPU.
fn trained(arch: &Architecture, input: [usize; 3], state: &State, device: &Device, steps: u64) -> State {
    trained_on(arch, input, state, device, steps, ComputePath::Fast, KernelOptions::default())
}

fn trained_on(
    arch: &Architecture,
    input: [usize; 3],
    state: &State,
    device: &Device,
    steps: u64,
    path: ComputePath,
    kernels: KernelOptions,
) -> State {
    let on_device: State = state.iter().map(|(k, v)| (k.clone(), v.to_device(device).unwrap())).collect();
    let cfg = train_cfg();
    let executor = layerlab::exec::choose(arch, device, path, kernels);
    let mut trainer = executor.trainer(&on_device, layerlab::optim::from_settings(&cfg), None).unwrap();
    for step in 0..steps {
        let (pixels, labels, shape) = batch(16, input, 100 + step);
        let at = layerlab::optim::StepAt { lr: cfg.lr, number: step + 1 };
        let (loss, _) = trainer.step(&pixels, shape, &labels, at).unwrap();
        assert!(loss.is_finite(), "{}: loss {loss} at step {step}", arch.name);
    }
    trainer.state().unwrap().into_iter().map(|(k, v)| (k, v.to_device(&Device::Cpu).unwrap())).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a − b| / max |a| over one tensor.
fn relative_gap(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-12);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn training_steps_match_the_cpu() {
    let gpu = gpu("training_steps_match_the_cpu");
    for (arch, input) in networks() {
        let initial = arch.initial_state(7, &Device::Cpu).unwrap();
        let cpu = trained(&arch, input, &initial, &Device::Cpu, 2);
        let on_gpu = trained(&arch, input, &initial, &gpu, 2);
        assert_eq!(cpu.keys().collect::<Vec<_>>(), on_gpu.keys().collect::<Vec<_>>(), "{}", arch.name);
        let mut faults = Vec::new();
        for (name, c) in &cpu {
            let (c, g, start) = (values(c), values(&on_gpu[name]), values(&initial[name]));
            let weights = relative_gap(&c, &g);
            if weights > 1e-4 {
                faults.push(format!("{name}: weights differ by {weights:.2e} (relative)"));
            }
            // The updates themselves, which are small beside the weights: within 1 %.
            let dc: Vec<f32> = c.iter().zip(&start).map(|(a, b)| a - b).collect();
            let dg: Vec<f32> = g.iter().zip(&start).map(|(a, b)| a - b).collect();
            // (Below a millionth of the weights' scale a gap is rounding: a convolution's bias
            // before a BatchNorm has no gradient, only its weight decay and rounding noise.)
            let floor = 1e-6 * c.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let absolute = dc.iter().zip(&dg).fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
            if dc.iter().any(|v| *v != 0.0) && absolute > floor {
                let updates = relative_gap(&dc, &dg);
                if updates > 1e-2 {
                    faults.push(format!("{name}: updates differ by {updates:.2e} (relative)"));
                }
            }
        }
        assert!(faults.is_empty(), "{}, GPU against CPU:\n{}", arch.name, faults.join("\n"));
    }
}

/// The GPU's training steps take their gradients from `layerlab::backward` (a tape, no candle
/// graph); with it switched off they come from candle's autograd, through the same kernels. Both
/// give the same weights, value for value (a zero's sign aside), after two steps.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn the_taped_backward_pass_gives_candles_autograd_values() {
    let gpu = gpu("the_taped_backward_pass_gives_candles_autograd_values");
    for (arch, input) in networks() {
        let initial = arch.initial_state(7, &Device::Cpu).unwrap();
        let taped = trained(&arch, input, &initial, &gpu, 2);
        let no_tape = KernelOptions { taped_backward: false, ..KernelOptions::default() };
        let autograd = trained_on(&arch, input, &initial, &gpu, 2, ComputePath::Fast, no_tape);
        let differing: Vec<String> = taped
            .iter()
            .filter_map(|(name, t)| {
                let (a, b) = (values(t), values(&autograd[name]));
                let n = a.iter().zip(&b).filter(|(x, y)| x != y).count();
                (n > 0)
                    .then(|| format!("{name}: {n} of {} values (relative gap {:.1e})", a.len(), relative_gap(&b, &a)))
            })
            .collect();
        assert!(differing.is_empty(), "{}, taped against autograd:\n{}", arch.name, differing.join("\n"));
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn two_gpu_runs_give_the_same_bytes() {
    let gpu = gpu("two_gpu_runs_give_the_same_bytes");
    for (arch, input) in networks() {
        let initial = arch.initial_state(3, &Device::Cpu).unwrap();
        let first = trained(&arch, input, &initial, &gpu, 3);
        let second = trained(&arch, input, &initial, &gpu, 3);
        for (name, a) in &first {
            let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(a) == bits(&second[name]), "{} {name}: two GPU runs differ", arch.name);
        }
    }
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn evaluation_matches_the_cpu() {
    let gpu = gpu("evaluation_matches_the_cpu");
    for (arch, shape) in networks() {
        // Trained a little, so that BatchNorm's running statistics are not at their start.
        let state = trained(&arch, shape, &arch.initial_state(5, &Device::Cpu).unwrap(), &Device::Cpu, 2);
        let (pixels, _, dims) = batch(50, shape, 9);
        let forward = |device: &Device| {
            let on_device: State = state.iter().map(|(k, v)| (k.clone(), v.to_device(device).unwrap())).collect();
            let x = layerlab::model::images_to_tensor(&pixels, dims, device).unwrap();
            values(
                &arch
                    .forward(&on_device, &x, BnMode::Eval, &KernelOptions::default())
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap(),
            )
        };
        let gap = relative_gap(&forward(&Device::Cpu), &forward(&gpu));
        assert!(gap <= 1e-4, "{}: logits differ by {gap:e} (relative)", arch.name);
    }
}

/// Bits of a tensor, whatever its device.
fn bits(t: &Tensor) -> Vec<u32> {
    values(&t.to_device(&Device::Cpu).unwrap()).iter().map(|v| v.to_bits()).collect()
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn batches_gathered_on_the_gpu_are_the_cpus_bit_for_bit() {
    let gpu = gpu("batches_gathered_on_the_gpu_are_the_cpus_bit_for_bit");
    let mut rng = layerlab::random::rng(21);
    let split = layerlab::data::Split {
        images: (0..50 * 3 * 32 * 32).map(|_| rng.next_u32() as u8).collect(),
        labels: (0..50).map(|_| (rng.next_u32() % 10) as u8).collect(),
        channels: 3,
        height: 32,
        width: 32,
    };
    let held: Vec<usize> = (0..50).rev().collect();
    let positions: Vec<u32> = (0..40).map(|_| rng.next_u32() % 50).collect();
    let shifts: Vec<u32> = (0..40).map(|_| Shift::draw(&mut rng).packed()).collect();
    let gather = |device: &Device| {
        let data = ResidentSplit::upload(&split, &held, device).unwrap();
        let p = Tensor::new(positions.as_slice(), device).unwrap();
        let s = Tensor::new(shifts.as_slice(), device).unwrap();
        let (x, y) = data.batch(&p, &s).unwrap();
        (bits(&x), y.to_device(&Device::Cpu).unwrap().to_vec1::<u32>().unwrap())
    };
    let (cpu, on_gpu) = (gather(&Device::Cpu), gather(&gpu));
    assert!(cpu.0 == on_gpu.0, "the gathered images differ");
    assert_eq!(cpu.1, on_gpu.1, "the gathered labels differ");
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn relu_and_evaluation_batch_norm_kernels_give_the_cpus_bits() {
    let gpu = gpu("relu_and_evaluation_batch_norm_kernels_give_the_cpus_bits");
    let mut rng = layerlab::random::rng(22);
    let mut v: Vec<f32> = (0..4 * 6 * 5 * 5).map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 4.0 - 2.0).collect();
    v[0] = -0.0;
    v[1] = 0.0;
    let x = Tensor::from_vec(v, (4, 6, 5, 5), &Device::Cpu).unwrap();
    let scale = Tensor::new(&[0.5f32, -1.25, 2.0, 0.0, 1.0, -0.75], &Device::Cpu).unwrap();
    let shift = Tensor::new(&[0.1f32, -0.2, 0.0, 0.3, -1.0, 0.25], &Device::Cpu).unwrap();
    let on = |t: &Tensor| t.to_device(&gpu).unwrap();
    let relu = layerlab::kernels::layers::relu;
    assert!(bits(&relu(&x).unwrap()) == bits(&relu(&on(&x)).unwrap()), "ReLU forward");
    for r in [false, true] {
        let cpu = layerlab::kernels::norm::affine_no_grad(&x, &scale, &shift, r).unwrap();
        let g = layerlab::kernels::norm::affine_no_grad(&on(&x), &on(&scale), &on(&shift), r).unwrap();
        assert!(bits(&cpu) == bits(&g), "evaluation BatchNorm, relu {r}");
    }
    // The ReLU's gradient, through candle's backward pass on each device.
    let grad = |device: &Device| {
        let var = candle_core::Var::from_tensor(&x.to_device(device).unwrap()).unwrap();
        let weights = x.to_device(device).unwrap().sin().unwrap();
        let loss = (relu(var.as_tensor()).unwrap() * weights).unwrap().sum_all().unwrap();
        bits(loss.backward().unwrap().get(var.as_tensor()).unwrap())
    };
    assert!(grad(&Device::Cpu) == grad(&gpu), "ReLU gradient");
}

/// A batch of one at a 1×1 BatchNorm (one value per channel): the batch statistics are the values
/// and a variance of 0, as the CPU's rule gives (cuDNN's unbiased variance divides by N − 1 = 0),
/// and the output is the bias.
#[cfg(feature = "cuda")]
#[test]
fn batch_norm_over_one_value_per_channel_has_a_variance_of_zero() {
    let gpu = gpu("batch_norm_over_one_value_per_channel_has_a_variance_of_zero");
    let channels = |v: [f32; 3]| Tensor::new(&v, &gpu).unwrap();
    let x = channels([0.5, -1.25, 2.0]).reshape((1, 3, 1, 1)).unwrap();
    let (weight, bias) = (channels([1.5, 0.5, 2.0]), channels([0.25, -0.75, 1.0]));
    let (y, stats, _) = layerlab::kernels::cudnn::batch_norm_train(&x, &weight, &bias, 1e-5, false).unwrap();
    assert_eq!(stats.to_vec1::<f32>().unwrap(), [0.5, -1.25, 2.0, 0.0, 0.0, 0.0]);
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.25, -0.75, 1.0]);
}

/// The one-launch SGD update of 40 tensors (two launches of the kernel's 32), Nesterov and weight
/// decay on, against candle's ops on the CPU: the same bits.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn the_sgd_kernel_updates_every_tensor_as_the_cpu_does() {
    let gpu = gpu("the_sgd_kernel_updates_every_tensor_as_the_cpu_does");
    let mut rng = layerlab::random::rng(23);
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_u32() as f32 / u32::MAX as f32 - 0.5).collect() };
    let sizes: Vec<usize> = (0..40).map(|k| 1 + k * 37 % 3001).collect();
    // (name, parameter, momentum, gradient) of each tensor.
    type Values = (String, Vec<f32>, Vec<f32>, Vec<f32>);
    let tensors: Vec<Values> =
        sizes.iter().enumerate().map(|(k, &n)| (format!("t{k}"), random(n), random(n), random(n))).collect();
    let sgd = layerlab::optim::Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: true };
    let update = |device: &Device| {
        let t = |v: &Vec<f32>| Tensor::from_vec(v.clone(), v.len(), device).unwrap();
        let vars: Vec<candle_core::Var> =
            tensors.iter().map(|(_, p, _, _)| candle_core::Var::from_tensor(&t(p)).unwrap()).collect();
        let grads: Vec<Tensor> = tensors.iter().map(|(_, _, _, g)| t(g)).collect();
        let key = |name: &str| layerlab::optim::state_key("momentum", name);
        let mut momentum = tensors.iter().map(|(name, _, m, _)| (key(name), t(m).copy().unwrap())).collect();
        let updates: Vec<(&str, &candle_core::Var, &Tensor)> =
            tensors.iter().zip(&vars).zip(&grads).map(|(((name, ..), v), g)| (name.as_str(), v, g)).collect();
        let at = layerlab::optim::StepAt { lr: 0.05, number: 1 };
        layerlab::optim::Optimizer::update_vars(&sgd, at, &updates, &mut momentum, &KernelOptions::default()).unwrap();
        let p: Vec<Vec<u32>> = vars.iter().map(|v| bits(v.as_tensor())).collect();
        let m: Vec<Vec<u32>> = tensors.iter().map(|(name, ..)| bits(&momentum[&key(name)])).collect();
        (p, m)
    };
    let (cpu, on_gpu) = (update(&Device::Cpu), update(&gpu));
    for (k, n) in sizes.iter().enumerate() {
        assert!(cpu.0[k] == on_gpu.0[k], "tensor {k} ({n} values): parameters differ");
        assert!(cpu.1[k] == on_gpu.1[k], "tensor {k}: momentum buffers differ");
    }
}

/// The Adam kernel (AdamW's decoupled decay included) updates 40 tensors of assorted sizes as the
/// CPU's update does, bit for bit, over two steps.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn the_adam_kernel_updates_every_tensor_as_the_cpu_does() {
    let gpu = gpu("the_adam_kernel_updates_every_tensor_as_the_cpu_does");
    let mut rng = layerlab::random::rng(29);
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_u32() as f32 / u32::MAX as f32 - 0.5).collect() };
    let sizes: Vec<usize> = (0..40).map(|k| 1 + k * 37 % 3001).collect();
    type Values = (String, Vec<f32>, Vec<Vec<f32>>);
    let tensors: Vec<Values> =
        sizes.iter().enumerate().map(|(k, &n)| (format!("t{k}"), random(n), vec![random(n), random(n)])).collect();
    for decoupled in [false, true] {
        let adam = layerlab::optim::Adam { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 1e-2, decoupled };
        let update = |device: &Device| {
            let t = |v: &Vec<f32>| Tensor::from_vec(v.clone(), v.len(), device).unwrap();
            let vars: Vec<candle_core::Var> =
                tensors.iter().map(|(_, p, _)| candle_core::Var::from_tensor(&t(p)).unwrap()).collect();
            let key = |b: &str, name: &str| layerlab::optim::state_key(b, name);
            let mut state = layerlab::optim::OptimizerState::new();
            for (name, p, _) in &tensors {
                state.insert(key("exp_avg", name), t(&vec![0.0; p.len()]).copy().unwrap());
                state.insert(key("exp_avg_sq", name), t(&vec![0.0; p.len()]).copy().unwrap());
            }
            for (number, grads) in [(1u64, 0usize), (2, 1)] {
                let grads: Vec<Tensor> = tensors.iter().map(|(_, _, g)| t(&g[grads])).collect();
                let updates: Vec<(&str, &candle_core::Var, &Tensor)> =
                    tensors.iter().zip(&vars).zip(&grads).map(|(((name, ..), v), g)| (name.as_str(), v, g)).collect();
                let at = layerlab::optim::StepAt { lr: 0.01, number };
                layerlab::optim::Optimizer::update_vars(&adam, at, &updates, &mut state, &KernelOptions::default())
                    .unwrap();
            }
            let p: Vec<Vec<u32>> = vars.iter().map(|v| bits(v.as_tensor())).collect();
            let buffers: Vec<Vec<u32>> = tensors
                .iter()
                .flat_map(|(name, ..)| [bits(&state[&key("exp_avg", name)]), bits(&state[&key("exp_avg_sq", name)])])
                .collect();
            (p, buffers)
        };
        let (cpu, on_gpu) = (update(&Device::Cpu), update(&gpu));
        assert!(cpu.0 == on_gpu.0, "decoupled {decoupled}: parameters differ");
        assert!(cpu.1 == on_gpu.1, "decoupled {decoupled}: buffers differ");
    }
}

/// layerlab's CUDA source compiles with NVRTC as it does at run time on a GPU, and the PTX has
/// an entry for every kernel in the source. NVRTC is a compiler library, so this needs no GPU:
/// CI runs this test alone, with the toolkit's libraries on `LD_LIBRARY_PATH` (`.ci/run`);
/// `nvcc` alone is a different compiler, with the toolkit's headers included.
#[cfg(feature = "cuda")]
#[test]
fn the_cuda_kernels_compile_with_nvrtc() {
    use layerlab::kernels::cuda;
    let ptx = cuda::ptx().unwrap();
    let kernels: Vec<&str> =
        cuda::SOURCE.split("__global__ void ").skip(1).map(|rest| rest.split('(').next().unwrap().trim()).collect();
    assert!(kernels.len() >= 10, "found only {kernels:?} in the source");
    for name in &kernels {
        assert!(ptx.contains(&format!(".entry {name}(")), "no PTX entry for kernel {name}");
    }
    eprintln!("NVRTC compiled {} kernels: {}", kernels.len(), kernels.join(", "));
}

/// A kernel's count past what 32-bit indices reach is an error naming the setting to lower, not a
/// count that wraps and leaves most of a tensor unwritten. Needs no GPU either.
#[cfg(feature = "cuda")]
#[test]
fn kernel_counts_past_32_bits_are_refused() {
    use layerlab::kernels::cuda::{launch_count, MAX_VALUES};
    assert_eq!(launch_count(MAX_VALUES).unwrap() as usize, MAX_VALUES);
    for too_many in [MAX_VALUES + 1, 1 << 32, (1 << 32) + 5] {
        let said = launch_count(too_many).unwrap_err().to_string();
        assert!(said.contains(&too_many.to_string()) && said.contains("train.batch_size"), "{said}");
    }
}

/// A tensor past what cuDNN's descriptors take (2^31 − 1 values) is an error naming the settings
/// to lower, not cuDNN's `NOT_SUPPORTED`. Needs no GPU.
#[cfg(feature = "cuda")]
#[test]
fn tensors_past_what_cudnn_takes_are_refused() {
    use layerlab::kernels::cudnn::{descriptor_dims, MAX_TENSOR_VALUES};
    // VGG-11's first activation at width 1 on 32×32 images, 65,536 values an image.
    assert_eq!(descriptor_dims([32_767, 64, 32, 32]).unwrap(), [32_767, 64, 32, 32]);
    assert_eq!(descriptor_dims([MAX_TENSOR_VALUES, 1, 1, 1]).unwrap(), [i32::MAX, 1, 1, 1]);
    let past = [[32_768, 64, 32, 32], [MAX_TENSOR_VALUES + 1, 1, 1, 1], [usize::MAX / 2, 4, 1, 1], [0, 1 << 40, 1, 1]];
    for too_many in past {
        let said = descriptor_dims(too_many).unwrap_err().to_string();
        assert!(said.contains(&format!("{too_many:?}")) && said.contains("train.batch_size"), "{said}");
    }
}

/// Buffers that fill the GPU's memory, handed back to the driver when dropped (also when a test
/// fails while holding them), so that the tests after it find the card as it was.
struct Ballast<'a> {
    buffers: Vec<Tensor>,
    device: &'a Device,
}

impl<'a> Ballast<'a> {
    /// 1 GiB buffers until the driver refuses one, which must read as the GPU out of memory.
    fn fill(device: &'a Device) -> Ballast<'a> {
        let mut ballast = Ballast { buffers: Vec::new(), device };
        let refused = loop {
            match Tensor::zeros(1usize << 30, DType::U8, device) {
                Ok(buffer) => ballast.buffers.push(buffer),
                Err(e) => break anyhow::Error::from(e),
            }
            assert!(ballast.buffers.len() < 4096, "4 TiB allocated without a refusal");
        };
        assert!(layerlab::device::is_out_of_gpu_memory(&refused), "not read as out of memory: {refused:#}");
        ballast
    }
}

impl Drop for Ballast<'_> {
    fn drop(&mut self) {
        self.buffers.clear();
        layerlab::device::release_freed_memory(self.device).unwrap();
    }
}

/// A training batch too large for the GPU's memory stops `train` with an error naming
/// `train.batch_size`, keeps what was already written (the initial checkpoint), and leaves the
/// GPU usable: a run after it gives the bytes of the same run made before it. The card is first
/// filled with 1 GiB buffers until the driver refuses one, and one is given back: under 2 GiB is
/// then free, whatever the card's size, and the step's first activation (VGG-11-BN at width 1,
/// 16,384 images of 32×32) is 4 GiB. The epoch-0 evaluation before it needs about 100 MB.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn a_batch_too_large_for_the_gpus_memory_names_the_setting() {
    use layerlab::data::Split;
    use layerlab::train::{run, TrainJob};
    let test = "a_batch_too_large_for_the_gpus_memory_names_the_setting";
    let gpu = gpu(test);
    let model = ModelConfig { arch: Arch::Vgg11, width_mult: 1.0, batch_norm: true, ..ModelConfig::default() };
    let arch = Architecture::build(&model, [3, 32, 32], 10).unwrap();
    let split = |n: usize, seed: u64| {
        let (images, labels, _) = batch(n, [3, 32, 32], seed);
        Split { images, labels: labels.into_iter().map(|l| l as u8).collect(), channels: 3, height: 32, width: 32 }
    };
    let (train, test_split) = (split(16384, 1), split(256, 2));
    let train_run = |batch_size: u32, train_examples: u32, out: &std::path::Path| {
        let cfg = TrainConfig {
            epochs: 1,
            batch_size,
            eval_batch_size: 256,
            train_examples: Some(train_examples),
            checkpoints: vec![0, 1],
            ..train_cfg()
        };
        let job = TrainJob {
            experiment: "oom",
            seed: 3,
            arch: &arch,
            cfg: &cfg,
            train: &train,
            test: &test_split,
            out_dir: out,
            key: "k",
            config_hash: "h",
            checkpoint_epochs: &[0, 1],
            table_metadata: Vec::new(),
            device: &gpu,
        };
        run(&job, arch.initial_state(3, &gpu).unwrap())
    };
    let checkpoint = |out: &std::path::Path, epoch: u32| {
        std::fs::read(layerlab::paths::checkpoint_in(&out.join("checkpoints"), epoch)).unwrap()
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // Before: a small run, which also loads every kernel the larger run's evaluation and first
    // step use (a module loaded later would need memory from outside the pool).
    train_run(64, 512, dirs[0].path()).unwrap();

    let mut ballast = Ballast::fill(&gpu);
    let filled = ballast.buffers.len();
    ballast.buffers.pop();
    let too_large = train_run(16384, 16384, dirs[1].path());
    drop(ballast);

    let said = format!("{:#}", too_large.expect_err("a step of 16,384 images in under 2 GiB"));
    eprintln!("{test}: {filled} GiB filled, one given back; train said: {said}");
    assert!(
        said.contains("train.batch_size = 16384 does not fit in the GPU's memory: lower train.batch_size"),
        "{said}"
    );
    assert!(!checkpoint(dirs[1].path(), 0).is_empty(), "the initial checkpoint is kept");

    // After: the small run again, to the same bytes.
    train_run(64, 512, dirs[2].path()).unwrap();
    assert!(checkpoint(dirs[0].path(), 1) == checkpoint(dirs[2].path(), 1), "the run after the refusal differs");
}

#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "needs a GPU: a build with CUDA (cargo xtask test --gpu)")]
fn auto_picks_the_gpu() {
    let _gpu = gpu("auto_picks_the_gpu");
    let (device, description) = select(DeviceChoice::Auto).unwrap();
    assert!(device.is_cuda(), "auto chose {description} with a GPU visible");
    assert!(description.starts_with("cuda:0"), "{description}");
}
