//! The store's state under its lock: one slot per (layer, expert), the cache's bytes and the
//! counters, and the bookkeeping every path through the store shares: admission into the cache,
//! delivery of a finished read, handing a failure to its waiters, and releasing a slot.

use super::live::Resident;
use super::policy::Policy;
use super::prefetch::{IoState, JobKind, JobQueue};
use super::stats::{DiskStats, Mode, PrefetchStats, TierStats};
use super::tiers::DeviceResidency;
use crate::error::Error;
use std::sync::Arc;

/// One (layer, expert).
pub(crate) struct Slot {
    pub(crate) cached: Option<Arc<Resident>>,
    pub(crate) pinned: bool,
    pub(crate) io: IoState,
    /// Read but not (only) in the cache: waiting for the fetch that wants it, or a prefetch
    /// waiting for the next fetch of its layer.
    pub(crate) landed: Option<Arc<Resident>>,
    pub(crate) failed: Option<Error>,
    /// A hint queued a read for it that the next fetch of its layer has not judged yet.
    pub(crate) prefetched: bool,
    /// Fetches waiting for its read.
    pub(crate) want: u32,
    /// Runtime bytes (from the manifest until it is first read).
    pub(crate) bytes: u64,
}

impl Slot {
    pub(crate) fn new(bytes: u64) -> Slot {
        Slot {
            cached: None,
            pinned: false,
            io: IoState::Idle,
            landed: None,
            failed: None,
            prefetched: false,
            want: 0,
            bytes,
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) fetches: u64,
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
    pub(crate) gpu: TierStats,
    pub(crate) ram: TierStats,
    pub(crate) disk: DiskStats,
    pub(crate) load_bytes: u64,
    pub(crate) prefetch: PrefetchStats,
    pub(crate) stall_seconds: f64,
    pub(crate) load_seconds: f64,
    pub(crate) peak_cached_bytes: u64,
    pub(crate) evictions: u64,
    pub(crate) not_admitted: u64,
}

pub(crate) struct State {
    pub(crate) n_experts: usize,
    pub(crate) mode: Mode,
    pub(crate) budget: u64,
    pub(crate) slots: Vec<Slot>,
    pub(crate) queue: JobQueue,
    pub(crate) shutdown: bool,
    pub(crate) policy: Policy,
    /// Forward steps so far: each fetch advances it by 1 / n_layers.
    pub(crate) clock: f64,
    pub(crate) cached_bytes: u64,
    pub(crate) counters: Counters,
    pub(crate) device: Option<Arc<dyn DeviceResidency>>,
    /// Per layer: the experts the last hint for it named, until its next fetch judges them.
    pub(crate) hints: Vec<Vec<usize>>,
}

impl State {
    /// Whether the device tier holds expert `e` of `layer`.
    pub(crate) fn on_device(&self, layer: usize, e: usize) -> bool {
        self.device.as_ref().is_some_and(|d| d.holds(layer, e))
    }

    /// Queue a read of `slot` (the caller has checked that none is queued or running).
    pub(crate) fn queue_read(&mut self, slot: usize, kind: JobKind) {
        self.slots[slot].io = IoState::Queued(kind);
        self.queue.push(slot, kind);
    }

    /// Record a finished read: into the cache if the policy admits it, and kept for whoever
    /// waits for it.
    pub(crate) fn deliver(&mut self, slot: usize, kind: JobKind, stored: u64, busy: f64, result: crate::error::Result<Resident>) {
        self.slots[slot].io = IoState::Idle;
        let d = &mut self.counters.disk;
        d.reads += 1;
        d.busy_seconds += busy;
        match kind {
            JobKind::Demand => d.demand_reads += 1,
            JobKind::Prefetch => d.prefetch_reads += 1,
            JobKind::Load => d.load_reads += 1,
        }
        if kind == JobKind::Load {
            self.counters.load_bytes += stored;
        } else {
            d.bytes += stored;
        }
        let expert = match result {
            Ok(e) => Arc::new(e),
            Err(e) => {
                self.counters.disk.errors += 1;
                self.slots[slot].failed = Some(e);
                return;
            }
        };
        self.slots[slot].failed = None;
        self.slots[slot].bytes = expert.nbytes();
        let admitted = self.admit(slot, &expert, kind == JobKind::Load);
        let s = &mut self.slots[slot];
        // A waiting fetch takes its copy from `landed` (also when it was admitted, so that the
        // cache cannot evict it between this delivery and the fetch waking up).
        // A prefetch that the next fetch of its layer already judged unneeded (it was reading
        // then) is not kept outside the cache: nobody would ever collect it.
        if s.want > 0 || (kind == JobKind::Prefetch && s.prefetched && !admitted) {
            s.landed = Some(expert);
        }
    }

