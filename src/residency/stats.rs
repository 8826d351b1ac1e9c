//! What the store did: per-tier hits and misses, disk traffic, prefetch accuracy, time stalled.
//!
//! Every request (one expert named in one `fetch`) is counted exactly once, by where it was at
//! the moment it was asked for:
//! `requests = gpu.hits + ram.hits + ram.misses`, and every RAM miss was satisfied by a prefetch
//! that had landed (`prefetch.ready`), one still in flight (`prefetch.late`), a demand read
//! (`disk.demand_reads`), a read another fetch was already waiting for (`disk.shared_reads`), or
//! failed (`disk.errors`).

use super::io::ReadPath;
use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The budget holds every expert: all loaded at start, no I/O afterwards.
    AllInRam,
    /// A bounded cache with decayed-frequency eviction and prefetch.
    Cached,
    /// No cache, no prefetch: every requested expert is read when asked for (the baseline).
    NoCache,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TierStats {
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DiskStats {
    /// Chunk reads finished (demand, prefetch and initial load).
    pub reads: u64,
    pub demand_reads: u64,
    pub prefetch_reads: u64,
    pub load_reads: u64,
    /// Requests that found another fetch's demand read (or a load) in flight and waited for it.
    pub shared_reads: u64,
    /// Bytes read from the shards (stored chunk sizes) by demand and prefetch reads.
    pub bytes: u64,
    /// Summed over I/O threads: time from the start of a read to its matrices being built.
    pub busy_seconds: f64,
    pub errors: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PrefetchStats {
    /// Experts named in `hint_next_layer` calls.
    pub hinted: u64,
    /// Of those, the ones the next `fetch` of that layer asked for.
    pub hinted_used: u64,
    /// Reads queued by hints (hinted experts that were neither cached nor already in flight).
    pub issued: u64,
    /// Requests served by a prefetch read that had landed before the request.
    pub ready: u64,
    /// Requests that found their prefetch read still queued or in flight and waited for it.
    pub late: u64,
    /// Prefetch reads whose expert the next fetch of that layer did not ask for.
    pub wasted: u64,
    /// Queued prefetch reads dropped before they started, because the fetch did not need them.
    pub cancelled: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreStats {
    pub mode: Mode,
    pub read_path: ReadPath,
    pub io_threads: usize,
    pub ram_budget: u64,
    /// Expert weights in all (runtime matrix bytes).
    pub total_expert_bytes: u64,
    /// Forward steps, counted as fetch calls / layers.
    pub steps: f64,
    /// Tokens reported through `ExpertStore::advance`.
    pub tokens: u64,
    pub fetches: u64,
    pub requests: u64,
    /// Present when a device tier is attached.
    pub gpu: Option<TierStats>,
    pub ram: TierStats,
    pub disk: DiskStats,
    /// Bytes read by the initial load and by pins.
    pub load_bytes: u64,
    pub prefetch: PrefetchStats,
    /// Time `fetch` iterators spent waiting for reads to land.
    pub stall_seconds: f64,
    /// Time spent loading everything at start (`AllInRam`).
    pub load_seconds: f64,
    pub cached_experts: usize,
    pub pinned_experts: usize,
    pub cached_bytes: u64,
    pub peak_cached_bytes: u64,
    /// Expert bytes alive anywhere (cache, prefetched and waiting, held by the model).
    pub live_bytes: u64,
    pub peak_live_bytes: u64,
    pub evictions: u64,
    /// Experts read but not kept, because keeping them would have displaced hotter ones.
    pub not_admitted: u64,
}

impl StoreStats {
    /// Tokens if the model reported them, else forward steps.
    pub fn per_token_divisor(&self) -> f64 {
        if self.tokens > 0 { self.tokens as f64 } else { self.steps.max(1e-9) }
    }

    pub fn disk_bytes_per_token(&self) -> f64 {
        self.disk.bytes as f64 / self.per_token_divisor()
    }

    pub fn stall_seconds_per_token(&self) -> f64 {
        self.stall_seconds / self.per_token_divisor()
    }

    /// Share of requests served from the RAM cache (or the device tier) without any read.
    pub fn hit_rate(&self) -> f64 {
        let hits = self.ram.hits + self.gpu.map_or(0, |g| g.hits);
        if self.requests == 0 { 0.0 } else { hits as f64 / self.requests as f64 }
    }

    /// Share of hinted experts that were then used.
    pub fn prefetch_accuracy(&self) -> f64 {
        if self.prefetch.hinted == 0 { 0.0 } else { self.prefetch.hinted_used as f64 / self.prefetch.hinted as f64 }
    }

    /// Effective read throughput of the I/O threads (bytes / busy time), in GB/s.
    pub fn read_gbps(&self) -> f64 {
        if self.disk.busy_seconds > 0.0 { self.disk.bytes as f64 / self.disk.busy_seconds / 1e9 } else { 0.0 }
    }

    /// A few lines for people.
    pub fn summary(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "experts: {:?}, read path {}, {} I/O thread(s); budget {:.2} GB of {:.2} GB; cached {} ({:.2} GB, peak {:.2}), pinned {}; live peak {:.2} GB",
            self.mode, self.read_path.name(), self.io_threads, gb(self.ram_budget), gb(self.total_expert_bytes),
            self.cached_experts, gb(self.cached_bytes), gb(self.peak_cached_bytes), self.pinned_experts,
            gb(self.peak_live_bytes),
        );
        let gpu = self.gpu.map(|g| format!("gpu hits {} misses {}; ", g.hits, g.misses)).unwrap_or_default();
        let _ = writeln!(
            s,
            "requests {} over {:.1} steps / {} tokens: {gpu}ram hits {} misses {} (hit rate {:.1}%); evictions {}, not admitted {}",
            self.requests, self.steps, self.tokens, self.ram.hits, self.ram.misses, 100.0 * self.hit_rate(),
            self.evictions, self.not_admitted,
        );
        let _ = writeln!(
            s,
            "disk: {} reads ({} demand, {} prefetch, {} load), {:.3} GB, {:.1} MB/token, {:.2} GB/s while busy",
            self.disk.reads, self.disk.demand_reads, self.disk.prefetch_reads, self.disk.load_reads,
            gb(self.disk.bytes), self.disk_bytes_per_token() / 1e6, self.read_gbps(),
        );
        let p = &self.prefetch;
        let _ = write!(
            s,
            "prefetch: {} hinted, {} used ({:.1}%); {} reads issued: {} ready, {} late, {} wasted, {} cancelled; stalled {:.3} s ({:.2} ms/token)",
            p.hinted, p.hinted_used, 100.0 * self.prefetch_accuracy(), p.issued, p.ready, p.late, p.wasted,
            p.cancelled, self.stall_seconds, 1e3 * self.stall_seconds_per_token(),
        );
        s
    }
}
