//! What goes on the GPU under a byte budget: the KV cache and activation scratch, then every
//! dense tensor, then experts in the residency policy's order. Pure arithmetic over a manifest,
//! so it is built and tested without CUDA.
//!
//! Device bytes equal the converted model's raw tensor bytes: the device layouts
//! (`DeviceMatrix`) only reorder a tensor's bytes (scales apart from quants), never widen them.
//! Each device buffer is counted rounded up to [`ALLOC_ALIGN`]; a q8_0, q4_0 or iq4_nl matrix
//! takes two buffers (quants and scales), other tensors (q4_k and q4_s super-blocks included) one.

use crate::config::GrokConfig;
use crate::error::{Error, Result};
use crate::format::manifest::Manifest;
use super::layout::unsupported;
use crate::quant::QuantType;
use serde::Serialize;

/// Granularity the plan counts each device allocation in (the driver's minimum alignment).
pub const ALLOC_ALIGN: u64 = 256;

/// Memory left to the CUDA context, the kernel module and fragmentation when the budget is not
/// given: the larger of 1 GiB and 5% of the card.
pub fn default_budget(free_bytes: u64, total_bytes: u64) -> u64 {
    free_bytes.saturating_sub((1u64 << 30).max(total_bytes / 20))
}

/// Budgets parse as every size of the project does (`20G`, `24GB`, `512MiB`, `0`).
pub use crate::size::parse_size as parse_bytes;

fn buffer(bytes: u64) -> u64 {
    bytes.div_ceil(ALLOC_ALIGN) * ALLOC_ALIGN
}

/// Device bytes of one tensor of `qtype` holding `bytes` bytes, counted as allocations.
pub fn tensor_device_bytes(qtype: QuantType, shape: &[usize], bytes: u64) -> u64 {
    match qtype {
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Iq4Nl if shape.len() == 2 => {
            // Quants and f16 scales (one per 32 weights) in two buffers.
            let scales = (shape[0] * shape[1] / 32 * 2) as u64;
            buffer(bytes - scales) + buffer(scales)
        }
        _ => buffer(bytes),
    }
}

/// Device bytes of a model's parts, from its manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelBytes {
    pub n_layers: usize,
    pub n_experts: usize,
    /// Every dense tensor (name, device bytes), in manifest order.
    pub dense: Vec<(String, u64)>,
    /// Device bytes of expert (layer, expert), at `layer * n_experts + expert`.
    pub experts: Vec<u64>,
    /// KV cache bytes per token of context (f32 keys and values of every layer).
    pub kv_bytes_per_token: u64,
    /// Why expert (layer, expert), at `layer * n_experts + expert`, cannot go on the device (a
    /// tensor type without a device kernel), if it cannot.
    pub cpu_only: Vec<Option<String>>,
    /// Why the dense tensors cannot all go on the device, if they cannot.
    pub dense_cpu_only: Option<String>,
}

impl ModelBytes {
    pub fn from_manifest(m: &Manifest) -> ModelBytes {
        let c = &m.config;
        let dense = m
            .dense
            .iter()
            .map(|d| (d.name.clone(), tensor_device_bytes(d.qtype, &d.shape, d.bytes)))
            .collect();
        let mut experts = vec![0u64; c.n_layers * c.n_experts];
        let mut cpu_only = vec![None; c.n_layers * c.n_experts];
        for ch in &m.experts {
            let slot = ch.layer * c.n_experts + ch.expert;
            experts[slot] = ch.tensors.iter().map(|t| tensor_device_bytes(t.qtype, &t.shape, t.bytes)).sum();
            cpu_only[slot] = ch.tensors.iter().find_map(|t| unsupported(t.qtype));
        }
        let dense_cpu_only = m.dense.iter().find_map(|d| unsupported(d.qtype).map(|why| format!("{}: {why}", d.name)));
        ModelBytes {
            n_layers: c.n_layers,
            n_experts: c.n_experts,
            dense,
            experts,
            kv_bytes_per_token: kv_bytes_per_token(c),
            cpu_only,
            dense_cpu_only,
        }
    }

    pub fn dense_bytes(&self) -> u64 {
        self.dense.iter().map(|d| d.1).sum()
    }
}

/// f32 keys and values of every layer for one position.
pub fn kv_bytes_per_token(c: &GrokConfig) -> u64 {
    (c.n_layers * 2 * c.n_kv_heads * c.head_dim * 4) as u64
}

