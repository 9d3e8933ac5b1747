//! SGD with momentum, Nesterov momentum and weight decay: `torch.optim.SGD`'s update, once per
//! compute path.
//!
//! g ← ∇ + λθ;  b ← μb + g;  θ ← θ − η·(g + μb if Nesterov, else b).
//!
//! The fully connected fast path updates f32 buffers in place ([`Sgd::update_slices`]); the
//! autograd path updates candle tensors ([`Sgd::update_tensors`]). The two are tested against
//! each other below, so that both paths train the same way. On a GPU the autograd path runs the
//! same operations as one CUDA kernel over all parameters (`kernels::cuda::sgd_update_all`), held
//! to the CPU by the GPU tests (`tests/gpu.rs`).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

use layerlab_pipeline::TrainConfig;

/// The optimizer's settings (the learning rate changes per step and is passed to each update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Sgd {
    pub fn of(cfg: &TrainConfig) -> Sgd {
        Sgd { momentum: cfg.momentum, weight_decay: cfg.weight_decay, nesterov: cfg.nesterov }
    }

    /// One update of parameters `p` with momentum buffers `m` and gradients `g`, in place.
    pub fn update_slices(&self, lr: f64, p: &mut [f32], m: &mut [f32], g: &[f32]) {
        let (lr, mu, wd) = (lr as f32, self.momentum as f32, self.weight_decay as f32);
        crate::kernels::vectorized(|| {
            for ((p, m), &g) in p.iter_mut().zip(m.iter_mut()).zip(g) {
                let g = if wd > 0.0 { g + *p * wd } else { g };
                *m = *m * mu + g;
                let step = if self.nesterov { g + *m * mu } else { *m };
                *p -= step * lr;
            }
        })
    }

    /// [`Sgd::update_slices`] over whole buffers, in fixed pieces run on rayon's threads (each
    /// value's update is independent, so the result does not depend on the thread count).
    pub fn update_in_pieces(&self, lr: f64, p: &mut [f32], m: &mut [f32], g: &[f32]) {
        use rayon::prelude::*;
        const VALUES_PER_TASK: usize = 1 << 14;
        let tasks = p.par_chunks_mut(VALUES_PER_TASK).zip(m.par_chunks_mut(VALUES_PER_TASK));
        tasks.zip(g.par_chunks(VALUES_PER_TASK)).for_each(|((p, m), g)| self.update_slices(lr, p, m, g));
    }

    /// One update of every trained `Var` in `updates` (by name, with its gradient), and of its
    /// momentum buffer in `momentum`: in place on a GPU (one kernel for all,
    /// [`crate::kernels::cuda::sgd_update_all`]), by [`Sgd::update_tensors`] elsewhere.
    pub fn update_vars(
        &self,
        lr: f64,
        updates: &[(&str, &Var, &Tensor)],
        momentum: &mut BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let buffer = |name: &str| format!("no momentum buffer for {name}");
        #[cfg(feature = "cuda")]
        if updates.iter().all(|(_, v, _)| v.device().is_cuda() && v.dtype() == candle_core::DType::F32)
            && crate::kernels::cuda::SGD_ENABLED.load(std::sync::atomic::Ordering::Relaxed)
        {
            let triples = updates
                .iter()
                .map(|(name, var, g)| Ok((var.as_tensor(), momentum.get(*name).with_context(|| buffer(name))?, *g)))
                .collect::<Result<Vec<_>>>()?;
            crate::kernels::cuda::sgd_update_all(self, lr, &triples)?;
            return Ok(());
        }
        for (name, var, g) in updates {
            let m = momentum.get_mut(*name).with_context(|| buffer(name))?;
            let (p, b) = self.update_tensors(lr, var.as_tensor(), m, g)?;
            var.set(&p)?;
            *m = b;
        }
        Ok(())
    }

    /// One update on tensors: the new parameters and the new momentum buffer, both detached
    /// (or every step would keep the whole history of updates alive).
    pub fn update_tensors(&self, lr: f64, p: &Tensor, m: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = p.detach();
        let g = if self.weight_decay > 0.0 { (g + (&p * self.weight_decay)?)? } else { g.clone() };
        let b = ((m * self.momentum)? + &g)?.detach();
        let d = if self.nesterov { (&g + (&b * self.momentum)?)? } else { b.clone() };
        Ok(((p - (d * lr)?)?.detach(), b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{rng, unit_f64};
    use candle_core::Device;

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
                Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
            for step in 0..4 {
                let g = values(n);
                let lr = 0.1 / (step + 1) as f64;
                sgd.update_slices(lr, &mut p, &mut m, &g);
                let gt = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                (pt, mt) = sgd.update_tensors(lr, &pt, &mt, &gt).unwrap();
            }
            let (pt, mt) = (pt.to_vec1::<f32>().unwrap(), mt.to_vec1::<f32>().unwrap());
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
        for _ in 0..3 {
            let g = [p[0]];
            sgd.update_slices(0.1, &mut p, &mut m, &g);
            let g = pv + 0.5 * pv;
            bv = 0.9 * bv + g;
            pv -= 0.1 * bv;
            assert!((p[0] as f64 - pv).abs() < 1e-6, "{} vs {pv}", p[0]);
        }
    }
}
