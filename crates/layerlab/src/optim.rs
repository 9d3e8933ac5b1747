//! Optimizers: how trained tensors are updated from their gradients, and the state each
//! optimizer keeps per tensor (saved by name in the resume file, restored bit for bit).
//!
//! An [`Optimizer`] states its update twice: on host slices ([`Optimizer::update_slices`], which
//! the host executors run in place) and on candle tensors ([`Optimizer::update_tensors`], which
//! candle's executor runs on any device). The two forms are tested against each other, so that
//! every executor trains the same way. An optimizer may add a device form of its own
//! ([`Optimizer::update_vars`]): SGD's is one CUDA kernel over all parameters.
//!
//! Adding an optimizer: a struct implementing [`Optimizer`], a `train.optimizer` name for it in
//! the settings, and an arm in [`from_settings`]; the executors take it as it is.

use std::collections::BTreeMap;
use std::fmt::Debug;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

use layerlab_pipeline::{OptimizerKind, TrainConfig};

use crate::kernels::update::AdamStep;
use crate::kernels::KernelOptions;

/// Where an update happens in a run: its learning rate and its number (1 for the first update of
/// a run; an optimizer that corrects for its start, as Adam does, needs it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepAt {
    pub lr: f64,
    pub number: u64,
}

/// The optimizer's state of a whole network: buffer `b` of tensor `t` under [`state_key`]`(b, t)`
/// (`momentum/fc1.weight`), each of the tensor's shape.
pub type OptimizerState = BTreeMap<String, Tensor>;

/// The name of buffer `buffer` of trained tensor `tensor` in an [`OptimizerState`] and in the
/// resume file.
pub fn state_key(buffer: &str, tensor: &str) -> String {
    format!("{buffer}/{tensor}")
}

/// Buffer `buffer` of trained tensor `tensor` in `state`, or an error naming both.
pub fn buffer_of<'s>(state: &'s OptimizerState, buffer: &str, tensor: &str) -> Result<&'s Tensor> {
    state.get(&state_key(buffer, tensor)).with_context(|| format!("no {buffer} buffer for {tensor}"))
}

/// An update rule over trained tensors.
pub trait Optimizer: Debug + Send + Sync {
    /// The names of the buffers it keeps per trained tensor, each of the tensor's shape and zero
    /// at the start of a run.
    fn buffers(&self) -> &'static [&'static str];

    /// One update of parameters `p` with gradients `g` and this optimizer's buffers `state` (in
    /// the order of [`Optimizer::buffers`]), in place.
    fn update_slices(&self, at: StepAt, p: &mut [f32], state: &mut [&mut [f32]], g: &[f32]);

    /// One update on tensors: the new parameters and the new buffers, all detached (or every
    /// step would keep the whole history of updates alive).
    fn update_tensors(&self, at: StepAt, p: &Tensor, state: &[Tensor], g: &Tensor) -> Result<(Tensor, Vec<Tensor>)>;

    /// One update of every trained `Var` in `updates` (by name, with its gradient) and of its
    /// buffers in `state`. By default each tensor through [`Optimizer::update_tensors`]; an
    /// optimizer with a device form of its own overrides it, and uses it where `kernels` allows.
    fn update_vars(
        &self,
        at: StepAt,
        updates: &[(&str, &Var, &Tensor)],
        state: &mut OptimizerState,
        kernels: &KernelOptions,
    ) -> Result<()> {
        let _ = kernels;
        update_each_var(self, at, updates, state)
    }
}

/// Whether every trained tensor of `updates` is f32 on a GPU: what the update kernels take.
#[cfg(feature = "cuda")]
fn on_gpu_in_f32(updates: &[(&str, &Var, &Tensor)]) -> bool {
    updates.iter().all(|(_, v, _)| v.device().is_cuda() && v.dtype() == candle_core::DType::F32)
}

/// [`Optimizer::update_vars`] tensor by tensor, through [`Optimizer::update_tensors`].
pub fn update_each_var<O: Optimizer + ?Sized>(
    opt: &O,
    at: StepAt,
    updates: &[(&str, &Var, &Tensor)],
    state: &mut OptimizerState,
) -> Result<()> {
    for (name, var, g) in updates {
        let buffers = opt.buffers().iter().map(|b| buffer_of(state, b, name).cloned()).collect::<Result<Vec<_>>>()?;
        let (p, buffers) = opt.update_tensors(at, var.as_tensor(), &buffers, g)?;
        var.set(&p)?;
        for (b, t) in opt.buffers().iter().zip(buffers) {
            state.insert(state_key(b, name), t);
        }
    }
    Ok(())
}

