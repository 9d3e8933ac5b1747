//! Which of layerlab's own GPU kernels a computation uses: a value that the executor holds and
//! hands down to each call, not a process-wide switch, so that two computations in one process
//! (the GPU tests' cross-checks, `layerlab-bench gaps`) can differ without taking turns.

/// Which of layerlab's GPU kernels a computation uses, and whether cuDNN may use TF32. On the
/// CPU none of them changes anything: its kernels are always its own.
///
/// The default is what training uses: every kernel of ours on, TF32 off. Each switch exists to
/// cross-check one kernel against candle's own ops in the GPU tests and `layerlab-bench gaps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelOptions {
    /// Convolutions, forward and both gradients, through cuDNN (off: candle's own convolution,
    /// whose gradient only candle's autograd computes).
    pub cudnn_conv: bool,
    /// Training-mode BatchNorm through cuDNN (off: candle ops).
    pub cudnn_batch_norm: bool,
    /// The optimizer's update as one CUDA kernel over every parameter, for the optimizers that
    /// have one (SGD, Adam, AdamW; off: their candle tensor ops).
    pub fused_update: bool,
    /// A GPU's training gradients from layerlab's tape (`crate::backward`; off: candle's
    /// autograd). The tape calls the gradients of our cuDNN convolution and BatchNorm, so it
    /// needs both on.
    pub taped_backward: bool,
    /// cuDNN's convolutions may use TF32 tensor cores (`train.tf32`). cuBLAS's matrix products
    /// follow candle's own process-wide setting, which `crate::device::allow_tf32` sets.
    pub tf32: bool,
}

impl Default for KernelOptions {
    fn default() -> KernelOptions {
        KernelOptions {
            cudnn_conv: true,
            cudnn_batch_norm: true,
            fused_update: true,
            taped_backward: true,
            tf32: false,
        }
    }
}

impl KernelOptions {
    /// The defaults, with TF32 as `train.tf32` says.
    pub fn with_tf32(tf32: bool) -> KernelOptions {
        KernelOptions { tf32, ..KernelOptions::default() }
    }

    /// Whether a training step on a GPU takes its gradients from the tape: asked for, and every
    /// layer it meets is one of our ops with a gradient it can call.
    pub fn tape_applies(&self) -> bool {
        self.taped_backward && self.cudnn_conv && self.cudnn_batch_norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tape needs both of our cuDNN ops: with either off, the step is candle's autograd.
    #[test]
    fn the_tape_applies_only_with_both_cudnn_ops() {
        let on = KernelOptions::default();
        assert!(on.tape_applies());
        assert!(!KernelOptions { taped_backward: false, ..on }.tape_applies());
        assert!(!KernelOptions { cudnn_conv: false, ..on }.tape_applies());
        assert!(!KernelOptions { cudnn_batch_norm: false, ..on }.tape_applies());
        assert!(KernelOptions { fused_update: false, tf32: true, ..on }.tape_applies());
        assert_eq!(KernelOptions::with_tf32(true), KernelOptions { tf32: true, ..on });
    }
}
