//! Experts alive in this process: the cache's copies and the handles the model computes with,
//! counted in bytes so that `StoreStats::peak_live_bytes` measures the whole working set.

use crate::error::Result;
use crate::expert::Expert;
use crate::format::manifest::ExpertChunk;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An expert read by the store, with its share of the live byte count.
pub(crate) struct Resident {
    expert: Expert,
    _live: LiveGuard,
}

impl Resident {
    /// Build from a raw (decompressed) chunk.
    pub(crate) fn from_chunk(chunk: &ExpertChunk, raw: &[u8], live: &Arc<LiveBytes>) -> Result<Resident> {
        let expert = Expert::from_chunk(chunk, raw)?;
        let bytes = expert.nbytes() as u64;
        Ok(Resident { expert, _live: LiveGuard::new(live.clone(), bytes) })
    }

    pub(crate) fn nbytes(&self) -> u64 {
        self.expert.nbytes() as u64
    }
}

/// A shared handle on a resident expert; the expert lives as long as any handle does.
/// Eviction drops the cache's handle, never the model's.
#[derive(Clone)]
pub struct ExpertRef(pub(crate) Arc<Resident>);

impl std::ops::Deref for ExpertRef {
    type Target = Expert;
    fn deref(&self) -> &Expert {
        &self.0.expert
    }
}

impl ExpertRef {
    /// Whether two handles share one copy of an expert.
    pub fn ptr_eq(a: &ExpertRef, b: &ExpertRef) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl std::fmt::Debug for ExpertRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.expert.fmt(f)
    }
}

/// Bytes of expert matrices alive in this process, and their peak.
#[derive(Debug, Default)]
pub(crate) struct LiveBytes {
    now: AtomicU64,
    peak: AtomicU64,
}

impl LiveBytes {
    pub(crate) fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

struct LiveGuard {
    counter: Arc<LiveBytes>,
    bytes: u64,
}

impl LiveGuard {
    fn new(counter: Arc<LiveBytes>, bytes: u64) -> LiveGuard {
        let now = counter.now.fetch_add(bytes, Ordering::Relaxed) + bytes;
        counter.peak.fetch_max(now, Ordering::Relaxed);
        LiveGuard { counter, bytes }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.counter.now.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
