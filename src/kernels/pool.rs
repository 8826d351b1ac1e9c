//! A persistent pool of kernel threads. A decode step runs hundreds of matrix-vector products of
//! well under a millisecond each, so handing out work must cost about a microsecond: workers spin
//! on an epoch counter for a while after each job, then yield, and only then sleep on a condvar.
//!
//! The calling thread works too, so `threads() == n` means n busy cores. The pool serves one
//! caller at a time; a call that finds it busy (another thread, or a kernel calling a kernel)
//! runs its job alone on its own thread instead of queueing or oversubscribing.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// After a job, spin this long (cheapest wake-up) ...
const SPIN: Duration = Duration::from_micros(200);
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
    // Asked once: the standard library reads cgroup files to answer, tens of microseconds.
    static CORES: OnceLock<usize> = OnceLock::new();
    match WANTED.load(Ordering::Relaxed) {
        0 => *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        n => n,
    }
}

type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// Run `job(c)` for every chunk c in 0..chunks, spread over `threads()` threads (the caller's
/// included), and return when all are done. Threads take chunks in order from a shared counter,
/// so a thread that the OS has not scheduled (a busy machine) leaves its share to the others
/// instead of stalling the call. This is the pool the matrix kernels use: other parallel work of
/// the model can share it instead of oversubscribing the cores with a second pool.
pub fn run(chunks: usize, job: Job<'_>) {
    let want = threads();
    if want <= 1 || chunks <= 1 {
        return (0..chunks).for_each(job);
    }
    let mut guard = match POOL.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) => return (0..chunks).for_each(job),
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
    };
    if guard.as_ref().map(|p| p.workers.len() + 1) != Some(want) {
        *guard = None; // joins the old workers first
        *guard = Some(Pool::new(want - 1));
    }
    guard.as_ref().unwrap().dispatch(chunks, job);
}

/// In `Shared::gate`: the job's epoch in the upper half, this bit once the dispatcher stops
/// admitting workers, and the number admitted in the low bits.
const CLOSED: u64 = 1 << 31;

struct Shared {
    epoch: AtomicU64,
    gate: AtomicU64,
    /// The current job, valid while admitted workers have not all reported `done`.
    job: UnsafeCell<Option<Job<'static>>>,
    chunks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

// `job` is written only by the dispatcher while no admitted worker can read it.
unsafe impl Sync for Shared {}

struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(nworkers: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            gate: AtomicU64::new(CLOSED),
            job: UnsafeCell::new(None),
            chunks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
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
                    .spawn(move || worker(&s))
                    .expect("cannot spawn a kernel thread")
            })
            .collect();
        Pool { shared, workers }
    }

    fn dispatch(&self, chunks: usize, job: Job<'_>) {
        let s = &*self.shared;
        // Lifetime erased: this function returns only after every admitted worker is done with
        // it, and admits no more.
        let job: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        unsafe { *s.job.get() = Some(job) };
        s.chunks.store(chunks, Ordering::SeqCst);
        s.next.store(0, Ordering::SeqCst);
        s.done.store(0, Ordering::SeqCst);
        let epoch = s.epoch.load(Ordering::SeqCst) + 1;
        s.gate.store((epoch as u32 as u64) << 32, Ordering::SeqCst);
        s.epoch.store(epoch, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| take_chunks(s, job)));
        let admitted = (s.gate.fetch_or(CLOSED, Ordering::SeqCst) & (CLOSED - 1)) as usize;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) != admitted {
            spins = spins.wrapping_add(1);
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                // An admitted worker was descheduled mid-chunk: let the OS run it.
                std::thread::yield_now();
            }
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

fn take_chunks(s: &Shared, job: Job<'_>) {
    let chunks = s.chunks.load(Ordering::Relaxed);
    loop {
        let c = s.next.fetch_add(1, Ordering::Relaxed);
        if c >= chunks {
            return;
        }
        job(c);
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

fn worker(s: &Shared) {
    let mut seen = 0;
    loop {
        seen = wait_for_epoch(s, seen);
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        // Join the job only while its gate is open; a job already closed is finished or about
        // to be, and its closure may be gone.
        let mut g = s.gate.load(Ordering::SeqCst);
        let admitted = loop {
            if g >> 32 != seen as u32 as u64 || g & CLOSED != 0 {
                break false;
            }
            match s.gate.compare_exchange_weak(g, g + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break true,
                Err(now) => g = now,
            }
        };
        if !admitted {
            continue;
        }
        let job = unsafe { (*s.job.get()).expect("job published with the epoch") };
        if catch_unwind(AssertUnwindSafe(|| take_chunks(s, job))).is_err() {
            s.panicked.store(true, Ordering::SeqCst);
        }
        s.done.fetch_add(1, Ordering::Release);
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
        if !spins.is_multiple_of(256) {
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
