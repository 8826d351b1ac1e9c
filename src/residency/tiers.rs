//! The tiers an expert can live in, fastest first, and the seam where a GPU tier plugs in.
//!
//! Dense weights are always resident and are not handled here. Experts live in one of:
//! * `Gpu`: held by a device module that computes them in place. The store does not own device
//!   memory; a device tier tells it which experts it holds through [`DeviceResidency`], and
//!   `ExpertStore::fetch` then skips those (the model runs them on the device) and counts them
//!   as GPU hits. `ExpertStore::hottest` gives the device tier the experts most worth uploading.
//! * `Ram`: the store's cache, bounded by the RAM budget (runtime matrix bytes).
//! * `Disk`: everything else, one positioned read per expert chunk when needed.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Gpu,
    Ram,
    Disk,
}

/// Implemented by a device (GPU) tier: which experts it holds right now. Called under the
/// store's lock on every fetch, so it must be cheap and must not call back into the store.
pub trait DeviceResidency: Send + Sync {
    fn holds(&self, layer: usize, expert: usize) -> bool;
}
