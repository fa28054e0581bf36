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
//! One piece of work runs on the pool at a time; other threads wait for their turn. A worker
//! waiting inside a parallel region takes whatever work is queued, so a second step would
//! otherwise run on top of the first one's stack, and burn's autodiff holds a graph's lock while
//! its backward runs and takes every graph's lock when a backward ends: the second step's end
//! would wait on the first one's lock, held lower on the same thread, for ever.

use std::sync::{Mutex, OnceLock, PoisonError};

use crate::EmberBackend;

/// Stack of each worker. The code of a whole step runs on one, where it ran on the main thread
/// (8 MiB) before; an autodiff graph is dropped node by node, recursively.
const WORKER_STACK_BYTES: usize = 64 << 20;

/// Ember's pool: as many workers as rayon's global pool would have (`RAYON_NUM_THREADS`, else
/// one per CPU), each with [`WORKER_STACK_BYTES`] of stack. `None` when the threads could not be
/// started (the work then runs on the caller's thread, as without the pool).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("ember-worker-{i}"))
            .stack_size(WORKER_STACK_BYTES)
            .build()
            .ok()
    })
    .as_ref()
}

/// Runs `work` on a worker of Ember's thread pool and returns its result; its parallel regions
/// (the host kernels' `par_*` and `gemm`'s) run on that pool. Called from a thread that is already
/// a rayon worker (of any pool), `work` runs right there.
///
/// One piece of work runs on the pool at a time (see the module's docs); a caller waits for
/// the one before it.
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    /// Held while a piece of work runs on the pool.
    static TURN: Mutex<()> = Mutex::new(());
    if rayon::current_thread_index().is_some() {
        return work();
    }
    match pool() {
        Some(pool) => {
            // A panic in an earlier piece of work leaves nothing to repair: the lock guards no data.
            let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
            pool.install(work)
        }
        None => work(),
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
    fn work_runs_on_a_worker_and_its_regions_on_the_same_pool() {
        let outside = rayon::current_thread_index();
        assert_eq!(outside, None, "the test harness thread is no rayon worker");
        let (index, threads, sum) = install(|| {
            let sum: u64 = (0..10_000u64).into_par_iter().map(|i| i * i).sum();
            (rayon::current_thread_index(), rayon::current_num_threads(), sum)
        });
        assert!(index.is_some(), "work ran outside the pool");
        assert_eq!(threads, pool().expect("pool").current_num_threads());
        assert_eq!(sum, (0..10_000u64).map(|i| i * i).sum::<u64>());
        // nested: runs inline on the same worker
        let nested = install(|| {
            let here = rayon::current_thread_index();
            (here, install(rayon::current_thread_index))
        });
        assert_eq!(nested.0, nested.1);
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