/// Device activations for a batch of `batch` tokens: the residual stream, norm outputs, q/k/v,
/// attention output, the MoE accumulator and an expert's gate/up/down buffers (sized for the
/// whole batch, the most one expert can get), routing indices and gates, and one row of logits.
pub fn scratch_bytes(c: &GrokConfig, batch: usize) -> u64 {
    let (d, qd, kvd) = (c.d_model, c.n_q_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let per_token = 4 * d + 2 * qd + 2 * kvd + 2 * c.ffn_size + 2 * d + 2;
    let floats = batch * per_token + c.vocab_size;
    // About sixteen separate buffers, each rounded to the allocation granularity.
    buffer(4 * floats as u64) + 16 * ALLOC_ALIGN
}

/// The order to place experts in when nothing is known about routing yet: expert 0 of every
/// layer, then expert 1 of every layer, and so on, so that every layer gets its share.
pub fn default_ranking(n_layers: usize, n_experts: usize) -> Vec<(usize, usize)> {
    (0..n_experts).flat_map(|e| (0..n_layers).map(move |l| (l, e))).collect()
}

/// Where each part of the model goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuPlan {
    pub budget: u64,
    pub kv_tokens: usize,
    pub kv_bytes: u64,
    pub batch: usize,
    pub scratch_bytes: u64,
    /// All dense tensors are on the device when the plan uses the GPU at all.
    pub dense_bytes: u64,
    /// Experts on the device, in the order they were placed.
    pub experts: Vec<(usize, usize)>,
    pub expert_bytes: u64,
    /// Why the GPU is not used (the budget does not hold the KV cache, scratch and dense
    /// weights); `None` when it is.
    pub refused: Option<String>,
    /// Experts that stay on the CPU whatever the budget (their types have no device kernel),
    /// and why.
    pub cpu_only: Vec<(usize, usize)>,
    pub cpu_only_reason: Option<String>,
    #[serde(skip)]
    held: Vec<bool>,
    #[serde(skip)]
    n_experts: usize,
}

impl GpuPlan {
    pub fn uses_gpu(&self) -> bool {
        self.refused.is_none()
    }

    /// Whether expert `expert` of `layer` is on the device.
    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.held.get(layer * self.n_experts + expert).copied().unwrap_or(false)
    }

    /// Device bytes the plan takes.
    pub fn used(&self) -> u64 {
        if self.uses_gpu() {
            self.kv_bytes + self.scratch_bytes + self.dense_bytes + self.expert_bytes
        } else {
            0
        }
    }

    /// Share of all experts on the device.
    pub fn expert_share(&self) -> f64 {
        self.experts.len() as f64 / self.held.len().max(1) as f64
    }
}

/// Fill `budget` bytes: the KV cache for `kv_tokens` positions and scratch for prefill batches of
/// `batch` tokens first, then all dense tensors, then experts in `ranking` order (hottest first),
/// skipping any that no longer fit. Entries of `ranking` outside the model are an error;
/// repeated ones are placed once.
pub fn plan(
    model: &ModelBytes,
    config: &GrokConfig,
    budget: u64,
    ranking: &[(usize, usize)],
    kv_tokens: usize,
    batch: usize,
) -> Result<GpuPlan> {
    let slots = model.n_layers * model.n_experts;
    for &(l, e) in ranking {
        if l >= model.n_layers || e >= model.n_experts {
            return Err(Error::Invalid(format!(
                "expert ranking names (layer {l}, expert {e}), outside the model's {} layers x {} experts",
                model.n_layers, model.n_experts
            )));
        }
    }
    let mut p = GpuPlan {
        budget,
        kv_tokens,
        kv_bytes: buffer(model.kv_bytes_per_token * kv_tokens as u64),
        batch,
        scratch_bytes: scratch_bytes(config, batch.max(1)),
        dense_bytes: model.dense_bytes(),
        experts: Vec::new(),
        expert_bytes: 0,
        refused: None,
        cpu_only: Vec::new(),
        cpu_only_reason: None,
        held: vec![false; slots],
        n_experts: model.n_experts,
    };
    for (slot, why) in model.cpu_only.iter().enumerate() {
        if let Some(why) = why {
            p.cpu_only.push((slot / model.n_experts, slot % model.n_experts));
            p.cpu_only_reason.get_or_insert_with(|| why.clone());
        }
    }
    if let Some(why) = &model.dense_cpu_only {
        p.refused = Some(format!("the dense weights cannot go on the GPU ({why})"));
        return Ok(p);
    }
    let base = p.kv_bytes + p.scratch_bytes + p.dense_bytes;
    if base > budget {
        p.refused = Some(format!(
            "the budget of {} holds not even the dense weights ({}), KV cache for {} tokens ({}) and scratch ({})",
            human(budget),
            human(p.dense_bytes),
            kv_tokens,
            human(p.kv_bytes),
            human(p.scratch_bytes)
        ));
        return Ok(p);
    }
    let mut left = budget - base;
    for &(l, e) in ranking {
        let slot = l * model.n_experts + e;
        let b = model.experts[slot];
        if p.held[slot] || b > left || model.cpu_only.get(slot).is_some_and(|w| w.is_some()) {
            continue;
        }
        p.held[slot] = true;
        p.experts.push((l, e));
        p.expert_bytes += b;
        left -= b;
    }
    Ok(p)
}

/// `1.50 GiB`-style rendering for messages.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{bytes} B")
    }
}
