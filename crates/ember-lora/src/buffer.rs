//! Output buffers that kernels write in full: no zeroing pass before the kernel.
//!
//! `vec![0f32; len]` costs a pass over fresh memory (memset was 5–7% of a bf16 training step in
//! `perf`); a kernel that writes every value anyway can take its buffer unwritten.

use std::mem::MaybeUninit;

/// A buffer of `len` values left unwritten, for a kernel that writes every value before any is
/// read; [`written`] turns it into values once it has.
pub(crate) fn unwritten(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation; the capacity is `len`.
    unsafe { out.set_len(len) };
    out
}

/// The values of an [`unwritten`] buffer once written.
///
/// # Safety
/// Every value of `out` has been written.
pub(crate) unsafe fn written(out: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: all values are initialised (the caller's contract); MaybeUninit<f32> has f32's
    // layout, so pointer, length and capacity describe a Vec<f32>.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity()) }
}

/// A slice of an [`unwritten`] buffer, read as values once written.
///
/// # Safety
/// Every value of `out` has been written.
pub(crate) unsafe fn written_slice(out: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: all values are initialised (the caller's contract); MaybeUninit<f32> has f32's
    // layout.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}
