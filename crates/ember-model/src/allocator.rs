//! Process-wide allocator settings for tensor workloads.

/// Largest request glibc may serve from its heap instead of a fresh `mmap` (its upper limit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Freed memory glibc keeps before giving the top of its heap back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Lets the C allocator reuse freed tensor buffers instead of returning them to the kernel.
///
/// A CPU training step allocates and frees thousands of multi-megabyte tensors. glibc's default
/// maps each one larger than its adaptive threshold afresh and unmaps it on free, so every
/// step pays page faults and the kernel zeroing every page (15% of a SmolLM2 step in `perf`,
/// 5.9 → 4.8 s/step measured with this setting; see bench/README.md). Keeping buffers up to
/// 32 MiB on the heap and not trimming below 1 GiB of free memory avoids that; peak memory is
/// unchanged. Call it first thing in `main`; it is a no-op outside Linux/glibc.
pub fn reuse_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
