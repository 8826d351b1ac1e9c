//! The I/O threads and their queue. Demand reads (an expert a `fetch` is waiting for) go before
//! prefetch reads (an expert a hint guessed); a queued prefetch the next fetch turns out to need
//! is promoted, one it does not need is cancelled before it starts. Each thread reads a chunk,
//! builds the expert's matrices from it and delivers the expert: into the cache if the policy
//! admits it, and to the waiting fetch (or, for a prefetch, to the next fetch of its layer).

use super::store::{Shared, State};
use super::{copy_error, Expert, Mode};
use crate::error::Result;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    /// A fetch is waiting for it.
    Demand,
    /// Guessed by a hint; nobody waits yet.
    Prefetch,
    /// Initial load or pin: goes into the cache unconditionally.
    Load,
}

/// Where a slot's read stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoState {
    Idle,
    Queued(JobKind),
    Reading(JobKind),
}

#[derive(Debug, Default)]
pub(crate) struct JobQueue {
    urgent: VecDeque<usize>,
    speculative: VecDeque<usize>,
}

impl JobQueue {
    pub(crate) fn push(&mut self, slot: usize, kind: JobKind) {
        match kind {
            JobKind::Demand | JobKind::Load => self.urgent.push_back(slot),
            JobKind::Prefetch => self.speculative.push_back(slot),
        }
    }

    fn pop(&mut self) -> Option<usize> {
        self.urgent.pop_front().or_else(|| self.speculative.pop_front())
    }

    /// Move a queued prefetch to the end of the urgent queue.
    pub(crate) fn promote(&mut self, slot: usize) {
        if let Some(i) = self.speculative.iter().position(|&s| s == slot) {
            self.speculative.remove(i);
            self.urgent.push_back(slot);
        }
    }

    /// Drop a queued prefetch; true if it was queued.
    pub(crate) fn cancel(&mut self, slot: usize) -> bool {
        match self.speculative.iter().position(|&s| s == slot) {
            Some(i) => {
                self.speculative.remove(i);
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.speculative.is_empty()
    }
}

/// One I/O thread: take a job, read and build outside the lock, deliver under it.
pub(crate) fn worker(shared: Arc<Shared>) {
    let mut buf = super::io::AlignedBuf::new();
    let mut zbuf = Vec::new();
    loop {
        let (slot, kind) = {
            let mut st = shared.state.lock().unwrap();
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(s) = st.queue.pop() {
                    let IoState::Queued(kind) = st.slots[s].io else {
                        unreachable!("slot {s} in the queue is not queued")
                    };
                    st.slots[s].io = IoState::Reading(kind);
                    break (s, kind);
                }
                st = shared.work.wait(st).unwrap();
            }
        };
        let (layer, expert) = (slot / shared.n_experts, slot % shared.n_experts);
        let chunk = shared.model.expert_chunk(layer, expert);
        let t0 = Instant::now();
        let result: Result<Expert> = shared.reader.with_raw(&shared.model, chunk, &mut buf, &mut zbuf, |raw| {
            Expert::from_chunk(chunk, raw, &shared.live)
        });
        let busy = t0.elapsed().as_secs_f64();
        let mut st = shared.state.lock().unwrap();
        deliver(&mut st, slot, kind, chunk.bytes, busy, result.map(Arc::new));
        drop(st);
        shared.landed.notify_all();
    }
}

fn deliver(st: &mut State, slot: usize, kind: JobKind, stored: u64, busy: f64, result: Result<Arc<Expert>>) {
    st.slots[slot].io = IoState::Idle;
    let d = &mut st.counters.disk;
    d.reads += 1;
    d.busy_seconds += busy;
    match kind {
        JobKind::Demand => d.demand_reads += 1,
        JobKind::Prefetch => d.prefetch_reads += 1,
        JobKind::Load => d.load_reads += 1,
    }
    if kind == JobKind::Load {
        st.counters.load_bytes += stored;
    } else {
        d.bytes += stored;
    }
    let expert = match result {
        Ok(e) => e,
        Err(e) => {
            st.counters.disk.errors += 1;
            st.slots[slot].failed = Some(e);
            return;
        }
    };
    st.slots[slot].failed = None;
    st.slots[slot].bytes = expert.nbytes();
    let admitted = admit(st, slot, &expert, kind == JobKind::Load);
    let s = &mut st.slots[slot];
    // A waiting fetch takes its copy from `landed` (also when it was admitted, so that the cache
    // cannot evict it between this delivery and the fetch waking up).
    // A prefetch that the next fetch of its layer already judged unneeded (it was reading then)
    // is not kept outside the cache: nobody would ever collect it.
    if s.want > 0 || (kind == JobKind::Prefetch && s.prefetched && !admitted) {
        s.landed = Some(expert);
    }
}

/// Put a freshly read expert into the cache if the budget and the policy allow.
pub(crate) fn admit(st: &mut State, slot: usize, expert: &Arc<Expert>, forced: bool) -> bool {
    if st.mode == Mode::NoCache {
        return false;
    }
    let (layer, e) = (slot / st.n_experts, slot % st.n_experts);
    if st.device.as_ref().is_some_and(|d| d.holds(layer, e)) {
        return false;
    }
    let need = expert.nbytes();
    let free = st.budget.saturating_sub(st.cached_bytes);
    let candidates: Vec<(usize, u64)> = st
        .slots
        .iter()
        .enumerate()
        .filter(|(i, s)| *i != slot && !s.pinned)
        .filter_map(|(i, s)| s.cached.as_ref().filter(|a| Arc::strong_count(a) == 1).map(|a| (i, a.nbytes())))
        .collect();
    let newcomer = if forced { f64::INFINITY } else { st.policy.score(slot, st.clock) };
    let victims = match st.policy.victims(&candidates, free, need, newcomer, st.clock) {
        Some(v) => v,
        // A pinned or initially loaded expert goes in even if the experts in use cannot make
        // room right now; the cache is over budget until they are released and evicted.
        None if forced => candidates.iter().map(|c| c.0).collect(),
        None => {
            st.counters.not_admitted += 1;
            return false;
        }
    };
    for v in victims {
        if let Some(a) = st.slots[v].cached.take() {
            st.cached_bytes -= a.nbytes();
            st.counters.evictions += 1;
        }
    }
    st.slots[slot].cached = Some(expert.clone());
    st.cached_bytes += need;
    st.counters.peak_cached_bytes = st.counters.peak_cached_bytes.max(st.cached_bytes);
    true
}

/// Hand a failure to one waiter; the last waiter clears it.
pub(crate) fn take_failure(st: &mut State, slot: usize) -> Option<crate::error::Error> {
    let s = &mut st.slots[slot];
    let e = s.failed.as_ref()?;
    let out = copy_error(e);
    if s.want <= 1 {
        s.failed = None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urgent_jobs_go_first_and_prefetches_can_be_promoted_or_cancelled() {
        let mut q = JobQueue::default();
        q.push(1, JobKind::Prefetch);
        q.push(2, JobKind::Prefetch);
        q.push(3, JobKind::Demand);
        q.promote(2);
        assert!(q.cancel(1));
        assert!(!q.cancel(3));
        assert_eq!(q.pop(), Some(3));
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), None);
        assert!(q.is_empty());
    }
}
