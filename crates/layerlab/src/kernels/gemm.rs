//! The matrix product under every CPU kernel: the `gemm` crate, single-threaded, on strided f32
//! slices.

/// `dst` [m, n] (row stride `dst_rs`) = `lhs` [m, k] · `rhs` [k, n], plus `dst` when
/// `accumulate`; `lhs` and `rhs` are given with (row, column) strides. Single-threaded: the
/// callers parallelise over chunks, which keeps results independent of the thread count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n, "matmul: dst too small");
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs, "matmul: lhs too small");
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs, "matmul: rhs too small");
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and
    // `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