/// [`Optimizer::update_slices`] over whole buffers, in fixed pieces run on rayon's threads (each
/// value's update is independent, so the result does not depend on the thread count).
pub fn update_in_pieces(opt: &dyn Optimizer, at: StepAt, p: &mut [f32], state: &mut [Vec<f32>], g: &[f32]) {
    use rayon::prelude::*;
    const VALUES_PER_TASK: usize = 1 << 14;
    let mut pieces: Vec<Vec<&mut [f32]>> =
        (0..p.len().div_ceil(VALUES_PER_TASK)).map(|_| Vec::with_capacity(state.len())).collect();
    for buffer in state.iter_mut() {
        for (piece, chunk) in pieces.iter_mut().zip(buffer.chunks_mut(VALUES_PER_TASK)) {
            piece.push(chunk);
        }
    }
    let tasks = p.par_chunks_mut(VALUES_PER_TASK).zip(g.par_chunks(VALUES_PER_TASK));
    tasks.zip(pieces.into_par_iter()).for_each(|((p, g), mut state)| opt.update_slices(at, p, &mut state, g));
}

/// The optimizer `train` settings ask for.
pub fn from_settings(cfg: &TrainConfig) -> Box<dyn Optimizer> {
    let adam = |decoupled| Adam { betas: cfg.betas, eps: cfg.eps, weight_decay: cfg.weight_decay, decoupled };
    match cfg.optimizer {
        OptimizerKind::Sgd => {
            Box::new(Sgd { momentum: cfg.momentum, weight_decay: cfg.weight_decay, nesterov: cfg.nesterov })
        }
        OptimizerKind::Adam => Box::new(adam(false)),
        OptimizerKind::Adamw => Box::new(adam(true)),
    }
}

/// `torch.optim.SGD`: momentum, Nesterov momentum and (L2) weight decay.
///
/// g ← ∇ + λθ;  b ← μb + g;  θ ← θ − η·(g + μb if Nesterov, else b).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Sgd {
    /// Its one buffer.
    pub const MOMENTUM: &'static str = "momentum";
}

impl Optimizer for Sgd {
    fn buffers(&self) -> &'static [&'static str] {
        &[Sgd::MOMENTUM]
    }

    fn update_slices(&self, at: StepAt, p: &mut [f32], state: &mut [&mut [f32]], g: &[f32]) {
        let (lr, mu, wd) = (at.lr as f32, self.momentum as f32, self.weight_decay as f32);
        let [m] = state else { panic!("SGD keeps one buffer per tensor, got {}", state.len()) };
        crate::kernels::vectorized(|| {
            for ((p, m), &g) in p.iter_mut().zip(m.iter_mut()).zip(g) {
                let g = if wd > 0.0 { g + *p * wd } else { g };
                *m = *m * mu + g;
                let step = if self.nesterov { g + *m * mu } else { *m };
                *p -= step * lr;
            }
        })
    }

    fn update_tensors(&self, at: StepAt, p: &Tensor, state: &[Tensor], g: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let [m] = state else { anyhow::bail!("SGD keeps one buffer per tensor, got {}", state.len()) };
        let p = p.detach();
        let g = if self.weight_decay > 0.0 { (g + (&p * self.weight_decay)?)? } else { g.clone() };
        let b = ((m * self.momentum)? + &g)?.detach();
        let d = if self.nesterov { (&g + (&b * self.momentum)?)? } else { b.clone() };
        Ok(((p - (d * at.lr)?)?.detach(), vec![b]))
    }

    /// On a GPU, one kernel over every parameter, in place
    /// ([`crate::kernels::cuda::sgd_update_all`]), unless `kernels.fused_update` is off; elsewhere
    /// tensor by tensor.
    fn update_vars(
        &self,
        at: StepAt,
        updates: &[(&str, &Var, &Tensor)],
        state: &mut OptimizerState,
        kernels: &KernelOptions,
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if kernels.fused_update && on_gpu_in_f32(updates) {
            let triples = updates
                .iter()
                .map(|(name, var, g)| Ok((var.as_tensor(), buffer_of(state, Sgd::MOMENTUM, name)?, *g)))
                .collect::<Result<Vec<_>>>()?;
            crate::kernels::cuda::sgd_update_all(at.lr, self.momentum, self.weight_decay, self.nesterov, &triples)?;
            return Ok(());
        }
        #[cfg(not(feature = "cuda"))]
        let _ = kernels;
        update_each_var(self, at, updates, state)
    }
}

