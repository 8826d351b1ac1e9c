//! The I/O threads and their queue. Demand reads (an expert a `fetch` is waiting for) go before
//! prefetch reads (an expert a hint guessed); a queued prefetch the next fetch turns out to need
//! is promoted, one it does not need is cancelled before it starts. Each thread reads a chunk,
//! builds the expert's matrices from it and delivers the expert: into the cache if the policy
//! admits it, and to the waiting fetch (or, for a prefetch, to the next fetch of its layer).

use super::io::AlignedBuf;
use std::collections::VecDeque;
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

    pub(crate) fn pop(&mut self) -> Option<usize> {
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

/// What an I/O thread works for (the store): it hands out jobs, reads, and takes the results.
pub(crate) trait Jobs: Send + Sync {
    /// The read a job needs.
    type Output;
    /// The next job, waiting until there is one, marked as being read; `None` once the store
    /// shuts down.
    fn next_job(&self) -> Option<(usize, JobKind)>;
    /// Read `slot` and build what it holds, outside any lock; also returns the stored bytes read.
    fn read(&self, slot: usize, buf: &mut AlignedBuf, zbuf: &mut Vec<u8>) -> (Self::Output, u64);
    /// Hand the finished read over, `busy` seconds after it started.
    fn deliver(&self, slot: usize, kind: JobKind, stored: u64, busy: f64, read: Self::Output);
}

/// One I/O thread: take a job, read and build, deliver; until the store shuts down.
pub(crate) fn worker(jobs: &impl Jobs) {
    let mut buf = AlignedBuf::new();
    let mut zbuf = Vec::new();
    while let Some((slot, kind)) = jobs.next_job() {
        let t0 = Instant::now();
        let (read, stored) = jobs.read(slot, &mut buf, &mut zbuf);
        jobs.deliver(slot, kind, stored, t0.elapsed().as_secs_f64(), read);
    }
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
