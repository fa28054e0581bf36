//! Ember's worker threads.
//!
//! The host kernels split their work with rayon. Called from a thread outside rayon's pool
//! (the program's main thread), every parallel region is injected into the pool's shared
//! queue, every worker is woken for it, and the caller sleeps on a lock until the region ends:
//! a few thousand regions per training step, each paying those wake-ups. [`install`] runs a
//! whole step (or forward) on one of the pool's own workers instead: its regions are forked
//! onto that worker's queue and taken by the others as they are free, and nothing sleeps on a
//! lock between them. `bench/README.md` measures the difference on the training step.
//! [`run_for`] does that for the backends whose kernels run on the host.
//!
//! The work runs on one thread, Ember's step thread, which is worker 0 of Ember's pool (the
//! other workers are rayon's own): every step's tensors are then allocated and freed on the
//! same thread, so the C allocator serves them from one arena. Handed to whichever worker was
//! free (`ThreadPool::install`), steps alternated between the workers' arenas, each of which
//! grew to a whole step's peak: +1.2 GB of peak RSS in one f32 run. One piece of work runs at a
//! time, in the order the callers sent it; nothing is ever queued on the pool itself, so a worker
//! waiting inside a parallel region never takes up a second step on top of the first one's stack
//! (burn's autodiff holds a graph's lock while its backward runs and takes every graph's lock
//! when a backward ends: that second step would wait for ever on a lock held lower on the same
//! thread).

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::OnceLock;

use crate::EmberBackend;

/// Stack of the step thread, which runs whole steps where the main thread (8 MiB) ran them
/// before; an autodiff graph is dropped node by node, recursively.
const STEP_STACK_BYTES: usize = 64 << 20;

/// A piece of work sent to the step thread, its borrows' lifetime erased (see [`install`]).
type Job = Box<dyn FnOnce() + Send + 'static>;

thread_local! {
    /// Whether this thread is one of Ember's pool: the step thread or another worker.
    static IN_EMBER_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The step thread's queue, starting the thread and Ember's pool on first use: as many workers
/// as rayon's global pool would have (`RAYON_NUM_THREADS`, else one per CPU), the step thread
/// the first of them. `None` when they could not be started (work then runs on the caller's
/// thread, as without them).
fn step_queue() -> Option<&'static mpsc::Sender<Job>> {
    static QUEUE: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (queue, jobs) = mpsc::channel::<Job>();
            let (started, start) = mpsc::channel::<bool>();
            std::thread::Builder::new()
                .name("ember-step".into())
                .stack_size(STEP_STACK_BYTES)
                .spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .use_current_thread()
                        .thread_name(|i| format!("ember-worker-{i}"))
                        .start_handler(|_| IN_EMBER_POOL.with(|on| on.set(true)))
                        .build();
                    let _ = started.send(pool.is_ok());
                    if pool.is_ok() {
                        IN_EMBER_POOL.with(|on| on.set(true));
                        for job in jobs {
                            job();
                        }
                    }
                })
                .ok()?;
            start.recv().ok().filter(|&ok| ok)?;
            Some(queue)
        })
        .as_ref()
}

/// Runs `work` on Ember's step thread and returns its result (a panic in `work` resumes here);
/// its parallel regions (the host kernels' `par_*` and `gemm`'s) run on Ember's pool. Called on
/// a thread of that pool (the step thread, or a worker inside one of its parallel regions, which
/// would otherwise wait on the step thread that waits on it), `work` runs right there. Callers
/// take turns (see the module's docs).
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if IN_EMBER_POOL.with(|on| on.get()) {
        return work();
    }
    let Some(queue) = step_queue() else {
        return work();
    };
    let (done, result) = mpsc::sync_channel::<std::thread::Result<R>>(1);
    let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
        let _ = done.send(catch_unwind(AssertUnwindSafe(work)));
    });
    // SAFETY: the job's borrows live as long as this call, and this call returns only after
    // `result.recv()` has returned, that is after the job has sent its result (it has run) or
    // has been dropped unrun (its sender dropped with it): no borrow is used after it ends.
    // Only the lifetime differs between the two types.
    let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
    if let Err(mpsc::SendError(job)) = queue.send(job) {
        job();
    }
    match result.recv() {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(mpsc::RecvError) => panic!("Ember's step thread dropped a piece of work unrun"),
    }
}

/// [`install`] for a backend whose kernels run on the host ([`EmberBackend::kernels_on_host`]);
/// on any other, `work` runs on the calling thread (a GPU backend's queue stays with it).
pub fn run_for<B: EmberBackend, R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if B::kernels_on_host() {
        install(work)
    } else {
        work()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn work_runs_on_the_step_thread_and_its_regions_on_the_pool() {
        assert_eq!(
            rayon::current_thread_index(),
            None,
            "the test harness thread is no rayon worker"
        );
        let (thread, index, sum) = install(|| {
            let sum: u64 = (0..10_000u64).into_par_iter().map(|i| i * i).sum();
            (std::thread::current().id(), rayon::current_thread_index(), sum)
        });
        assert_eq!(index, Some(0), "work ran outside the pool, or not on its first worker");
        assert_ne!(thread, std::thread::current().id());
        assert_eq!(sum, (0..10_000u64).map(|i| i * i).sum::<u64>());
        // every piece of work on the same thread (one allocator arena); nested: inline
        let again = install(|| (std::thread::current().id(), install(|| std::thread::current().id())));
        assert_eq!(again, (thread, thread));
        // from inside a parallel region, on whichever worker runs it: inline too
        let inside: Vec<bool> = install(|| {
            (0..64u32)
                .into_par_iter()
                .map(|_| {
                    let here = std::thread::current().id();
                    install(|| std::thread::current().id()) == here
                })
                .collect()
        });
        assert!(inside.iter().all(|&inline| inline));
    }

    #[test]
    fn a_panic_in_the_work_resumes_in_the_caller_and_the_thread_serves_on() {
        let caught = std::panic::catch_unwind(|| install(|| panic!("in the work")));
        let message = caught
            .expect_err("the panic came back")
            .downcast::<&str>()
            .expect("its message");
        assert_eq!(*message, "in the work");
        assert_eq!(install(|| 7), 7);
    }

    /// Threads that install work at the same time take turns: no piece of work starts while
    /// another one runs (a worker waiting in a parallel region would otherwise take the other
    /// piece up on its own stack).
    #[test]
    fn concurrent_callers_take_turns() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..20 {
                        install(|| {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let sum: u64 = (0..200_000u64).into_par_iter().map(|i| i % 7).sum();
                            running.fetch_sub(1, Ordering::SeqCst);
                            sum
                        });
                    }
                });
            }
        });
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "two pieces of work ran on the pool at once"
        );
    }

    #[test]
    fn host_backends_run_on_the_pool() {
        type Cpu = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
        assert!(<Cpu as EmberBackend>::kernels_on_host());
        assert!(run_for::<Cpu, _>(rayon::current_thread_index).is_some());
    }
}
