//! `convert --target-size`: a type per expert so that the converted model (its shards: dense
//! and experts, as written) lands at or under a byte count, the most-routed experts getting the
//! precise types (the problem and its solution: `calib::allocate`).
//!
//! Each expert's error under each candidate is measured on its own weights: `SAMPLE_ROWS` rows
//! of each projection, evenly spaced, quantized and dequantized, the error weighted by the
//! calibration's column importances when there is one. Sizes come from the converter's own plan,
//! so the prediction is what the conversion writes.

use crate::calib::allocate::{allocate, measure_rows, Allocation, ExpertCost, Problem};
use crate::calib::Calibration;
use crate::checkpoint::{Proj, Tensor, TensorSource};
use crate::convert::{planned_bytes, ConvertOptions};
use crate::error::{Error, Result};
use crate::format::manifest::ExpertMix;
use crate::quant::QuantType;
use rayon::prelude::*;

/// Rows of each projection an expert's errors are measured on.
pub const SAMPLE_ROWS: usize = 16;

/// What `choose` decided.
#[derive(Debug, Clone)]
pub struct TargetChoice {
    /// A type per expert, layer-major.
    pub types: Vec<QuantType>,
    pub mix: ExpertMix,
    /// Planned bytes: dense, and all the experts with their chosen types.
    pub dense_bytes: u64,
    pub expert_bytes: u64,
    pub allocation: Allocation,
}

impl TargetChoice {
    /// Options that convert with this choice.
    pub fn apply(&self, opts: &mut ConvertOptions) {
        opts.expert_types = Some((self.types.clone(), self.mix.clone()));
    }
}

/// Choose the experts' types for `target_bytes` from `candidates` (see the module's comment).
pub fn choose(
    src: &dyn TensorSource,
    opts: &ConvertOptions,
    target_bytes: u64,
    candidates: &[QuantType],
    calibration: Option<&Calibration>,
) -> Result<TargetChoice> {
    let c = src.config().clone();
    if candidates.is_empty() {
        return Err(Error::Invalid("--target-size needs at least one candidate type".into()));
    }
    for (i, q) in candidates.iter().enumerate() {
        if *q == QuantType::F32 || candidates[..i].contains(q) {
            return Err(Error::Invalid(format!("candidate types {candidates:?}: f32 or a repeated type")));
        }
    }
    // Bytes per expert per candidate, and the dense part (the same whatever the experts are).
    let mut per_type = Vec::new();
    let mut dense = 0;
    for &q in candidates {
        let o = ConvertOptions { experts: q, expert_types: None, ..opts.clone() };
        let (d, experts) = planned_bytes(src, &o)?;
        if experts.windows(2).any(|w| w[0] != w[1]) {
            return Err(Error::Invalid("--target-size needs every expert to have the same shapes".into()));
        }
        dense = d;
        per_type.push(experts.first().copied().unwrap_or(0));
    }
    let n = c.n_layers * c.n_experts;
    let budget = target_bytes.checked_sub(dense).ok_or_else(|| {
        Error::Invalid(format!("target {target_bytes} bytes is below the dense weights' {dense} bytes alone"))
    })?;
    let freqs = match calibration {
        Some(cal) => cal.routing_frequencies(),
        None => vec![1.0 / c.n_experts as f64; n],
    };
    let experts: Vec<ExpertCost> = (0..n)
        .into_par_iter()
        .map(|i| -> Result<ExpertCost> {
            let (layer, expert) = (i / c.n_experts, i % c.n_experts);
            let mut err = vec![0f64; candidates.len()];
            for proj in Proj::ALL {
                let t = Tensor::Expert { layer, expert, proj };
                let s = src.tensor(t).ok_or_else(|| Error::bad_tensor(t.to_string(), "missing"))?;
                let (rows, cols) = (s.rows(), s.cols());
                let take = SAMPLE_ROWS.min(rows);
                let mut w = vec![0f32; take * cols];
                for (k, row) in w.chunks_exact_mut(cols).enumerate() {
                    src.read_rows(t, k * rows / take, row)?;
                }
                let importance = calibration.and_then(|cal| cal.importance(layer, expert, proj));
                for (e, &q) in err.iter_mut().zip(candidates) {
                    // Each projection's share of the expert's weights weighs its error.
                    *e += measure_rows(q, &w, cols, importance) * (rows * cols) as f64;
                }
            }
            let total: f64 = Proj::ALL.iter().map(|&p| Tensor::Expert { layer, expert, proj: p }.shape(&c).iter().product::<usize>() as f64).sum();
            Ok(ExpertCost { freq: freqs[i], err: err.into_iter().map(|e| e / total).collect() })
        })
        .collect::<Result<_>>()?;
    let problem = Problem { types: candidates.to_vec(), expert_bytes: per_type, experts, budget };
    let allocation = allocate(&problem).map_err(|e| Error::Invalid(format!("target {target_bytes} bytes: {e}")))?;
    Ok(TargetChoice {
        types: allocation.choice.iter().map(|&t| candidates[t]).collect(),
        mix: ExpertMix { target_bytes, candidates: candidates.to_vec() },
        dense_bytes: dense,
        expert_bytes: allocation.bytes,
        allocation,
    })
}

/// Relative squared error of `q` on Gaussian weights (4 rows of 4096, fixed seed): the error
/// table `predict_mix` uses where no weights are at hand.
pub fn gaussian_error(q: QuantType) -> f64 {
    let cols = 4096;
    let w = crate::quant::measure::sample(crate::quant::measure::Dist::Gaussian, 4 * cols, 7);
    measure_rows(q, &w, cols, None)
}

/// What `--target-size` would choose for a model of config `c` with `dense` dense weights, from
/// its shapes alone: uniform routing and the Gaussian error table (`gaussian_error`), every
/// expert alike, so the answer is how many experts get each type. Returns (type, experts) in
/// the order of `candidates` and the mean bytes of an expert.
pub fn predict_mix(
    c: &crate::config::GrokConfig,
    dense: QuantType,
    target_bytes: u64,
    candidates: &[QuantType],
) -> Result<(Vec<(QuantType, usize)>, u64)> {
    use crate::residency::plan::{dense_bytes, expert_bytes};
    let n = c.n_layers * c.n_experts;
    let per_type = candidates.iter().map(|&q| expert_bytes(c, q)).collect::<Result<Vec<_>>>()?;
    let errs: Vec<f64> = candidates.iter().map(|&q| gaussian_error(q)).collect();
    let db = dense_bytes(c, dense)?;
    let budget = target_bytes
        .checked_sub(db)
        .ok_or_else(|| Error::Invalid(format!("target {target_bytes} bytes is below the dense weights' {db} bytes alone")))?;
    let experts = vec![ExpertCost { freq: 1.0 / c.n_experts as f64, err: errs }; n];
    let problem = Problem { types: candidates.to_vec(), expert_bytes: per_type, experts, budget };
    let a = allocate(&problem).map_err(|e| Error::Invalid(format!("target {target_bytes} bytes: {e}")))?;
    let counts = (0..candidates.len()).map(|t| (candidates[t], a.choice.iter().filter(|&&x| x == t).count())).collect();
    Ok((counts, a.bytes / n.max(1) as u64))
}
