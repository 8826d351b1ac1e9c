//! Where each part of a model goes on given hardware, and the decode speed to expect.
//!
//! # Placement
//! * Dense weights (attention, embedding = tied output head, router, norms) plus the KV cache for
//!   `context` tokens (f16) go to the GPU if they fit in its memory less `vram_reserve`, else to
//!   RAM.
//! * Experts fill what is left, hottest first: GPU memory, then RAM less `ram_reserve` and the
//!   store's working set (`2 x experts_per_token` experts: reads in flight, prefetched experts
//!   waiting, the layer being computed), then disk. Every layer gets the same share of each tier
//!   (its hottest experts highest).
//!
//! # Cost model (decode, one token, memory-bound)
//! Let `L` layers, `k` experts per token, `B` bytes per expert, `D` dense bytes read per token
//! (every dense tensor once: the tied embedding as output head) plus the KV cache at `context`.
//! A request lands in a tier with probability `P_tier`: the routing share of the experts the tier
//! holds. With `p_i` the share of selections going to a layer's i-th hottest expert,
//! `share(m) = p_1 + ... + p_m` (linear in a fractional m), `g`, `r` the experts per layer on GPU
//! and in RAM:
//!
//! ```text
//! P_gpu = share(g),  P_ram = share(g + r) - share(g),  P_disk = 1 - share(g + r)
//! ```
//!
//! `Routing::Uniform` (the conservative default, `p_i = 1/E`) makes this the cached fraction:
//! hit rate = f. `Routing::Zipf { s }` takes `p_i ~ 1/i^s`.
//!
//! ```text
//! t_dense = D / bw(dense tier)                        GPU memory or RAM bandwidth
//! t_gpu   = k L P_gpu B / gpu_bw                      experts computed on the GPU
//! t_cpu   = k L (P_ram + P_disk) B / cpu_bw           RAM experts and those read from disk
//! t_disk  = k L P_disk B / disk_bw                    one read per missing expert
//! t_sync  = 2 L x 10 us                               when GPU and CPU share each layer
//! t_compute = t_dense + max(t_gpu, t_cpu) + t_sync    GPU and CPU experts run in parallel;
//!                                                     attention precedes the experts
//! t_token = max(t_compute + (1 - a) t_disk, t_disk)   a = share of reads prefetched a layer early
//! tok/s   = 1 / t_token
//! ```
//!
//! `cpu_bw` is RAM bandwidth, or PCIe bandwidth when a GPU is present and PCIe is faster (the
//! RAM experts are then streamed to the GPU instead). The plan reports `a = 0` (every miss a
//! stall: the conservative prediction), `a = 1` (perfect prefetch: the upper bound) and the
//! input's `a`. Not modelled: compute limits of the CPU (dequantization cost), the tiny
//! activation transfers, prefill, and the page cache (the store keeps it out of the budget).

use super::tiers::Tier;
use crate::checkpoint::Tensor;
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use crate::quant::QuantType;
use serde::Serialize;
use std::fmt::Write;

/// Sizes in bytes, bandwidths in GB/s (10^9 bytes per second).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hardware {
    pub ram_bytes: u64,
    pub vram_bytes: u64,
    pub ram_gbps: f64,
    pub disk_gbps: f64,
    pub pcie_gbps: f64,
    pub gpu_gbps: f64,
}

