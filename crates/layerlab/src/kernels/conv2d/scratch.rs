//! Each worker thread's buffers, kept between calls of the convolution's passes.

/// Buffers of one worker thread, kept between calls: the column matrices of a large layer are
/// megabytes, and a fresh allocation each time costs page faults and zero-filling as much as
/// the copies into it.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) cols: Vec<f32>,
    pub(super) mat: Vec<f32>,
    /// The column matrix transposed, [positions, c·k·k], for the weight gradient.
    pub(super) cols_t: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's [`Scratch`]. `f` must not run rayon work itself (every matrix
/// product here is single-threaded), so the buffers are never borrowed twice.
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// The first `len` values of `v`, growing it when needed. Old contents are left in place: every
/// caller overwrites the whole slice.
pub(super) fn resized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}
