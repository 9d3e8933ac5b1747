//! layerlab's CUDA kernels (`crates/layerlab/src/kernels/cuda.cu`) compiled as C++ and run on the
//! CPU, one thread at a time, so that their indexing and arithmetic are tested against the CPU
//! kernels on every machine, GPU or not (`tests/kernels.rs`). What this cannot test: the GPU's
//! own rounding of the intrinsics (the GPU tests do), and the Rust side's launches in
//! `kernels/cuda.rs` (argument order and sizes).
//!
//! Not thread-safe: the emulated thread and block indices are globals, so callers run kernels
//! one at a time ([`launch`] holds a lock).

use std::sync::Mutex;

/// The `SgdTable` of `cuda.cu`: up to 32 tensors' addresses and sizes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SgdTable {
    pub p: [u64; 32],
    pub m: [u64; 32],
    pub g: [u64; 32],
    pub n: [u32; 32],
    pub count: u32,
}

/// The `AdamTable` of `cuda.cu`: up to 32 tensors' addresses (parameter, exp_avg, exp_avg_sq,
/// gradient) and sizes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AdamTable {
    pub p: [u64; 32],
    pub m: [u64; 32],
    pub v: [u64; 32],
    pub g: [u64; 32],
    pub n: [u32; 32],
    pub count: u32,
}

extern "C" {
    fn emulation_set_thread(gx: u32, gy: u32, bx: u32, block_x: u32, block_y: u32, thread_x: u32);
    pub fn max_pool2_forward(x: *const f32, y: *mut f32, planes: u32, h: u32, w: u32);
    pub fn max_pool2_backward(x: *const f32, g: *const f32, dx: *mut f32, planes: u32, h: u32, w: u32);
    pub fn sgd_update_all(t: SgdTable, lr: f32, mu: f32, wd: f32, nesterov: i32);
    #[allow(clippy::too_many_arguments)]
    pub fn adam_update_all(
        t: AdamTable,
        shrink: f32,
        step_size: f32,
        bc2_sqrt: f32,
        beta1_weight: f32,
        beta2: f32,
        one_minus_beta2: f32,
        eps: f32,
        wd: f32,
        decoupled: i32,
        l2: i32,
        lerp_from_start: i32,
    );
    pub fn gather_batch(
        images: *const u8,
        positions: *const u32,
        shifts: *const u32,
        out: *mut f32,
        n: u32,
        c: u32,
        h: u32,
        w: u32,
    );
    pub fn channel_affine(
        x: *const f32,
        scale: *const f32,
        shift: *const f32,
        y: *mut f32,
        total: u32,
        c: u32,
        hw: u32,
        relu: i32,
    );
    pub fn running_stats(
        mean: *const f32,
        var: *const f32,
        batch: *const f32,
        out: *mut f32,
        c: u32,
        keep: f32,
        take: f32,
    );
    pub fn cross_entropy_rows(x: *const f32, labels: *const u32, loss: *mut f32, right: *mut u32, n: u32, k: u32);
    pub fn cross_entropy_sum(loss: *const f32, right: *const u32, out: *mut f32, n: u32);
    pub fn cross_entropy_grad(x: *const f32, labels: *const u32, g: *const f32, dx: *mut f32, n: u32, k: u32);
    pub fn relu_forward(x: *const f32, y: *mut f32, n: u32);
    pub fn relu_in_place(y: *mut f32, n: u32);
    pub fn relu_backward(y: *const f32, g: *const f32, dx: *mut f32, n: u32);
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `kernel` once per thread of a grid of `grid` = (x, y) blocks of `block` threads, in
/// order, as a GPU would run them in some order (the kernels do not depend on it).
pub fn launch(grid: (u32, u32), block: u32, mut kernel: impl FnMut()) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for by in 0..grid.1 {
        for bx in 0..grid.0 {
            for t in 0..block {
                // SAFETY: sets plain globals; the lock keeps other launches out.
                unsafe { emulation_set_thread(grid.0, grid.1, block, bx, by, t) };
                kernel();
            }
        }
    }
}

/// `LaunchConfig::for_num_elems(n)`'s geometry (cudarc): blocks of 1024 threads, enough of them.
pub fn for_num_elems(n: usize, kernel: impl FnMut()) {
    let blocks = n.max(1).div_ceil(1024) as u32;
    launch((blocks, 1), 1024, kernel);
}