impl Hardware {
    /// Typical figures: dual-channel DDR5 (50 GB/s sustained), a PCIe 4 NVMe drive (3 GB/s on
    /// random 300 MB reads), PCIe 4 x16 (25 GB/s), a high-end consumer GPU (900 GB/s).
    pub fn new(ram_bytes: u64, vram_bytes: u64) -> Hardware {
        Hardware { ram_bytes, vram_bytes, ram_gbps: 50.0, disk_gbps: 3.0, pcie_gbps: 25.0, gpu_gbps: 900.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Every expert of a layer equally likely.
    Uniform,
    /// The i-th most used expert of a layer gets a share proportional to 1 / i^s.
    Zipf { s: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanInput {
    pub config: GrokConfig,
    pub experts: QuantType,
    pub dense: QuantType,
    pub hw: Hardware,
    pub routing: Routing,
    /// Tokens of KV cache to hold (f16).
    pub context: usize,
    /// RAM kept for the OS, activations and the program.
    pub ram_reserve: u64,
    /// GPU memory kept for the runtime's context and activations.
    pub vram_reserve: u64,
    /// Share of disk reads started a layer early by prefetch (0..=1).
    pub prefetch_accuracy: f64,
    /// Mean bytes of one expert when the experts have a type each (a size target); `None`:
    /// every expert is `experts`.
    pub expert_mean_bytes: Option<u64>,
}

impl PlanInput {
    /// Grok-1 with conservative assumptions: uniform routing, no prefetch credit.
    pub fn new(config: GrokConfig, experts: QuantType, dense: QuantType, hw: Hardware) -> PlanInput {
        PlanInput {
            config,
            experts,
            dense,
            hw,
            routing: Routing::Uniform,
            context: 4096,
            ram_reserve: 4 << 30,
            vram_reserve: 1 << 30,
            prefetch_accuracy: 0.0,
            expert_mean_bytes: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenCost {
    /// Bytes read per token from each place.
    pub gpu_bytes: f64,
    pub ram_bytes: f64,
    pub disk_bytes: f64,
    /// Seconds per token of each term of the model.
    pub t_dense: f64,
    pub t_gpu: f64,
    pub t_cpu: f64,
    pub t_disk: f64,
    pub t_sync: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub input: PlanInput,
    pub expert_bytes: u64,
    pub total_experts: usize,
    /// Dense weights, and the KV cache that goes with them.
    pub dense_bytes: u64,
    pub kv_bytes: u64,
    pub dense_on: Tier,
    pub experts_gpu: usize,
    pub experts_ram: usize,
    pub experts_disk: usize,
    pub vram_used: u64,
    pub ram_used: u64,
    /// Where a request for an expert lands.
    pub p_gpu: f64,
    pub p_ram: f64,
    pub p_disk: f64,
    pub per_token: TokenCost,
    pub tok_s: f64,
    pub tok_s_no_prefetch: f64,
    pub tok_s_perfect_prefetch: f64,
    /// The term that bounds the speed.
    pub bottleneck: String,
    /// Reading everything resident at start: disk to RAM, then RAM to GPU.
    pub load_seconds: f64,
    /// False when the dense weights fit neither in GPU memory nor in RAM.
    pub fits: bool,
}

/// Bytes of one expert (gate, up, down) stored as `q`.
pub fn expert_bytes(c: &GrokConfig, q: QuantType) -> Result<u64> {
    let rb = |cols: usize| {
        q.row_bytes(cols).map(|b| b as u64).ok_or_else(|| {
            Error::Invalid(format!("{cols} columns is not a whole number of {q} blocks"))
        })
    };
    Ok(2 * c.ffn_size as u64 * rb(c.d_model)? + c.d_model as u64 * rb(c.ffn_size)?)
}

/// Bytes of the dense tensors as the converter stores them (norms and router in f32).
pub fn dense_bytes(c: &GrokConfig, q: QuantType) -> Result<u64> {
    let mut total = 0u64;
    for t in Tensor::dense(c) {
        let shape = t.shape(c);
        let qt = if t.keeps_f32() { QuantType::F32 } else { q };
        let cols = *shape.last().unwrap();
        let rows: usize = shape.iter().rev().skip(1).product();
        let rb = qt.row_bytes(cols).ok_or_else(|| {
            Error::bad_tensor(t.to_string(), format!("{cols} columns is not a whole number of {qt} blocks"))
        })?;
        total += (rb * rows) as u64;
    }
    Ok(total)
}

/// Routing shares of a layer's experts, hottest first; they sum to 1.
fn shares(r: Routing, n: usize) -> Vec<f64> {
    let w: Vec<f64> = match r {
        Routing::Uniform => vec![1.0; n],
        Routing::Zipf { s } => (1..=n).map(|i| (i as f64).powf(-s)).collect(),
    };
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|x| x / sum).collect()
}

/// Share of selections served by the `m` hottest experts (m fractional).
fn share_of_top(p: &[f64], m: f64) -> f64 {
    let m = m.clamp(0.0, p.len() as f64);
    let whole = m.floor() as usize;
    let mut s: f64 = p[..whole].iter().sum();
    if whole < p.len() {
        s += (m - whole as f64) * p[whole];
    }
    s.min(1.0)
}

pub fn plan(input: &PlanInput) -> Result<Plan> {
    let c = &input.config;
    let hw = &input.hw;
    if !(0.0..=1.0).contains(&input.prefetch_accuracy) {
        return Err(Error::Invalid(format!("prefetch accuracy {} is not in 0..=1", input.prefetch_accuracy)));
    }
    for (name, bw) in [("RAM", hw.ram_gbps), ("disk", hw.disk_gbps), ("PCIe", hw.pcie_gbps), ("GPU", hw.gpu_gbps)] {
        if !(bw > 0.0 && bw.is_finite()) {
            return Err(Error::Invalid(format!("{name} bandwidth {bw} GB/s must be positive")));
        }
    }
    let eb = match input.expert_mean_bytes {
        Some(b) => b,
        None => expert_bytes(c, input.experts)?,
    };
    let db = dense_bytes(c, input.dense)?;
    let kv = (input.context * c.n_layers * 2 * c.kv_dim() * 2) as u64;
    let n_total = c.n_layers * c.n_experts;
    let vram_free = hw.vram_bytes.saturating_sub(input.vram_reserve);
    let dense_on_gpu = hw.vram_bytes > 0 && db + kv <= vram_free;
    let vram_for_experts = if dense_on_gpu { vram_free - db - kv } else { vram_free };
    let experts_gpu = ((vram_for_experts / eb) as usize).min(n_total);
    let working_set = 2 * c.n_experts_per_token as u64 * eb;
    let ram_free = hw.ram_bytes.saturating_sub(input.ram_reserve);
    let fits = dense_on_gpu || db + kv <= ram_free;
    let ram_after_dense = if dense_on_gpu { ram_free } else { ram_free.saturating_sub(db + kv) };
    let experts_ram = ((ram_after_dense.saturating_sub(working_set) / eb) as usize).min(n_total - experts_gpu);
    let experts_disk = n_total - experts_gpu - experts_ram;

    let p = shares(input.routing, c.n_experts);
    let per_layer = |n: usize| n as f64 / c.n_layers as f64;
    let p_gpu = share_of_top(&p, per_layer(experts_gpu));
    let p_cached = share_of_top(&p, per_layer(experts_gpu + experts_ram));
    let (p_ram, p_disk) = (p_cached - p_gpu, 1.0 - p_cached);

    let requests = (c.n_experts_per_token * c.n_layers) as f64;
    let gb = 1e9;
    let has_gpu = hw.vram_bytes > 0;
    let cpu_gbps = if has_gpu { hw.ram_gbps.max(hw.pcie_gbps) } else { hw.ram_gbps };
    let dense_read = (db + kv) as f64;
    let gpu_exp = requests * p_gpu * eb as f64;
    let cpu_exp = requests * (p_ram + p_disk) * eb as f64;
    let disk = requests * p_disk * eb as f64;
    let t_dense = dense_read / (if dense_on_gpu { hw.gpu_gbps } else { hw.ram_gbps } * gb);
    let t_gpu = gpu_exp / (hw.gpu_gbps * gb);
    let t_cpu = cpu_exp / (cpu_gbps * gb);
    let t_disk = disk / (hw.disk_gbps * gb);
    let gpu_works = dense_on_gpu || experts_gpu > 0;
    let cpu_works = !dense_on_gpu || cpu_exp > 0.0;
    let t_sync = if gpu_works && cpu_works { 2.0 * c.n_layers as f64 * 10e-6 } else { 0.0 };
    let t_compute = t_dense + t_gpu.max(t_cpu) + t_sync;
    let tok_s_at = |a: f64| 1.0 / (t_compute + (1.0 - a) * t_disk).max(t_disk);
    let terms = [("dense", t_dense), ("GPU experts", t_gpu), ("CPU experts", t_cpu), ("disk reads", t_disk)];
    let bottleneck = terms.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0.to_string();

    let resident_from_disk = db + (experts_gpu + experts_ram) as u64 * eb;
    let to_gpu = if dense_on_gpu { db } else { 0 } + experts_gpu as u64 * eb;
    let load_seconds = resident_from_disk as f64 / (hw.disk_gbps * gb) + to_gpu as f64 / (hw.pcie_gbps * gb);
    let vram_used = if dense_on_gpu { db + kv } else { 0 } + experts_gpu as u64 * eb;
    let ram_used = if dense_on_gpu { 0 } else { db + kv } + experts_ram as u64 * eb;
    Ok(Plan {
        input: input.clone(),
        expert_bytes: eb,
        total_experts: n_total,
        dense_bytes: db,
        kv_bytes: kv,
        dense_on: if dense_on_gpu { Tier::Gpu } else { Tier::Ram },
        experts_gpu,
        experts_ram,
        experts_disk,
        vram_used,
        ram_used,
        p_gpu,
        p_ram,
        p_disk,
        per_token: TokenCost {
            gpu_bytes: if dense_on_gpu { dense_read } else { 0.0 } + gpu_exp,
            ram_bytes: if dense_on_gpu { 0.0 } else { dense_read } + cpu_exp,
            disk_bytes: disk,
            t_dense,
            t_gpu,
            t_cpu,
            t_disk,
            t_sync,
        },
        tok_s: if fits { tok_s_at(input.prefetch_accuracy) } else { 0.0 },
        tok_s_no_prefetch: if fits { tok_s_at(0.0) } else { 0.0 },
        tok_s_perfect_prefetch: if fits { tok_s_at(1.0) } else { 0.0 },
        bottleneck,
        load_seconds,
        fits,
    })
}

impl Plan {
    /// The plan as a table for people.
    pub fn table(&self) -> String {
        let i = &self.input;
        let g = |b: f64| b / 1e9;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "hardware: RAM {:.1} GB @ {} GB/s, GPU {:.1} GB @ {} GB/s, disk {} GB/s, PCIe {} GB/s",
            g(i.hw.ram_bytes as f64), i.hw.ram_gbps, g(i.hw.vram_bytes as f64), i.hw.gpu_gbps,
            i.hw.disk_gbps, i.hw.pcie_gbps,
        );
        let _ = writeln!(
            s,
            "model: {} layers x {} experts, experts {} ({:.3} GB each, {:.1} GB in all), dense {} ({:.2} GB) + KV {} tokens ({:.2} GB)",
            i.config.n_layers, i.config.n_experts, i.experts, g(self.expert_bytes as f64),
            g((self.expert_bytes * self.total_experts as u64) as f64), i.dense, g(self.dense_bytes as f64),
            i.context, g(self.kv_bytes as f64),
        );
        let routing = match i.routing {
            Routing::Uniform => "uniform".to_string(),
            Routing::Zipf { s } => format!("zipf s={s}"),
        };
        let _ = writeln!(s, "{:<6} {:>8} {:>10} {:>14} {:>16} {:>10}", "tier", "experts", "GB held", "P(request)", "GB read/token", "s/token");
        let t = &self.per_token;
        let dense_gpu = self.dense_on == Tier::Gpu;
        let rows = [
            ("gpu", self.experts_gpu, self.vram_used, self.p_gpu, t.gpu_bytes, t.t_gpu + if dense_gpu { t.t_dense } else { 0.0 }),
            ("ram", self.experts_ram, self.ram_used, self.p_ram, t.ram_bytes, t.t_cpu + if dense_gpu { 0.0 } else { t.t_dense }),
            ("disk", self.experts_disk, self.experts_disk as u64 * self.expert_bytes, self.p_disk, t.disk_bytes, t.t_disk),
        ];
        for (name, n, held, p, read, secs) in rows {
            let _ = writeln!(s, "{name:<6} {n:>8} {:>10.2} {:>13.1}% {:>16.2} {:>10.3}", g(held as f64), 100.0 * p, g(read), secs);
        }
        let _ = writeln!(
            s,
            "dense + KV on {:?} (counted in its tier's GB held and read); routing {routing}; bottleneck: {}; start-up load {:.0} s",
            self.dense_on, self.bottleneck, self.load_seconds,
        );
        if !self.fits {
            let _ = write!(s, "does not fit: the dense weights fit neither in GPU memory nor in RAM");
        } else {
            let _ = write!(
                s,
                "decode: {:.2} tok/s with no prefetch, {:.2} with perfect prefetch ({:.2} at prefetch accuracy {})",
                self.tok_s_no_prefetch, self.tok_s_perfect_prefetch, self.tok_s, i.prefetch_accuracy,
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_interpolate() {
        let u = shares(Routing::Uniform, 8);
        assert!((share_of_top(&u, 2.5) - 2.5 / 8.0).abs() < 1e-12);
        let z = shares(Routing::Zipf { s: 1.0 }, 8);
        assert!((z.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(share_of_top(&z, 2.0) > 0.5);
        assert_eq!(share_of_top(&z, 9.0), 1.0);
    }

    #[test]
    fn grok1_expert_and_dense_sizes() {
        let c = GrokConfig::default();
        // 3 x 6144 x 32768 weights at 18 bytes per 32.
        assert_eq!(expert_bytes(&c, QuantType::Iq4Nl).unwrap(), 3 * 6144 * 32768 / 32 * 18);
        assert_eq!(expert_bytes(&c, QuantType::Q8_0).unwrap(), 3 * 6144 * 32768 / 32 * 34);
        let attn: u64 = 2 * 6144 * 6144 + 2 * 1024 * 6144;
        let q8 = (64 * attn + 131072 * 6144) / 32 * 34;
        let f32s = 64 * (8 * 6144 + 4 * 6144) * 4 + 6144 * 4;
        assert_eq!(dense_bytes(&c, QuantType::Q8_0).unwrap(), q8 + f32s);
    }
}
