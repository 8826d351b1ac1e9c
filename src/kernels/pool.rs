//! A persistent pool of kernel threads. A decode step runs hundreds of matrix-vector products of
//! well under a millisecond each, so handing out work must cost about a microsecond: workers spin
//! on an epoch counter for a while after each job, then yield, and only then sleep on a condvar.
//!
//! The calling thread is worker 0, so `threads() == n` means n busy cores. The pool serves one
//! caller at a time; a call that finds it busy (another thread, or a kernel calling a kernel)
//! runs its job alone on its own thread instead of queueing or oversubscribing.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// After a job, spin this long (cheapest wake-up) ...
const SPIN: Duration = Duration::from_micros(300);
/// ... then yield the core to others for this long before sleeping.
const YIELD: Duration = Duration::from_millis(3);

/// 0 = not set: use the number of available cores.
static WANTED: AtomicUsize = AtomicUsize::new(0);
static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Set the number of threads the kernels use (the caller included). Takes effect at the next
/// kernel call; `0` restores the default, the number of available cores.
pub fn set_threads(n: usize) {
    WANTED.store(n, Ordering::SeqCst);
}

/// The number of threads the kernels use.
pub fn threads() -> usize {
    match WANTED.load(Ordering::SeqCst) {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Run `job(i, n)` for i in 0..n on n threads, n = `threads()` (or 1 when the pool is busy), and
/// return when all are done.
pub(crate) fn run(job: Job<'_>) {
    let want = threads();
    if want <= 1 {
        return job(0, 1);
    }
    let mut guard = match POOL.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) => return job(0, 1),
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
    };
    if guard.as_ref().map(|p| p.workers.len() + 1) != Some(want) {
        *guard = None; // joins the old workers first
        *guard = Some(Pool::new(want - 1));
    }
    guard.as_ref().unwrap().dispatch(job);
}

struct Shared {
    epoch: AtomicU64,
    /// The current job, valid while workers are counted in `pending`.
    job: UnsafeCell<Option<Job<'static>>>,
    nthreads: usize,
    pending: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

// `job` is written only by the dispatcher while no worker reads it (between jobs).
unsafe impl Sync for Shared {}

struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(nworkers: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            nthreads: nworkers + 1,
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let workers = (1..=nworkers)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("grok1-kernel-{i}"))
                    .spawn(move || worker(&s, i))
                    .expect("cannot spawn a kernel thread")
            })
            .collect();
        Pool { shared, workers }
    }

    fn dispatch(&self, job: Job<'_>) {
        let s = &*self.shared;
        // Lifetime erased: this function does not return before every worker is done with it.
        let job: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        unsafe { *s.job.get() = Some(job) };
        s.pending.store(self.workers.len(), Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0, s.nthreads)));
        while s.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        unsafe { *s.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a kernel thread panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, index: usize) {
    // Epoch 0 is the pool's birth; a job may be published before this thread first looks.
    let mut seen = 0;
    loop {
        seen = wait_for_epoch(s, seen);
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let job = unsafe { (*s.job.get()).expect("job published with the epoch") };
        if catch_unwind(AssertUnwindSafe(|| job(index, s.nthreads))).is_err() {
            s.panicked.store(true, Ordering::SeqCst);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Wait until the epoch moves past `seen`; returns the new epoch.
fn wait_for_epoch(s: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let e = s.epoch.load(Ordering::Acquire);
        if e != seen {
            return e;
        }
        spins = spins.wrapping_add(1);
        if spins % 256 != 0 {
            std::hint::spin_loop();
            continue;
        }
        let waited = start.elapsed();
        if waited < SPIN {
            continue;
        }
        if waited < SPIN + YIELD {
            std::thread::yield_now();
            continue;
        }
        let mut g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        loop {
            let e = s.epoch.load(Ordering::SeqCst);
            if e != seen {
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                return e;
            }
            g = s.wake.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}