    /// Put a freshly read expert into the cache if the budget and the policy allow; `forced`
    /// (a pin or the initial load) goes in whatever the policy says.
    pub(crate) fn admit(&mut self, slot: usize, expert: &Arc<Resident>, forced: bool) -> bool {
        if self.mode == Mode::NoCache {
            return false;
        }
        if self.on_device(slot / self.n_experts, slot % self.n_experts) {
            return false;
        }
        let need = expert.nbytes();
        let free = self.budget.saturating_sub(self.cached_bytes);
        let candidates: Vec<(usize, u64)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != slot && !s.pinned)
            .filter_map(|(i, s)| s.cached.as_ref().filter(|a| Arc::strong_count(a) == 1).map(|a| (i, a.nbytes())))
            .collect();
        let newcomer = if forced { f64::INFINITY } else { self.policy.score(slot, self.clock) };
        let victims = match self.policy.victims(&candidates, free, need, newcomer, self.clock) {
            Some(v) => v,
            // A pinned or initially loaded expert goes in even if the experts in use cannot make
            // room right now; the cache is over budget until they are released and evicted.
            None if forced => candidates.iter().map(|c| c.0).collect(),
            None => {
                self.counters.not_admitted += 1;
                return false;
            }
        };
        for v in victims {
            if let Some(a) = self.slots[v].cached.take() {
                self.cached_bytes -= a.nbytes();
                self.counters.evictions += 1;
            }
        }
        self.slots[slot].cached = Some(expert.clone());
        self.cached_bytes += need;
        self.counters.peak_cached_bytes = self.counters.peak_cached_bytes.max(self.cached_bytes);
        true
    }

    /// Hand a failure to one of the slot's waiters; the last waiter clears it.
    pub(crate) fn take_failure(&mut self, slot: usize) -> Option<Error> {
        let s = &mut self.slots[slot];
        let e = s.failed.as_ref()?;
        let out = copy_error(e);
        if s.want <= 1 {
            s.failed = None;
        }
        Some(out)
    }

    /// A failure for a caller that was not waiting for the read (a failed prefetch found by the
    /// fetch that needs it): handed over as to one more waiter.
    pub(crate) fn report_failure(&mut self, slot: usize) -> Option<Error> {
        self.slots[slot].want += 1;
        let e = self.take_failure(slot);
        self.slots[slot].want -= 1;
        e
    }

    /// A waiter got what it waited for (the expert or its failure).
    pub(crate) fn release(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.want -= 1;
        if s.want == 0 {
            s.landed = None;
        }
    }

    /// A waiter stopped waiting before its read landed.
    pub(crate) fn abandon(&mut self, slot: usize) {
        self.slots[slot].want -= 1;
        self.forget_if_unwanted(slot);
    }

    /// Drop what a read left outside the cache when nobody waits for it.
    pub(crate) fn forget_if_unwanted(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if s.want == 0 {
            s.landed = None;
            s.failed = None;
        }
    }
}

/// A copy of an error for a second reader of the same failure (errors are not `Clone`).
fn copy_error(e: &Error) -> Error {
    match e {
        Error::Io { path, source } => Error::io(path.clone(), std::io::Error::new(source.kind(), source.to_string())),
        Error::BadFile { path, msg } => Error::bad_file(path.clone(), msg.clone()),
        Error::BadTensor { tensor, msg } => Error::bad_tensor(tensor.clone(), msg.clone()),
        other => Error::Invalid(other.to_string()),
    }
}
