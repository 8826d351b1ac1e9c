//! Expert residency: run a model whose experts do not fit in RAM. Hot experts stay resident, cold
//! ones are read from the converted model's chunks when the router asks for them, and reads for
//! the next layer's likely experts overlap with this layer's compute.
//!
//! The model talks to an [`ExpertStore`] through three calls:
//!
//! ```text
//! for layer in 0..n_layers {
//!     ... attention, then the router picks `needed` (decode: 2 of 8; prefill: the batch's set)
//!     store.hint_next_layer(layer + 1, &guess);     // guess: layer+1's router on this hidden state
//!     for item in store.fetch(layer, &needed) {      // resident experts first, then reads as they land
//!         let (e, expert) = item?;                   // expert: ExpertRef -> Expert { gate, up, down }
//!         ... compute expert e's contribution
//!     }
//! }
//! store.advance(n_tokens);                           // for per-token statistics
//! ```
//!
//! An [`ExpertRef`] holds its expert by `Arc`: eviction drops the cache's reference, never the
//! model's, and the cache does not even choose experts still referenced as victims.
//!
//! Memory: the RAM budget bounds the bytes of the runtime matrices the cache keeps (pinned
//! experts included). Beyond it, only the working set is alive: experts being read (one per I/O
//! thread), experts the model holds while computing one layer, and prefetched experts waiting
//! for their layer (at most the hinted ones). `StoreStats::peak_live_bytes` measures all of it.
//! The kernel's page cache does not hold experts on our behalf: reads use `O_DIRECT`, or drop
//! the pages they read (`POSIX_FADV_DONTNEED`), see [`io`].
//!
//! Submodules: [`policy`] (decayed frequency, admission), [`io`] (read paths, page cache),
//! [`prefetch`] (I/O threads and their queue), [`stats`], [`tiers`] (the GPU seam), [`plan`]
//! (where each part of a model goes on given hardware and what decode speed to expect).

pub mod io;
pub mod plan;
pub mod policy;
pub mod prefetch;
pub mod stats;
mod store;
pub mod tiers;

pub use io::ReadPath;
pub use plan::{parse_size, plan, Hardware, Plan, PlanInput, Routing};
pub use stats::{Mode, StoreStats};
pub use store::{ExpertStore, Fetch};
pub use tiers::{DeviceResidency, Tier};

use crate::checkpoint::{Proj, Tensor};
use crate::error::{Error, Result};
use crate::format::manifest::{ExpertChunk, ProjName};
use crate::kernels::Matrix;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One expert's weights, as the model computes with them.
pub struct Expert {
    /// `[ffn, d_model]`, the GELU branch.
    pub gate: Matrix,
    /// `[ffn, d_model]`, the linear branch.
    pub up: Matrix,
    /// `[d_model, ffn]`.
    pub down: Matrix,
    live: LiveGuard,
}

impl Expert {
    /// Bytes of the three matrices' storage.
    pub fn nbytes(&self) -> u64 {
        (self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()) as u64
    }

    /// Build from a raw (decompressed) chunk.
    pub(crate) fn from_chunk(chunk: &ExpertChunk, raw: &[u8], live: &Arc<LiveBytes>) -> Result<Expert> {
        let part = |proj| chunk_matrix(chunk, raw, proj);
        let (gate, up, down) = (part(Proj::Gate)?, part(Proj::Up)?, part(Proj::Down)?);
        let bytes = (gate.nbytes() + up.nbytes() + down.nbytes()) as u64;
        Ok(Expert { gate, up, down, live: LiveGuard::new(live.clone(), bytes) })
    }
}

/// One projection of an expert, from the raw (decompressed) bytes of its chunk.
pub fn chunk_matrix(chunk: &ExpertChunk, raw: &[u8], proj: Proj) -> Result<Matrix> {
    let name = || Tensor::Expert { layer: chunk.layer, expert: chunk.expert, proj }.to_string();
    let t = chunk
        .tensors
        .iter()
        .find(|t| t.proj == ProjName::from(proj))
        .ok_or_else(|| Error::bad_tensor(name(), "missing from its expert chunk"))?;
    if t.shape.len() != 2 {
        return Err(Error::bad_tensor(name(), format!("shape {:?}, expected a matrix", t.shape)));
    }
    let bytes = raw
        .get(t.offset as usize..(t.offset + t.bytes) as usize)
        .ok_or_else(|| Error::bad_tensor(name(), "lies past the end of its chunk"))?;
    Matrix::from_bytes(t.qtype, t.shape[0], t.shape[1], bytes).map_err(|e| Error::bad_tensor(name(), e.to_string()))
}

impl std::fmt::Debug for Expert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expert {{ {} bytes }}", self.live.bytes)
    }
}

/// A shared handle on a resident expert; the expert lives as long as any handle does.
#[derive(Clone, Debug)]
pub struct ExpertRef(Arc<Expert>);

impl std::ops::Deref for ExpertRef {
    type Target = Expert;
    fn deref(&self) -> &Expert {
        &self.0
    }
}

impl ExpertRef {
    /// Whether two handles share one copy of an expert.
    pub fn ptr_eq(a: &ExpertRef, b: &ExpertRef) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
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

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Bytes of runtime expert matrices the cache may keep. A budget holding every expert
    /// selects `Mode::AllInRam`.
    pub ram_budget: u64,
    /// The benchmark baseline: no cache, no prefetch, every request read when asked for.
    pub no_cache: bool,
    pub read_path: ReadPath,
    /// Threads doing reads (and building the matrices from what they read).
    pub io_threads: usize,
    /// Forward steps after which an unused expert's score halves (see [`policy`]).
    pub half_life_steps: f64,
    /// Act on `hint_next_layer` (off: hints are counted but read nothing).
    pub prefetch: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ram_budget: 0,
            no_cache: false,
            read_path: ReadPath::Direct,
            io_threads: 2,
            half_life_steps: 64.0,
            prefetch: true,
        }
    }
}

/// A copy of an error for a second reader of the same failure (errors are not `Clone`).
pub(crate) fn copy_error(e: &Error) -> Error {
    match e {
        Error::Io { path, source } => Error::io(path.clone(), std::io::Error::new(source.kind(), source.to_string())),
        Error::BadFile { path, msg } => Error::bad_file(path.clone(), msg.clone()),
        Error::BadTensor { tensor, msg } => Error::bad_tensor(tensor.clone(), msg.clone()),
        other => Error::Invalid(other.to_string()),
    }
}
