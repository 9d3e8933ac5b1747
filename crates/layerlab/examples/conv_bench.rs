//! Times candle's conv2d against layerlab's on a VGG-11-BN-w0.25-sized stack (32×32×3 inputs).
//!
//! `cargo run --release -p layerlab --example conv_bench -- [--batch 128] [--iters 3] [--skip-candle] [--model-only]`
//!
//! Each stack is conv (+bias), BatchNorm in training mode, ReLU, with 2×2 max-pools between
//! stages, as `model.rs` runs them: once with candle's ops everywhere (the state before
//! `layerlab::kernels`), once with only our convolution, once with all of our ops. Also times
//! the full model's training step (`Architecture::forward` + cross-entropy) and each layer kind
//! of the stack on its own, to show where the time goes.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use layerlab::kernels::{conv2d, conv2d_bias, conv2d_candle, layers, KernelOptions};
use layerlab::model::{loss_and_errors, Architecture, BnMode};
use layerlab::pipeline::ModelConfig;

type ConvFn = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
type BnFn = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
type UnaryFn = fn(&Tensor) -> Result<Tensor>;

/// Which kernels a stack runs.
#[derive(Clone, Copy)]
struct Kernels {
    /// Convolution (padding 1, stride 1) plus bias.
    conv: ConvFn,
    bn: BnFn,
    relu: UnaryFn,
    pool: UnaryFn,
}

const CANDLE: Kernels = Kernels { conv: conv_candle, bn: batch_norm, relu: relu_candle, pool: pool_candle };
const OURS_CONV: Kernels = Kernels { conv: conv_ours_unfused, bn: batch_norm, relu: relu_candle, pool: pool_candle };
const OURS: Kernels = Kernels { conv: conv_ours, bn: batch_norm_fused, relu: relu_ours, pool: pool_ours };

fn conv_candle(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(conv2d_candle(x, w, 1, 1)?.broadcast_add(&b.reshape((1, (), 1, 1))?)?)
}
fn conv_ours_unfused(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(conv2d(x, w, 1, 1, &KernelOptions::default())?.broadcast_add(&b.reshape((1, (), 1, 1))?)?)
}
fn conv_ours(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    conv2d_bias(x, w, b, 1, 1, &KernelOptions::default())
}
fn relu_candle(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?)
}
fn relu_ours(x: &Tensor) -> Result<Tensor> {
    Ok(layers::relu(x)?)
}
fn pool_candle(x: &Tensor) -> Result<Tensor> {
    Ok(x.max_pool2d(2)?)
}
fn pool_ours(x: &Tensor) -> Result<Tensor> {
    Ok(layers::max_pool2(x)?)
}

/// Output channels, with 0 for a max-pool (VGG-11 at width 0.25).
const PLAN: [usize; 13] = [16, 0, 32, 0, 64, 64, 0, 128, 128, 0, 128, 128, 0];

struct Flags {
    batch: usize,
    iters: usize,
    skip_candle: bool,
    model_only: bool,
}

fn flags() -> Result<Flags> {
    let mut f = Flags { batch: 128, iters: 3, skip_candle: false, model_only: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batch" => f.batch = args.next().context("--batch needs a value")?.parse()?,
            "--iters" => f.iters = args.next().context("--iters needs a value")?.parse()?,
            "--skip-candle" => f.skip_candle = true,
            "--model-only" => f.model_only = true,
            other => bail!("unknown flag '{other}'"),
        }
    }
    Ok(f)
}

/// Deterministic values in [-scale, scale) from a small xorshift generator.
fn random(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

struct Stack {
    /// (weight, bias, bn weight, bn bias) per conv.
    convs: Vec<[Var; 4]>,
}

impl Stack {
    fn new() -> Result<Stack> {
        let mut convs = Vec::new();
        let mut cin = 3;
        for (i, &c) in PLAN.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let bound = 1.0 / ((cin * 9) as f32).sqrt();
            convs.push([
                Var::from_tensor(&random(&[c, cin, 3, 3], 10 + i as u64, bound)?)?,
                Var::from_tensor(&random(&[c], 30 + i as u64, bound)?)?,
                Var::from_tensor(&Tensor::ones(c, DType::F32, &Device::Cpu)?)?,
                Var::from_tensor(&Tensor::zeros(c, DType::F32, &Device::Cpu)?)?,
            ]);
            cin = c;
        }
        Ok(Stack { convs })
    }

    fn forward(&self, k: Kernels, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let mut next = self.convs.iter();
        for &c in &PLAN {
            if c == 0 {
                x = (k.pool)(&x)?;
                continue;
            }
            let [w, b, g, beta] = next.next().context("plan and weights disagree")?;
            x = (k.conv)(&x, w.as_tensor(), b.as_tensor())?;
            x = (k.relu)(&(k.bn)(&x, g.as_tensor(), beta.as_tensor())?)?;
        }
        Ok(x)
    }
}