/// `torch.optim.Adam` (L2 weight decay, added to the gradient) and `torch.optim.AdamW`
/// (`decoupled`: the weights shrink before the update), without AMSGrad, in the order of
/// operations of PyTorch's default (multi-tensor) implementation. At update number t:
///
/// AdamW: θ ← θ·(1 − ηλ).  Adam: g ← ∇ + λθ.
/// m ← m + (1 − β₁)(g − m);  v ← β₂v + (1 − β₂)·g·g;
/// θ ← θ + (−η / (1 − β₁ᵗ))·m / (√v / √(1 − β₂ᵗ) + ε).
///
/// The bias corrections are computed in f64 and rounded once to f32, as PyTorch's are (Python
/// floats). Its buffers are PyTorch's state names, `exp_avg` and `exp_avg_sq`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adam {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled weight decay rather than Adam's L2 term.
    pub decoupled: bool,
}

impl Adam {
    /// The running mean of the gradient.
    pub const EXP_AVG: &'static str = "exp_avg";
    /// The running mean of its square.
    pub const EXP_AVG_SQ: &'static str = "exp_avg_sq";

    /// The f32 constants of update `at` (what the slice form and the CUDA kernel compute with).
    pub fn step(&self, at: StepAt) -> AdamStep {
        // `beta ** step` as Python computes it (C's pow on floats), not repeated multiplication.
        let t = at.number.max(1) as f64;
        let bias_correction1 = 1.0 - self.betas[0].powf(t);
        let bias_correction2 = 1.0 - self.betas[1].powf(t);
        let shrink = if self.decoupled { 1.0 - at.lr * self.weight_decay } else { 1.0 };
        let beta1_weight = (1.0 - self.betas[0]) as f32;
        AdamStep {
            shrink: shrink as f32,
            step_size: (-(at.lr / bias_correction1)) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            beta1_weight,
            beta2: self.betas[1] as f32,
            one_minus_beta2: (1.0 - self.betas[1]) as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
            decoupled: self.decoupled,
            l2: !self.decoupled && self.weight_decay != 0.0,
            lerp_from_start: beta1_weight.abs() < 0.5,
        }
    }
}

