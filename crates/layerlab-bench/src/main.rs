//! `layerlab-bench`: layerlab's side of `cargo xtask bench` for what the stage binaries do not
//! time by themselves (CNN training and inference steps), the FLOP counts of the benchmarked
//! networks, the per-epoch training rate read from a `history.parquet`, and the bench table.
//!
//! Every figure is printed as one JSON object per line, in the same form as
//! `bench/pytorch_bench.py` prints PyTorch's:
//! `{"workload", "figure", "value", "unit", "flops", "peak_rss_mb"}`.

mod gaps;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use layerlab::config::ModelConfig;
use layerlab::kernels::{conv2d, conv2d_grad_input, conv2d_grad_weight, KernelOptions};

use layerlab::cnn::{Activations, CnnForward};
use layerlab::exec::Trainer;
use layerlab::model::{push_scaled_pixels, Architecture, Layer};
use layerlab::optim::{Sgd, StepAt};
use layerlab::table::{Column, ReadTable, Table};
use rand_core::RngCore;
use serde_json::{json, Value};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "layerlab-bench", about = "layerlab's side of `cargo xtask bench`")]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Training and inference throughput of a CNN on synthetic 32×32×3 images.
    Cnn {
        /// vgg11 (with BatchNorm), resnet18 or resnet50.
        #[arg(long)]
        arch: String,
        #[arg(long, default_value_t = 0.25)]
        width_mult: f64,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 500)]
        eval_batch: usize,
        /// Steps per timed repeat.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Where to compute: cpu, cuda or cuda:N (a GPU needs a binary built with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: layerlab::device::DeviceChoice,
        /// On a GPU, take each training step's gradients from candle's autograd instead of
        /// layerlab's tape (`layerlab::backward`): what the tape saves, measured, and a way on if
        /// the tape fails on a GPU.
        #[arg(long)]
        autograd: bool,
    },
    /// Milliseconds of each convolution's forward pass, input gradient and weight gradient, then
    /// of a whole training step (`bench/pytorch_bench.py profile` prints PyTorch's), then of each
    /// kind of layer inside whole steps, forward and backward.
    Profile {
        #[arg(long, default_value = "vgg11")]
        arch: String,
        #[arg(long, default_value_t = 0.25)]
        width_mult: f64,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Where to compute: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: layerlab::device::DeviceChoice,
    },
    /// Every cuDNN algorithm for each convolution of a network, timed (a `--features cuda`
    /// build on a GPU): the data behind the algorithm rule in `kernels/cudnn.rs`.
    Cudnn {
        #[arg(long, default_value = "vgg11")]
        arch: String,
        #[arg(long, default_value_t = 1.0)]
        width_mult: f64,
        #[arg(long, default_value_t = 128)]
        batch: usize,
    },
    /// Where the GPU's training steps part from the CPU's, tensor by tensor, with each of
    /// layerlab's GPU kernels on and off (a `--features cuda` build on a GPU): one JSON line per
    /// step count and setting.
    Gaps {
        #[arg(long, default_value = "vgg11")]
        arch: String,
        #[arg(long, default_value_t = 0.125)]
        width_mult: f64,
        /// Training steps from the same initial weights, a list (`--steps 1,2`).
        #[arg(long, value_delimiter = ',', default_values_t = [1, 2])]
        steps: Vec<u64>,
    },
    /// The median per-epoch training rate of a finished run, from its history.parquet.
    History {
        path: PathBuf,
        /// Training examples per epoch.
        #[arg(long)]
        examples: usize,
        /// The workload name to print.
        #[arg(long, default_value = "fcn-mnist")]
        workload: String,
    },
    /// FLOPs of one example through the FCN 784-256×3-10 (forward; training).
    FcnFlops,
    /// The f32 FLOP rate this machine reaches on `threads` cores with nothing but independent
    /// fused multiply-adds in registers: the peak that bench percentages are taken of.
    Peak {
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Writes the bench table (JSON lines on stdin) to a Parquet file.
    Table {
        out: PathBuf,
        #[arg(long)]
        revision: String,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        date: String,
    },
}

