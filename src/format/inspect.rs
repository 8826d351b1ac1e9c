//! `inspect`: what a converted model holds, by tensor class.

use super::manifest::Manifest;
use crate::checkpoint::Tensor;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ClassSize {
    pub class: &'static str,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
    pub bits_per_weight: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub config: crate::config::GrokConfig,
    pub dense_type: String,
    pub expert_type: String,
    pub compression: String,
    pub source: String,
    pub shards: usize,
    pub total_bytes: u64,
    pub classes: Vec<ClassSize>,
    /// Weight bytes touched to decode one token (dense, the embedding row excepted, plus
    /// `n_experts_per_token` experts per layer).
    pub bytes_per_token: u64,
    /// The experts by type (one row per type; more than one for a mix).
    pub expert_types: Vec<ExpertTypeShare>,
    /// Bits per expert weight over all the experts.
    pub expert_bits_per_weight: f64,
    pub calibration: Option<super::manifest::CalibrationUsed>,
    pub expert_mix: Option<super::manifest::ExpertMix>,
}

/// The experts whose gate projection has one type (an expert's three share it, except where a
/// row length makes a super-block type fall back to its 32-weight sibling).
#[derive(Debug, Clone, Serialize)]
pub struct ExpertTypeShare {
    pub qtype: String,
    pub experts: usize,
    pub params: u64,
    pub bytes: u64,
    pub bits_per_weight: f64,
}

fn class_of(t: &Tensor) -> &'static str {
    match t {
        Tensor::Embedding => "embedding (tied output head)",
        Tensor::AttnQ(_) | Tensor::AttnK(_) | Tensor::AttnV(_) | Tensor::AttnO(_) => "attention",
        Tensor::Router(_) => "router",
        Tensor::Expert { .. } => "experts",
        _ => "norms",
    }
}

pub fn inspect(m: &Manifest) -> Inspection {
    let order = ["embedding (tied output head)", "attention", "router", "norms", "experts"];
    let mut classes: Vec<ClassSize> = order
        .iter()
        .map(|&class| ClassSize { class, tensors: 0, params: 0, bytes: 0, bits_per_weight: 0.0 })
        .collect();
    let mut add = |class: &str, params: u64, bytes: u64| {
        let c = classes.iter_mut().find(|c| c.class == class).unwrap();
        c.tensors += 1;
        c.params += params;
        c.bytes += bytes;
    };
    for d in &m.dense {
        let t = Tensor::parse_canonical(&d.name);
        let class = t.as_ref().map_or("norms", class_of);
        add(class, d.shape.iter().product::<usize>() as u64, d.bytes);
    }
    for c in &m.experts {
        for t in &c.tensors {
            // Stored bytes shared out by raw size when compressed.
            let share = t.bytes as f64 / c.raw_bytes as f64 * c.bytes as f64;
            add("experts", t.shape.iter().product::<usize>() as u64, share.round() as u64);
        }
    }
    for c in classes.iter_mut() {
        c.bits_per_weight = if c.params > 0 { c.bytes as f64 * 8.0 / c.params as f64 } else { 0.0 };
    }
    let cfg = &m.config;
    let dense_bytes: u64 = m.dense.iter().map(|d| d.bytes).sum();
    let expert_bytes: u64 = m.experts.iter().map(|c| c.bytes).sum();
    let per_expert = expert_bytes / (cfg.n_layers * cfg.n_experts).max(1) as u64;
    let bytes_per_token =
        dense_bytes + per_expert * (cfg.n_layers * cfg.n_experts_per_token) as u64;
    let mut expert_types: Vec<ExpertTypeShare> = Vec::new();
    for c in &m.experts {
        let label = c.tensors.first().map_or_else(String::new, |t| t.qtype.to_string());
        let i = match expert_types.iter().position(|s| s.qtype == label) {
            Some(i) => i,
            None => {
                expert_types.push(ExpertTypeShare { qtype: label, experts: 0, params: 0, bytes: 0, bits_per_weight: 0.0 });
                expert_types.len() - 1
            }
        };
        let s = &mut expert_types[i];
        s.experts += 1;
        s.params += c.tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum::<u64>();
        s.bytes += c.bytes;
    }
    for s in expert_types.iter_mut() {
        s.bits_per_weight = s.bytes as f64 * 8.0 / s.params.max(1) as f64;
    }
    // Most bits first: the order a reader compares precisions in.
    expert_types.sort_by(|a, b| b.bits_per_weight.total_cmp(&a.bits_per_weight));
    let expert_params: u64 = expert_types.iter().map(|s| s.params).sum();
    Inspection {
        expert_types,
        expert_bits_per_weight: expert_bytes as f64 * 8.0 / expert_params.max(1) as f64,
        calibration: m.calibration.clone(),
        expert_mix: m.expert_mix.clone(),
        config: cfg.clone(),
        dense_type: m.quant.dense.to_string(),
        expert_type: m.quant.experts.to_string(),
        compression: format!("{:?}", m.quant.compression).to_lowercase(),
        source: m.source.clone(),
        shards: m.shards.len(),
        total_bytes: m.shards.iter().map(|s| s.bytes).sum(),
        classes,
        bytes_per_token,
    }
}
