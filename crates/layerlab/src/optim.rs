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

use layerlab_pipeline::TrainConfig;

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

/// [`Optimizer::update_vars`] tensor by tensor, through [`Optimizer::update_tensors`].
pub fn update_each_var<O: Optimizer + ?Sized>(
    opt: &O,
    at: StepAt,
    updates: &[(&str, &Var, &Tensor)],
    state: &mut OptimizerState,
) -> Result<()> {
    for (name, var, g) in updates {
        let buffers = opt
            .buffers()
            .iter()
            .map(|b| state.get(&state_key(b, name)).cloned().with_context(|| format!("no {b} buffer for {name}")))
            .collect::<Result<Vec<_>>>()?;
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
    Box::new(Sgd { momentum: cfg.momentum, weight_decay: cfg.weight_decay, nesterov: cfg.nesterov })
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
    /// ([`crate::kernels::cuda::sgd_update_all`]), unless `kernels.fused_sgd` is off; elsewhere
    /// tensor by tensor.
    fn update_vars(
        &self,
        at: StepAt,
        updates: &[(&str, &Var, &Tensor)],
        state: &mut OptimizerState,
        kernels: &KernelOptions,
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if kernels.fused_sgd
            && updates.iter().all(|(_, v, _)| v.device().is_cuda() && v.dtype() == candle_core::DType::F32)
        {
            let triples = updates
                .iter()
                .map(|(name, var, g)| {
                    let m = state
                        .get(&state_key(Sgd::MOMENTUM, name))
                        .with_context(|| format!("no momentum buffer for {name}"))?;
                    Ok((var.as_tensor(), m, *g))
                })
                .collect::<Result<Vec<_>>>()?;
            crate::kernels::cuda::sgd_update_all(at.lr, self.momentum, self.weight_decay, self.nesterov, &triples)?;
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
