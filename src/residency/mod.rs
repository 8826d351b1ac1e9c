//! Expert residency: run a model whose experts do not fit in RAM. Hot experts stay resident, cold
//! ones are read from the converted model's chunks when the router asks for them, and reads for
//! the next layer's likely experts overlap with this layer's compute.
//!
//! The model sees the store as an [`ExpertSource`] (experts as they land, and a hook for its
//! guess of the next layer's experts), which comes down to three calls:
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
//! Submodules: `store` (the store and its `fetch`), `state` (the bookkeeping under the store's
//! lock: admission, delivery, failures, releasing slots), [`policy`] (decayed frequency,
//! admission), [`io`] (read paths, page cache), [`prefetch`] (I/O threads and their queue),
//! `live` (handles on resident experts and their byte count), `source` (what the model sees),
//! [`stats`], [`tiers`] (the GPU seam), [`plan`] (where each part of a model goes on given
//! hardware and what decode speed to expect).

pub mod io;
mod live;
pub mod plan;
pub mod policy;
pub mod prefetch;
pub mod replay;
mod source;
mod state;
pub mod stats;
mod store;
pub mod tiers;
pub mod trace;

pub use crate::expert::Expert;
pub use io::ReadPath;
pub use live::ExpertRef;
pub use plan::{plan, Hardware, Plan, PlanInput, Routing};
pub use source::ExpertSource;
pub use stats::{Mode, StoreStats};
pub use store::{ExpertStore, Fetch, StoreOptions};
pub use tiers::{DeviceResidency, Tier};
