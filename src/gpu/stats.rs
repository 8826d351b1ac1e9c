//! What the runner reports about the GPU tier: how many of the chosen experts the GPU computed,
//! the bytes that crossed PCIe, and where the time went. Counted by the forward pass, turned into
//! per-token figures for `grok1-run bench --json` (keys with `gpu` or `pcie` in their names).

use serde::Serialize;

/// Running totals, kept by the forward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuStats {
    pub tokens: u64,
    /// Expert evaluations the router asked for (tokens x layers x experts per token).
    pub experts_chosen: u64,
    /// Of those, the ones the GPU computed.
    pub experts_on_gpu: u64,
    /// Bytes copied host to device (activations in, the CPU experts' sums).
    pub h2d_bytes: u64,
    /// Bytes copied device to host (router inputs, logits).
    pub d2h_bytes: u64,
    /// Copies each way (each `add_*_floats` is one).
    pub h2d_copies: u64,
    pub d2h_copies: u64,
    /// Device time of the GPU's work (event timing).
    pub gpu_seconds: f64,
    /// Wall time the CPU spent on its experts.
    pub cpu_expert_seconds: f64,
}

/// The per-token view of [`GpuStats`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GpuReport {
    pub gpu_expert_hit_rate: f64,
    pub gpu_experts_per_token: f64,
    pub pcie_h2d_bytes_per_token: f64,
    pub pcie_d2h_bytes_per_token: f64,
    pub pcie_h2d_copies_per_token: f64,
    pub pcie_d2h_copies_per_token: f64,
    pub gpu_ms_per_token: f64,
    pub cpu_expert_ms_per_token: f64,
}

impl GpuStats {
    /// One layer of `tokens` tokens: `chosen` expert evaluations of which `on_gpu` ran there.
    pub fn add_layer(&mut self, chosen: u64, on_gpu: u64) {
        debug_assert!(on_gpu <= chosen);
        self.experts_chosen += chosen;
        self.experts_on_gpu += on_gpu;
    }

    /// One copy of `n` f32 values, each way.
    pub fn add_h2d_floats(&mut self, n: usize) {
        self.h2d_bytes += 4 * n as u64;
        self.h2d_copies += 1;
    }

    pub fn add_d2h_floats(&mut self, n: usize) {
        self.d2h_bytes += 4 * n as u64;
        self.d2h_copies += 1;
    }

    pub fn report(&self) -> GpuReport {
        let t = self.tokens.max(1) as f64;
        GpuReport {
            gpu_expert_hit_rate: self.experts_on_gpu as f64 / self.experts_chosen.max(1) as f64,
            gpu_experts_per_token: self.experts_on_gpu as f64 / t,
            pcie_h2d_bytes_per_token: self.h2d_bytes as f64 / t,
            pcie_d2h_bytes_per_token: self.d2h_bytes as f64 / t,
            pcie_h2d_copies_per_token: self.h2d_copies as f64 / t,
            pcie_d2h_copies_per_token: self.d2h_copies as f64 / t,
            gpu_ms_per_token: 1e3 * self.gpu_seconds / t,
            cpu_expert_ms_per_token: 1e3 * self.cpu_expert_seconds / t,
        }
    }
}

impl std::ops::Sub for GpuStats {
    type Output = GpuStats;
    /// The counts between two snapshots (e.g. decode only, after prefill).
    fn sub(self, before: GpuStats) -> GpuStats {
        GpuStats {
            tokens: self.tokens - before.tokens,
            experts_chosen: self.experts_chosen - before.experts_chosen,
            experts_on_gpu: self.experts_on_gpu - before.experts_on_gpu,
            h2d_bytes: self.h2d_bytes - before.h2d_bytes,
            d2h_bytes: self.d2h_bytes - before.d2h_bytes,
            h2d_copies: self.h2d_copies - before.h2d_copies,
            d2h_copies: self.d2h_copies - before.d2h_copies,
            gpu_seconds: self.gpu_seconds - before.gpu_seconds,
            cpu_expert_seconds: self.cpu_expert_seconds - before.cpu_expert_seconds,
        }
    }
}