fn main() -> std::process::ExitCode {
    layerlab::stages::cli::keep_freed_memory();
    match run(Flags::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(flags: Flags) -> Result<()> {
    match flags.command {
        Command::Cnn { arch, width_mult, batch, eval_batch, steps, repeats, device, autograd } => {
            let (device, description) = layerlab::device::select(device)?;
            eprintln!("computing on {description}");
            let mut kernels = KernelOptions::default();
            if autograd {
                if !device.is_cuda() {
                    bail!("--autograd is for a GPU: the CPU trains on its fast path")
                }
                kernels.taped_backward = false;
                eprintln!("training steps through candle's autograd, not layerlab's tape");
            }
            cnn(&arch, width_mult, batch, eval_batch, steps, repeats, (&device, kernels))
        }
        Command::Profile { arch, width_mult, batch, repeats, device } => {
            let (device, description) = layerlab::device::select(device)?;
            eprintln!("computing on {description}");
            profile(&arch, width_mult, batch, repeats, &device)
        }
        Command::Cudnn { arch, width_mult, batch } => cudnn_survey(&arch, width_mult, batch),
        Command::Gaps { arch, width_mult, steps } => {
            let (arch, label) = bench_arch(&arch, width_mult)?;
            gaps::on_the_gpu(&arch, &label, &steps)
        }
        Command::History { path, examples, workload } => history(&path, examples, &workload),
        Command::Peak { threads } => {
            let (gflops, isa) = peak::measure(threads);
            println!("{}", json!({"threads": threads, "gflops": gflops, "isa": isa}));
            Ok(())
        }
        Command::FcnFlops => {
            let a = fcn()?;
            println!("{}", json!({"forward": forward_flops(&a)?, "train": train_flops(&a)?}));
            Ok(())
        }
        Command::Table { out, revision, machine, date } => table(&out, &revision, &machine, &date),
    }
}

/// Peak resident memory of this process so far, in MB (Linux; 0 elsewhere).
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn emit(workload: &str, figure: &str, value: f64, unit: &str, flops: Option<u64>) {
    println!(
        "{}",
        json!({"workload": workload, "figure": figure, "value": value, "unit": unit, "flops": flops,
               "peak_rss_mb": peak_rss_mb()})
    );
}

fn fcn() -> Result<Architecture> {
    let cfg = ModelConfig { arch: layerlab::pipeline::Arch::Fcn, depth: 3, width: 256, ..ModelConfig::default() };
    Architecture::build(&cfg, [1, 28, 28], 10)
}

/// One convolution or Linear layer met on the forward pass, with the shape entering it.
struct ProductLayer {
    name: String,
    /// [channels, height, width] of one example entering the layer.
    input: [usize; 3],
    /// The weight's shape: [out, in, k, k] or [out, in].
    weight: Vec<usize>,
    stride: usize,
    padding: usize,
    /// 2 × multiply-adds for one example.
    flops: u64,
}

/// Every convolution and Linear layer in forward order (a residual block's shortcut first).
fn product_layers(arch: &Architecture) -> Result<Vec<ProductLayer>> {
    fn walk(arch: &Architecture, layers: &[Layer], shape: &mut [usize; 3], out: &mut Vec<ProductLayer>) -> Result<()> {
        let dims = |name: &str| -> Result<Vec<usize>> {
            Ok(arch.spec(&format!("{name}.weight")).context("weight spec")?.shape.clone())
        };
        for layer in layers {
            match layer {
                Layer::Pad(p) => {
                    shape[1] += 2 * p;
                    shape[2] += 2 * p;
                }
                Layer::Flatten => *shape = [shape.iter().product(), 1, 1],
                Layer::Linear { name } => {
                    let w = dims(name)?;
                    let flops = 2 * (w[0] * w[1]) as u64;
                    out.push(ProductLayer {
                        name: name.clone(),
                        input: *shape,
                        weight: w.clone(),
                        stride: 1,
                        padding: 0,
                        flops,
                    });
                    *shape = [w[0], 1, 1];
                }
                Layer::Conv { name, stride, padding, .. } => {
                    let w = dims(name)?;
                    let input = *shape;
                    let size = |s: usize| (s + 2 * padding - w[2]) / stride + 1;
                    *shape = [w[0], size(shape[1]), size(shape[2])];
                    let flops = 2 * (shape.iter().product::<usize>() * w[1] * w[2] * w[3]) as u64;
                    out.push(ProductLayer {
                        name: name.clone(),
                        input,
                        weight: w,
                        stride: *stride,
                        padding: *padding,
                        flops,
                    });
                }
                Layer::MaxPool2 => *shape = [shape[0], shape[1] / 2, shape[2] / 2],
                Layer::GlobalAvgPool => *shape = [shape[0], 1, 1],
                Layer::BatchNorm { .. } | Layer::Relu => {}
                Layer::Residual { main, shortcut } => {
                    let mut s = *shape;
                    walk(arch, shortcut, &mut s, out)?;
                    walk(arch, main, shape, out)?;
                }
            }
        }
        Ok(())
    }
    let mut shape = arch.input;
    let mut out = Vec::new();
    walk(arch, &arch.layers, &mut shape, &mut out)?;
    Ok(out)
}

/// Multiply-adds × 2 of every convolution and Linear layer for one example.
fn forward_flops(arch: &Architecture) -> Result<u64> {
    Ok(product_layers(arch)?.iter().map(|l| l.flops).sum())
}

/// Forward, weight gradients, and input gradients of every layer but the first (whose input
/// gradient nobody needs).
fn train_flops(arch: &Architecture) -> Result<u64> {
    let layers = product_layers(arch)?;
    let fwd: u64 = layers.iter().map(|l| l.flops).sum();
    Ok(3 * fwd - layers.first().map_or(0, |l| l.flops))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median seconds of `repeats` calls of `f` after one warm-up call.
fn timed(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// A benchmarked network on 32×32×3 images and its label in the bench table.
fn bench_arch(arch_name: &str, width_mult: f64) -> Result<(Architecture, String)> {
    let (cfg, label) = match arch_name {
        "vgg11" => (
            ModelConfig {
                arch: layerlab::pipeline::Arch::Vgg11,
                width_mult,
                batch_norm: true,
                ..ModelConfig::default()
            },
            format!("vgg11-bn-w{width_mult}"),
        ),
        "resnet18" => (
            ModelConfig { arch: layerlab::pipeline::Arch::Resnet18, width_mult, ..ModelConfig::default() },
            format!("resnet18-w{width_mult}"),
        ),
        "resnet50" => (
            ModelConfig { arch: layerlab::pipeline::Arch::Resnet50, width_mult, ..ModelConfig::default() },
            format!("resnet50-w{width_mult}"),
        ),
        other => bail!("unknown bench architecture '{other}' (vgg11, resnet18 or resnet50)"),
    };
    Ok((Architecture::build(&cfg, [3, 32, 32], 10)?, label))
}

/// Seconds of `steps` training steps at `batch` on random images (median of `repeats`), and the
/// trainer that ran them.
fn train_step_seconds(
    arch: &Architecture,
    batch: usize,
    steps: usize,
    repeats: usize,
    dev: &Device,
    kernels: KernelOptions,
) -> Result<(f64, Box<dyn Trainer>)> {
    let state = arch.initial_state(0, dev)?;
    let executor = layerlab::exec::choose(arch, dev, layerlab::pipeline::ComputePath::Fast, kernels);
    let sgd = Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    let mut trainer = executor.trainer(&state, Box::new(sgd), None)?;
    let t = timed(repeats, || {
        train_steps(trainer.as_mut(), batch, steps, dev)?;
        // A GPU queues work: the time counts once it is done.
        Ok(dev.synchronize()?)
    })?;
    Ok((t, trainer))
}

/// `steps` SGD steps (momentum 0.9, weight decay 5e-4) on one fixed batch of random images.
/// The candle path (a GPU) gets the batch on its device once and reads the loss after the last
/// step only, as `train` does with its resident dataset (and PyTorch's side of the bench).
fn train_steps(trainer: &mut dyn Trainer, batch: usize, steps: usize, dev: &Device) -> Result<()> {
    let at = StepAt { lr: 0.01, number: 1 };
    let mut rng = layerlab::random::rng(1);
    let pixels: Vec<u8> = (0..batch * 3 * 32 * 32).map(|_| rng.next_u32() as u8).collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.next_u32() % 10).collect();
    if trainer.steps_on_device() {
        let x = layerlab::model::images_to_tensor(&pixels, [batch, 3, 32, 32], dev)?;
        let y = Tensor::from_vec(labels, batch, dev)?;
        let mut last = None;
        for _ in 0..steps {
            last = Some(trainer.step_on_device(&x, &y, at)?.0);
        }
        if let Some(loss) = last {
            let loss = loss.to_scalar::<f32>()?;
            if !loss.is_finite() {
                bail!("loss became {loss}");
            }
        }
        return Ok(());
    }
    for _ in 0..steps {
        let (loss, _) = trainer.step(&pixels, [batch, 3, 32, 32], &labels, at)?;
        if !loss.is_finite() {
            bail!("loss became {loss}");
        }
    }
    Ok(())
}

/// Milliseconds of each convolution's three passes at `batch`, each timed alone, then of a whole
/// training step, then per step of each kind of layer inside whole steps: layerlab's side of the
/// per-layer tables in docs/performance.md.
fn profile(arch_name: &str, width_mult: f64, batch: usize, repeats: usize, dev: &Device) -> Result<()> {
    let (arch, _) = bench_arch(arch_name, width_mult)?;
    let (dev, kernels) = (dev.clone(), KernelOptions::default());
    let state = arch.initial_state(0, &dev)?;
    let mut seed = 0;
    let mut random = |shape: &[usize]| -> Result<Tensor> {
        seed += 1;
        let mut rng = layerlab::random::rng(seed);
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|_| layerlab::random::unit_f64(&mut rng) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    for l in product_layers(&arch)? {
        if l.weight.len() != 4 {
            continue;
        }
        let [c, h, w] = l.input;
        let x = random(&[batch, c, h, w])?;
        let weight = state.get(&format!("{}.weight", l.name)).context("weight")?.clone();
        let y = conv2d(&x, &weight, l.padding, l.stride, &kernels)?;
        let grad = random(y.dims())?;
        let k = l.weight[2];
        for pass in ["forward", "input grad", "weight grad"] {
            let run = || match pass {
                "forward" => conv2d(&x, &weight, l.padding, l.stride, &kernels),
                "input grad" => conv2d_grad_input(&grad, &weight, l.padding, l.stride, (h, w), &kernels),
                _ => conv2d_grad_weight(&x, &grad, l.padding, l.stride, k, &kernels),
            };
            let ms = 1e3 * timed(repeats * 4, || run().map(drop).and_then(|()| Ok(dev.synchronize()?)))?;
            println!(
                "{}",
                json!({"layer": l.name, "shape": [batch, c, h, w], "out_channels": l.weight[0], "pass": pass, "ms": ms})
            );
        }
    }
    let (t, mut trainer) = train_step_seconds(&arch, batch, 1, repeats * 4, &dev, kernels)?;
    println!("{}", json!({"layer": "whole step", "pass": "train", "ms": 1e3 * t}));
    // Then where a whole step's time goes, by kind of layer, over as many more steps.
    trainer.time_layers();
    train_steps(trainer.as_mut(), batch, repeats * 4, &dev)?;
    if let Some(times) = trainer.layer_times() {
        for ((kind, pass), seconds) in &times.seconds {
            let ms = 1e3 * seconds / times.steps.max(1) as f64;
            println!("{}", json!({"layer": kind, "pass": format!("{pass}, in a step"), "ms": ms}));
        }
    }
    Ok(())
}

fn cnn(
    arch_name: &str,
    width_mult: f64,
    batch: usize,
    eval_batch: usize,
    steps: usize,
    repeats: usize,
    (dev, kernels): (&Device, KernelOptions),
) -> Result<()> {
    let (arch, label) = bench_arch(arch_name, width_mult)?;
    // A GPU's steps through candle's autograd (`--autograd`) are another workload than the tape's.
    let taped = layerlab::backward::used_on(dev, &kernels);
    let label = if dev.is_cuda() && !taped { format!("{label}-autograd") } else { label };
    let (t, trainer) = train_step_seconds(&arch, batch, steps, repeats, dev, kernels)?;
    emit(&label, "train throughput", (batch * steps) as f64 / t, "images/s", Some(train_flops(&arch)?));

    let trained = trainer.state()?;
    let mut rng = layerlab::random::rng(2);
    let eval_pixels: Vec<u8> = (0..eval_batch * 3 * 32 * 32).map(|_| rng.next_u32() as u8).collect();
    if !dev.is_cpu() {
        // The forward pass evaluation and reset-eval take on a GPU, predictions back on the host.
        let x = layerlab::model::images_to_tensor(&eval_pixels, [eval_batch, 3, 32, 32], dev)?;
        // Prepared once, as evaluation and the reset grid prepare each state they evaluate.
        let prepared = arch.for_evaluation(&trained)?;
        let t = timed(repeats, || {
            for _ in 0..steps {
                let logits = arch.forward(&prepared, &x, layerlab::model::BnMode::Eval, &kernels)?;
                let predicted = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
                std::hint::black_box(predicted.len());
            }
            Ok(())
        })?;
        let flops = Some(forward_flops(&arch)?);
        emit(&label, "inference throughput", (eval_batch * steps) as f64 / t, "images/s", flops);
        return Ok(());
    }
    // The forward pass evaluation and reset-eval take (the host's convolutional executor), predictions included.
    let net = CnnForward::new(&arch, &trained)?;
    let mut x = Vec::new();
    push_scaled_pixels(&eval_pixels, &mut x);
    let x = Activations::input(x, [eval_batch, 3, 32, 32])?;
    let t = timed(repeats, || {
        for _ in 0..steps {
            let logits = net.run(&x, 0, arch.layers.len())?;
            let classes = logits.values().len() / eval_batch;
            let predicted = logits
                .values()
                .chunks_exact(classes)
                .map(|row| row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best }));
            std::hint::black_box(predicted.sum::<usize>());
        }
        Ok(())
    })?;
    emit(&label, "inference throughput", (eval_batch * steps) as f64 / t, "images/s", Some(forward_flops(&arch)?));
    Ok(())
}

#[cfg(feature = "cuda")]
fn cudnn_survey(arch_name: &str, width_mult: f64, batch: usize) -> Result<()> {
    let (arch, _) = bench_arch(arch_name, width_mult)?;
    let (dev, description) = layerlab::device::select(layerlab::device::DeviceChoice::Cuda(0))?;
    eprintln!("computing on {description}");
    let mut seen = std::collections::BTreeSet::new();
    for l in product_layers(&arch)? {
        if l.weight.len() != 4 {
            continue;
        }
        let [c, h, w] = l.input;
        let x = [batch, c, h, w];
        let wt = [l.weight[0], l.weight[1], l.weight[2], l.weight[3]];
        if seen.insert((x, wt, l.padding, l.stride)) {
            for line in layerlab::kernels::cudnn::survey(&dev, x, wt, l.padding, l.stride)? {
                println!("{line}");
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cudnn_survey(_: &str, _: f64, _: usize) -> Result<()> {
    bail!("this layerlab-bench was built without CUDA (--features cuda)")
}

fn history(path: &std::path::Path, examples: usize, workload: &str) -> Result<()> {
    let t = ReadTable::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let secs: Vec<f64> = t
        .floats("train_seconds")
        .with_context(|| format!("{} has no train_seconds column", path.display()))?
        .into_iter()
        .flatten()
        .collect();
    if secs.is_empty() {
        bail!("{} holds no trained epoch", path.display());
    }
    // The first epoch is the warm-up when there are others.
    let timed = if secs.len() > 1 { secs[1..].to_vec() } else { secs };
    let rates: Vec<f64> = timed.iter().map(|s| examples as f64 / s).collect();
    let a = fcn()?;
    emit(workload, "train throughput", median(rates), "examples/s", Some(train_flops(&a)?));
    Ok(())
}

fn table(out: &std::path::Path, revision: &str, machine: &str, date: &str) -> Result<()> {
    let mut rows: Vec<Value> = Vec::new();
    for line in std::io::stdin().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        rows.push(serde_json::from_str(&line).with_context(|| format!("bad bench row: {line}"))?);
    }
    let n = rows.len();
    let text = |k: &str| Column::Text(rows.iter().map(|r| r[k].as_str().map(String::from)).collect());
    let float = |k: &str| Column::Float(rows.iter().map(|r| r[k].as_f64()).collect());
    Table::new()
        .col("date", Column::Text(vec![Some(date.to_string()); n]))
        .col("git_revision", Column::Text(vec![Some(revision.to_string()); n]))
        .col("machine", Column::Text(vec![Some(machine.to_string()); n]))
        .col("workload", text("workload"))
        .col("figure", text("figure"))
        .col("side", text("side"))
        .col("value", float("value"))
        .col("unit", text("unit"))
        .nullable("threads", Column::Int(rows.iter().map(|r| r["threads"].as_i64()).collect()))
        .nullable("ratio", float("ratio"))
        .nullable("target", text("target"))
        .nullable("gflops", float("gflops"))
        .nullable("peak_gflops", float("peak_gflops"))
        .nullable("peak_rss_mb", float("peak_rss_mb"))
        .write(out, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fcn_flops_by_hand() {
        let a = fcn().unwrap();
        let macs = 784 * 256 + 256 * 256 * 2 + 256 * 10;
        assert_eq!(forward_flops(&a).unwrap(), 2 * macs);
        assert_eq!(train_flops(&a).unwrap(), 3 * 2 * macs - 2 * 784 * 256);
    }

    #[test]
    fn vgg_flops_count_every_conv() {
        let cfg = ModelConfig {
            arch: layerlab::pipeline::Arch::Vgg11,
            width_mult: 0.25,
            batch_norm: true,
            ..ModelConfig::default()
        };
        let a = Architecture::build(&cfg, [3, 32, 32], 10).unwrap();
        // conv1 3→16 at 32², conv2 16→32 at 16², conv3 32→64 and conv4 64→64 at 8², conv5 64→128 and
        // conv6 128→128 at 4², conv7 and conv8 128→128 at 2², fc 128→10.
        let macs = 1024 * 16 * 27
            + 256 * 32 * 144
            + 64 * 64 * 288
            + 64 * 64 * 576
            + 16 * 128 * 576
            + 16 * 128 * 1152
            + 2 * 4 * 128 * 1152
            + 128 * 10;
        assert_eq!(forward_flops(&a).unwrap(), 2 * macs as u64);
    }
}

/// The measured f32 peak of `layerlab-bench peak`.
///
/// Why measured: a formula (lanes × FMA units × the clock in /proc/cpuinfo) needs the number of
/// FMA units per width, which differs by core (AMD Zen 4 runs AVX-512 on two 256-bit units, half
/// what the formula for Intel's server cores assumes), and the clock a virtual machine reports is
/// not the one it runs at. A loop of independent FMAs on every thread at once measures both.
mod peak {
    use std::time::{Duration, Instant};

    /// Independent accumulators per thread: enough to cover the FMA latency times the number of
    /// units on current x86 cores (4 cycles × 2 units), with room to spare.
    const CHAINS: usize = 16;
    /// FMAs per chain between two looks at the clock.
    const ROUND: usize = 1 << 16;
    const RUN: Duration = Duration::from_millis(400);

    /// GFLOP/s summed over `threads` threads, each running [`RUN`] of FMAs after a warm-up of the
    /// same length (so that the clock has settled), and the instruction set used.
    pub(super) fn measure(threads: usize) -> (f64, &'static str) {
        let per_thread: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| {
                        run_for(RUN);
                        run_for(RUN)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("peak thread panicked")).collect()
        });
        (per_thread.iter().sum::<f64>() / 1e9, isa())
    }

    fn isa() -> &'static str {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return "AVX-512";
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return "AVX2+FMA";
            }
        }
        "scalar"
    }

    /// FLOP/s of one thread over `time`.
    fn run_for(time: Duration) -> f64 {
        let t0 = Instant::now();
        let mut flops = 0f64;
        let mut sink = 0f32;
        while t0.elapsed() < time {
            let (round_flops, v) = round();
            flops += round_flops;
            sink += v;
        }
        std::hint::black_box(sink);
        flops / t0.elapsed().as_secs_f64()
    }

    /// One round of [`ROUND`] FMAs on each of [`CHAINS`] accumulators: its FLOPs and a value
    /// that depends on every accumulator (so that none is optimised away).
    fn round() -> (f64, f32) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F is present (checked above).
                return (2.0 * 16.0 * (CHAINS * ROUND) as f64, unsafe { x86::round_avx512() });
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: AVX2 and FMA are present (checked above).
                return (2.0 * 8.0 * (CHAINS * ROUND) as f64, unsafe { x86::round_avx2() });
            }
        }
        let mut acc = [1f32; CHAINS];
        for _ in 0..ROUND {
            for a in &mut acc {
                *a = a.mul_add(0.999_999, 1e-7);
            }
        }
        (2.0 * (CHAINS * ROUND) as f64, std::hint::black_box(acc).iter().sum())
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::{CHAINS, ROUND};

        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn round_avx512() -> f32 {
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_set1_ps(1.0); CHAINS];
            for _ in 0..ROUND {
                for c in &mut acc {
                    *c = _mm512_fmadd_ps(*c, a, b);
                }
            }
            let mut sum = _mm512_setzero_ps();
            for c in acc {
                sum = _mm512_add_ps(sum, c);
            }
            _mm512_reduce_add_ps(sum)
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn round_avx2() -> f32 {
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_set1_ps(1.0); CHAINS];
            for _ in 0..ROUND {
                for c in &mut acc {
                    *c = _mm256_fmadd_ps(*c, a, b);
                }
            }
            let mut lanes = [0f32; 8];
            let mut sum = _mm256_setzero_ps();
            for c in acc {
                sum = _mm256_add_ps(sum, c);
            }
            // SAFETY: `lanes` holds 8 values.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
            lanes.iter().sum()
        }
    }
}
