//! Shared pieces of the CPU fast paths: raw f32 access to a tensor and one strided matrix
//! product.

use candle_core::{CpuStorage, Layout, Result, Storage};

/// The f32 contents of a contiguous CPU tensor, from its start offset (`op` names the caller in
/// the error).
pub(super) fn f32_slice<'a>(storage: &'a Storage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(data)) = storage else {
        candle_core::bail!("{op}: expected an f32 CPU tensor");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous tensor");
    };
    Ok(&data[start..end])
}

/// A matrix operand: its first element and its row and column strides (in elements).
#[derive(Clone, Copy)]
pub(super) struct Operand {
    pub ptr: *const f32,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `dst (m×n) = scale · lhs (m×k) · rhs (k×n)`, plus the old `dst` when `accumulate`; `dst` is
/// row-major with row stride `dst_row_stride`. `threads` above 1 splits the product on rayon's
/// pool (the sum order of each element does not depend on it).
///
/// # Safety
/// Every operand must be valid for its `m`/`n`/`k` extent and strides, and `dst` must not be
/// written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}
