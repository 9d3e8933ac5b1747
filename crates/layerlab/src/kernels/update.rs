//! The optimizers' updates of one step as plain values: what the host's update runs with and what
//! the CUDA update kernels are given, so that the kernels need no optimizer type.

/// One Adam or AdamW step's constants in f32 (`crate::optim::Adam` makes them from its settings
/// and the step): the f64 bias corrections rounded once, as PyTorch's are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// AdamW's weight factor 1 − lr·λ (1 for Adam).
    pub shrink: f32,
    /// −lr / (1 − β₁ᵗ).
    pub step_size: f32,
    /// √(1 − β₂ᵗ).
    pub bias_correction2_sqrt: f32,
    /// 1 − β₁: how far the running mean moves towards the gradient.
    pub beta1_weight: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// AdamW: the weights shrink before the update.
    pub decoupled: bool,
    /// Adam with weight decay: λθ joins the gradient.
    pub l2: bool,
    /// The running mean moves from its old value (|1 − β₁| < ½), else back from the gradient:
    /// PyTorch's `lerp`, exact at either end.
    pub lerp_from_start: bool,
}

impl AdamStep {
    /// One value's update, in place: the rule every form follows, operation for operation.
    #[inline(always)]
    pub fn apply(&self, p: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        if self.decoupled {
            *p *= self.shrink;
        }
        let g = if self.l2 { g + self.weight_decay * *p } else { g };
        *m = if self.lerp_from_start {
            *m + self.beta1_weight * (g - *m)
        } else {
            g - (g - *m) * (1.0 - self.beta1_weight)
        };
        *v = *v * self.beta2 + self.one_minus_beta2 * g * g;
        let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
        *p += self.step_size * *m / denom;
    }
}