/// Training-mode BatchNorm written with the same candle ops as `model.rs`.
fn batch_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let inv_std = (var + 1e-5)?.sqrt()?.recip()?;
    let scale = inv_std.broadcast_mul(&weight.reshape((1, (), 1, 1))?)?;
    Ok(x.broadcast_sub(&mean)?.broadcast_mul(&scale)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)?)
}

fn batch_norm_fused(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(layerlab::kernels::norm::train(x, weight, bias, 1e-5, false)?.0)
}

/// Images per wall-clock second of `f` over `iters` timed runs after one warm-up.
fn images_per_s(batch: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    rates(batch, iters, &mut f)
}

/// Images per wall-clock second of `f` over `iters` timed runs after one warm-up.
fn rates(batch: usize, iters: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok((batch * iters) as f64 / start.elapsed().as_secs_f64())
}

/// Images per second of (forward, forward+backward).
fn time_stack(stack: &Stack, k: Kernels, x: &Tensor, fl: &Flags) -> Result<(f64, f64)> {
    let fwd = rates(fl.batch, fl.iters, &mut || {
        stack.forward(k, x)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    let train = rates(fl.batch, fl.iters, &mut || {
        let loss = stack.forward(k, x)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        grads.get(stack.convs[0][0].as_tensor()).context("no gradient for the first conv")?;
        Ok(())
    })?;
    Ok((fwd, train))
}

fn report(name: &str, (f, t): (f64, f64)) {
    println!("{name:<22} forward {f:7.1} img/s   forward+backward {t:7.1} img/s");
}

/// The model's own training step: forward, cross-entropy, backward.
fn time_model(x: &Tensor, fl: &Flags) -> Result<f64> {
    let cfg = ModelConfig {
        arch: layerlab::pipeline::Arch::Vgg11,
        depth: 3,
        width: 256,
        width_mult: 0.25,
        batch_norm: true,
        pad_to: 32,
        init: layerlab::pipeline::WeightInit::Pytorch,
    };
    let arch = Architecture::build(&cfg, [3, 32, 32], 10)?;
    let state = arch.initial_state(1, &Device::Cpu)?;
    let vars: Vec<(String, Var)> =
        state.iter().map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?;
    let state = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let labels: Vec<u32> = (0..fl.batch as u32).map(|i| i % 10).collect();
    let labels = Tensor::from_vec(labels, fl.batch, &Device::Cpu)?;
    images_per_s(fl.batch, fl.iters, || {
        let mut updates = Vec::new();
        let logits = arch.forward(&state, x, BnMode::Train(&mut updates), &KernelOptions::default())?;
        let (loss, _) = loss_and_errors(&logits, &labels)?;
        loss.backward()?;
        Ok(())
    })
}

/// Forward and forward+backward of each layer kind alone, at the sizes of the stack.
fn time_layers(x: &Tensor, fl: &Flags) -> Result<()> {
    let mut shapes = Vec::new();
    let (mut c, mut s) = (3, 32);
    for &p in &PLAN {
        if p == 0 {
            s /= 2;
        } else {
            shapes.push((c, p, s));
            c = p;
        }
    }
    let mut pools = Vec::new();
    let (mut c, mut s) = (3, 32);
    for &p in &PLAN {
        if p == 0 {
            pools.push((c, s));
            s /= 2;
        } else {
            c = p;
        }
    }
    let n = x.dim(0)?;
    type Layer<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;
    let mut kinds: Vec<(&str, Vec<(Var, Layer)>)> = Vec::new();
    let mut conv = Vec::new();
    let mut conv_bias = Vec::new();
    let mut conv_candle = Vec::new();
    let mut relu_ours = Vec::new();
    let mut pool_ours = Vec::new();
    let mut bn = Vec::new();
    let mut fused = Vec::new();
    let mut relu = Vec::new();
    let mut bias = Vec::new();
    for (i, &(cin, cout, s)) in shapes.iter().enumerate() {
        let w = random(&[cout, cin, 3, 3], 100 + i as u64, 0.1)?;
        let b = random(&[cout], 200 + i as u64, 0.1)?;
        let input = Var::from_tensor(&random(&[n, cin, s, s], 300 + i as u64, 1.0)?)?;
        let output = Var::from_tensor(&random(&[n, cout, s, s], 400 + i as u64, 1.0)?)?;
        let (w2, b2) = (w.clone(), b.clone());
        let w3 = w.clone();
        conv_candle.push((input.clone(), Box::new(move |x: &Tensor| conv2d_candle(x, &w3, 1, 1)) as Layer));
        conv.push((input.clone(), Box::new(move |x: &Tensor| conv2d(x, &w, 1, 1, &KernelOptions::default())) as Layer));
        conv_bias.push((
            input,
            Box::new(move |x: &Tensor| conv2d_bias(x, &w2, &b2, 1, 1, &KernelOptions::default())) as Layer,
        ));
        let (g, beta) = (Tensor::ones(cout, DType::F32, &Device::Cpu)?, Tensor::zeros(cout, DType::F32, &Device::Cpu)?);
        let (g2, beta2) = (g.clone(), beta.clone());
        bn.push((output.clone(), Box::new(move |x: &Tensor| batch_norm(x, &g, &beta)) as Layer));
        fused.push((output.clone(), Box::new(move |x: &Tensor| batch_norm_fused(x, &g2, &beta2)) as Layer));
        relu.push((output.clone(), Box::new(|x: &Tensor| Ok(x.relu()?)) as Layer));
        relu_ours.push((output.clone(), Box::new(|x: &Tensor| Ok(layers::relu(x)?)) as Layer));
        bias.push((output, Box::new(move |x: &Tensor| Ok(x.broadcast_add(&b.reshape((1, (), 1, 1))?)?)) as Layer));
    }
    let mut pool = Vec::new();
    for (i, &(c, s)) in pools.iter().enumerate() {
        let input = Var::from_tensor(&random(&[n, c, s, s], 500 + i as u64, 1.0)?)?;
        pool.push((input.clone(), Box::new(|x: &Tensor| Ok(x.max_pool2d(2)?)) as Layer));
        pool_ours.push((input, Box::new(|x: &Tensor| Ok(layers::max_pool2(x)?)) as Layer));
    }
    kinds.push(("conv candle", conv_candle));
    kinds.push(("conv (ours)", conv));
    kinds.push(("conv+bias", conv_bias));
    kinds.push(("bias add", bias));
    kinds.push(("batch norm", bn));
    kinds.push(("bn (fused)", fused));
    kinds.push(("relu", relu));
    kinds.push(("relu (ours)", relu_ours));
    kinds.push(("max pool", pool));
    kinds.push(("pool (ours)", pool_ours));
    println!("per layer kind, summed over the stack (ms per batch of {n}; the loss is a sum, or a mean of squares):");
    for (name, layers) in &kinds {
        let per_batch = |train: bool| -> Result<f64> {
            let ips = rates(n, fl.iters, &mut || {
                for (input, f) in layers {
                    let y = f(input.as_tensor())?;
                    if train {
                        y.sqr()?.mean_all()?.backward()?;
                    } else {
                        y.sum_all()?.to_scalar::<f32>()?;
                    }
                }
                Ok(())
            })?;
            Ok(n as f64 / ips * 1e3)
        };
        let (f, t) = (per_batch(false)?, per_batch(true)?);
        println!("  {name:<12} forward {f:8.1}   forward+backward {t:8.1}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let fl = flags()?;
    let threads = rayon::current_num_threads();
    println!("batch {}, {} timed iterations, {threads} rayon threads", fl.batch, fl.iters);
    let x = random(&[fl.batch, 3, 32, 32], 1, 1.0)?;
    if fl.model_only {
        println!("full vgg11-bn-w0.25 training step (ours): {:.1} img/s", time_model(&x, &fl)?);
        return Ok(());
    }
    let stack = Stack::new()?;
    let ours = time_stack(&stack, OURS, &x, &fl)?;
    report("all ours:", ours);
    let conv = time_stack(&stack, OURS_CONV, &x, &fl)?;
    report("ours conv, candle BN:", conv);
    if !fl.skip_candle {
        let cand = time_stack(&stack, CANDLE, &x, &fl)?;
        report("all candle:", cand);
        let ratio =
            |a: (f64, f64), b: (f64, f64)| format!("forward {:.1}x   forward+backward {:.1}x", a.0 / b.0, a.1 / b.1);
        println!("conv alone vs candle:  {}", ratio(conv, cand));
        println!("all ours vs candle:    {}", ratio(ours, cand));
    }
    println!("full vgg11-bn-w0.25 training step (ours): {:.1} img/s", time_model(&x, &fl)?);
    time_layers(&x, &fl)?;
    Ok(())
}