impl Optimizer for Adam {
    fn buffers(&self) -> &'static [&'static str] {
        &[Adam::EXP_AVG, Adam::EXP_AVG_SQ]
    }

    fn update_slices(&self, at: StepAt, p: &mut [f32], state: &mut [&mut [f32]], g: &[f32]) {
        let step = self.step(at);
        let [m, v] = state else { panic!("Adam keeps two buffers per tensor, got {}", state.len()) };
        crate::kernels::vectorized(|| {
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                step.apply(p, m, v, g);
            }
        })
    }

    fn update_tensors(&self, at: StepAt, p: &Tensor, state: &[Tensor], g: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let [m, v] = state else { anyhow::bail!("Adam keeps two buffers per tensor, got {}", state.len()) };
        // `AdamStep::apply`'s operations, one tensor op each, in its order.
        let s = self.step(at);
        let scalar = |x: f32| Tensor::new(x, p.device());
        let mut p = p.detach();
        if s.decoupled {
            p = p.broadcast_mul(&scalar(s.shrink)?)?;
        }
        let g = if s.l2 { (g + p.broadcast_mul(&scalar(s.weight_decay)?)?)? } else { g.clone() };
        let m = if s.lerp_from_start {
            (m + (&g - m)?.broadcast_mul(&scalar(s.beta1_weight)?)?)?
        } else {
            (&g - (&g - m)?.broadcast_mul(&scalar(1.0 - s.beta1_weight)?)?)?
        };
        let v = (v.broadcast_mul(&scalar(s.beta2)?)? + g.broadcast_mul(&scalar(s.one_minus_beta2)?)?.mul(&g)?)?;
        let denom = v.sqrt()?.broadcast_div(&scalar(s.bias_correction2_sqrt)?)?.broadcast_add(&scalar(s.eps)?)?;
        let p = (p + m.broadcast_mul(&scalar(s.step_size)?)?.div(&denom)?)?;
        Ok((p.detach(), vec![m.detach(), v.detach()]))
    }

    /// On a GPU, one kernel over every parameter, in place
    /// ([`crate::kernels::cuda::adam_update_all`]), unless `kernels.fused_update` is off;
    /// elsewhere tensor by tensor.
    fn update_vars(
        &self,
        at: StepAt,
        updates: &[(&str, &Var, &Tensor)],
        state: &mut OptimizerState,
        kernels: &KernelOptions,
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if kernels.fused_update && on_gpu_in_f32(updates) {
            let buffer = |b: &str, name: &str| buffer_of(state, b, name);
            let quads = updates
                .iter()
                .map(|(name, var, g)| {
                    Ok((var.as_tensor(), buffer(Adam::EXP_AVG, name)?, buffer(Adam::EXP_AVG_SQ, name)?, *g))
                })
                .collect::<Result<Vec<_>>>()?;
            crate::kernels::cuda::adam_update_all(&self.step(at), &quads)?;
            return Ok(());
        }
        #[cfg(not(feature = "cuda"))]
        let _ = kernels;
        update_each_var(self, at, updates, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{rng, unit_f64};
    use candle_core::Device;

    fn at(lr: f64, number: u64) -> StepAt {
        StepAt { lr, number }
    }

    /// Both forms, four steps from the same values, under every combination of the settings.
    #[test]
    fn slices_and_tensors_update_alike() {
        let mut r = rng(11);
        let mut values = |n: usize| (0..n).map(|_| (unit_f64(&mut r) * 2.0 - 1.0) as f32).collect::<Vec<f32>>();
        let n = 257;
        for (momentum, weight_decay, nesterov) in
            [(0.0, 0.0, false), (0.9, 0.0, false), (0.9, 5e-4, true), (0.5, 0.1, false)]
        {
            let sgd = Sgd { momentum, weight_decay, nesterov };
            let (mut p, mut m) = (values(n), vec![0f32; n]);
            let (mut pt, mut mt) = (
                Tensor::new(p.as_slice(), &Device::Cpu).unwrap(),
                vec![Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap()],
            );
            for step in 0..4 {
                let g = values(n);
                let at = at(0.1 / (step + 1) as f64, step + 1);
                sgd.update_slices(at, &mut p, &mut [&mut m], &g);
                let gt = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                (pt, mt) = sgd.update_tensors(at, &pt, &mt, &gt).unwrap();
            }
            let (pt, mt) = (pt.to_vec1::<f32>().unwrap(), mt[0].to_vec1::<f32>().unwrap());
            // Same f32 operations in the same order: the same bits.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p), bits(&pt), "parameters under {sgd:?}");
            assert_eq!(bits(&m), bits(&mt), "momentum under {sgd:?}");
        }
    }

    /// One parameter p = 1 with loss p²/2 (gradient p), lr 0.1, momentum 0.9, weight decay 0.5,
    /// against the update written out by hand.
    #[test]
    fn momentum_and_weight_decay_match_a_hand_computation() {
        let sgd = Sgd { momentum: 0.9, weight_decay: 0.5, nesterov: false };
        let (mut p, mut m) = ([1.0f32], [0.0f32]);
        let (mut pv, mut bv) = (1.0f64, 0.0f64);
        for number in 1..=3 {
            let g = [p[0]];
            sgd.update_slices(at(0.1, number), &mut p, &mut [&mut m], &g);
            let g = pv + 0.5 * pv;
            bv = 0.9 * bv + g;
            pv -= 0.1 * bv;
            assert!((p[0] as f64 - pv).abs() < 1e-6, "{} vs {pv}", p[0]);
        }
    }

    /// Adam's and AdamW's two forms, five steps from the same values, under settings that take
    /// every branch (no weight decay, L2, decoupled, a β₁ below one half): the same bits.
    #[test]
    fn adam_slices_and_tensors_update_alike() {
        let mut r = rng(12);
        let mut values = |n: usize| (0..n).map(|_| (unit_f64(&mut r) * 2.0 - 1.0) as f32).collect::<Vec<f32>>();
        let n = 129;
        for (betas, weight_decay, decoupled) in [
            ([0.9, 0.999], 0.0, false),
            ([0.9, 0.999], 0.1, false),
            ([0.9, 0.999], 0.01, true),
            ([0.3, 0.9], 0.05, true),
        ] {
            let adam = Adam { betas, eps: 1e-8, weight_decay, decoupled };
            let (mut p, mut m, mut v) = (values(n), vec![0f32; n], vec![0f32; n]);
            let zeros = || Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap();
            let (mut pt, mut state) = (Tensor::new(p.as_slice(), &Device::Cpu).unwrap(), vec![zeros(), zeros()]);
            for step in 0..5 {
                let g = values(n);
                let at = at(0.01 / (step + 1) as f64, step + 1);
                adam.update_slices(at, &mut p, &mut [&mut m, &mut v], &g);
                let gt = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                (pt, state) = adam.update_tensors(at, &pt, &state, &gt).unwrap();
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let tensor_bits = |t: &Tensor| bits(&t.to_vec1::<f32>().unwrap());
            assert_eq!(bits(&p), tensor_bits(&pt), "parameters under {adam:?}");
            assert_eq!(bits(&m), tensor_bits(&state[0]), "exp_avg under {adam:?}");
            assert_eq!(bits(&v), tensor_bits(&state[1]), "exp_avg_sq under {adam:?}");
        }
    }

    /// Two updates of one parameter p = 1 with loss p²/2 (gradient p), lr 0.1, β = (0.9, 0.999),
    /// ε = 1e-8, weight decay 0.5, against PyTorch's formulas written out by hand in f64: Adam's
    /// L2 term joins the gradient, AdamW's shrinks the weight first.
    #[test]
    fn adam_and_adamw_match_a_hand_computation_of_two_steps() {
        for decoupled in [false, true] {
            let adam = Adam { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.5, decoupled };
            let (mut p, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
            let (mut pv, mut mv, mut vv) = (1.0f64, 0.0f64, 0.0f64);
            for t in 1..=2 {
                let g = [p[0]];
                adam.update_slices(at(0.1, t), &mut p, &mut [&mut m, &mut v], &g);
                let mut g = pv;
                if decoupled {
                    pv *= 1.0 - 0.1 * 0.5;
                } else {
                    g += 0.5 * pv;
                }
                mv = 0.9 * mv + 0.1 * g;
                vv = 0.999 * vv + 0.001 * g * g;
                let (m_hat, v_hat) = (mv / (1.0 - 0.9f64.powi(t as i32)), vv / (1.0 - 0.999f64.powi(t as i32)));
                pv -= 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
                assert!((p[0] as f64 - pv).abs() < 1e-6, "decoupled {decoupled}, step {t}: {} vs {pv}", p[0]);
                assert!((m[0] as f64 - mv).abs() < 1e-6 && (v[0] as f64 - vv).abs() < 1e-7, "step {t}");
            }
            // The first step of Adam moves every weight by about lr, whatever its gradient's size.
            assert!(p[0] < 0.85, "{}", p[0]);
        }
    }

    /// Pieces run on threads give the bits of one pass over the whole buffer, for a length that
    /// is not a multiple of the piece size.
    #[test]
    fn updates_in_pieces_equal_one_pass() {
        let mut r = rng(3);
        let n = (1 << 14) * 2 + 77;
        let mut values = |n: usize| (0..n).map(|_| (unit_f64(&mut r) * 2.0 - 1.0) as f32).collect::<Vec<f32>>();
        let sgd = Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: true };
        let (p0, m0, g) = (values(n), values(n), values(n));
        let (mut p, mut m) = (p0.clone(), m0.clone());
        sgd.update_slices(at(0.05, 1), &mut p, &mut [&mut m], &g);
        let (mut pp, mut state) = (p0, vec![m0]);
        update_in_pieces(&sgd, at(0.05, 1), &mut pp, &mut state, &g);
        assert!(p.iter().zip(&pp).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(m.iter().zip(&state[0]).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
