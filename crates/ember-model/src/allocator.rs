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
/// unchanged. glibc caps that threshold at 32 MiB, so larger buffers (the loss's 64 MiB chunks
/// of logits and their gradients) were still mapped afresh: 127 k page faults a step at
/// SmolLM2 256 × 4. Turning `mmap` off for allocations (`M_MMAP_MAX` 0) serves those from the
/// heap too (glibc retries a thread arena's failed request on the main one): 3 k a step, the
/// same peak RSS. Call it first thing in `main`; it is a no-op outside Linux/glibc.
pub fn reuse_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}

/// Budgets entered on any thread: while 0, the allocator skips the thread-local look-up.
static ACTIVE_BUDGETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    /// Bytes this thread may still allocate while a chat template renders; `None` outside.
    static TEMPLATE_BUDGET: std::cell::Cell<Option<isize>> = const { std::cell::Cell::new(None) };
}

/// A memory budget for the chat template rendering on this thread (see [`GuardedAllocator`]).
///
/// A template can build a string of any size in a few instructions (`{% set s = s ~ s %}` in
/// a loop doubles it each time), which no instruction budget catches. While a budget is
/// entered, [`GuardedAllocator`] counts this thread's allocations against it and ends the
/// process with a clear message, exit status 1, when it is spent, before the machine runs out
/// of memory. Without that allocator installed (library users), entering a budget does nothing.
pub struct TemplateMemoryBudget {
    previous: Option<isize>,
}

impl TemplateMemoryBudget {
    /// Starts counting this thread's allocations against `bytes`; ends when dropped.
    pub fn enter(bytes: usize) -> Self {
        ACTIVE_BUDGETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let previous = TEMPLATE_BUDGET.with(|b| b.replace(Some(bytes.min(isize::MAX as usize) as isize)));
        Self { previous }
    }
}

impl Drop for TemplateMemoryBudget {
    fn drop(&mut self) {
        TEMPLATE_BUDGET.with(|b| b.set(self.previous));
        ACTIVE_BUDGETS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The system allocator, plus the per-thread [`TemplateMemoryBudget`]: install it in a binary
/// with `#[global_allocator] static ALLOC: GuardedAllocator = GuardedAllocator;`.
pub struct GuardedAllocator;

impl GuardedAllocator {
    /// Charges `delta` bytes to this thread's template budget, if one is entered.
    fn charge(delta: isize) {
        if ACTIVE_BUDGETS.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
        // `try_with`: the thread-local may already be gone while a thread shuts down.
        let _ = TEMPLATE_BUDGET.try_with(|budget| {
            if let Some(left) = budget.get() {
                let left = left - delta;
                if left < 0 {
                    Self::refuse();
                }
                budget.set(Some(left));
            }
        });
    }

    /// Ends the process: a template used more memory than its budget. Only async-signal-safe
    /// calls here (no allocation can happen inside the allocator).
    fn refuse() -> ! {
        const MESSAGE: &[u8] = b"Error: the chat template used more memory than its budget while rendering \
(a template that builds ever larger strings); refusing it. Nothing was written.\n";
        #[cfg(unix)]
        // SAFETY: write(2) and _exit(2) are async-signal-safe and do not allocate.
        unsafe {
            libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            libc::_exit(1);
        }
        #[cfg(not(unix))]
        std::process::abort();
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the budget only counts.
unsafe impl std::alloc::GlobalAlloc for GuardedAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::charge(layout.size() as isize);
        // SAFETY: the caller's contract is forwarded.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::charge(layout.size() as isize);
        // SAFETY: the caller's contract is forwarded.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        Self::charge(-(layout.size() as isize));
        // SAFETY: the caller's contract is forwarded.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        Self::charge(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract is forwarded.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}
