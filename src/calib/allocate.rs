//! A type per expert so that the model lands at or under a byte budget, the most-used experts
//! getting the more precise types.
//!
//! The problem is a multiple-choice knapsack: minimise sum over experts of
//! `freq[e] * err[e][t_e]` subject to sum of `bytes[t_e]` <= budget, where `freq` is the expert's
//! share of its layer's routing (uniform without a calibration that recorded it), `err[e][t]` is
//! the relative squared error of type `t` on expert `e`'s own weights (sampled rows, weighted by
//! the column importances when there are some: `measure_expert`), and `bytes[t]` is an expert's
//! chunk as written. It is solved greedily: every expert starts at the smallest type, then the
//! upgrade (one expert to any larger type) with the largest error removed per byte added is
//! taken while one fits. With few types and bytes the same for every expert this lands within
//! one upgrade's bytes of the budget, and on the lower convex hull of (bytes, error) it is the
//! Lagrangian optimum: no exchange of bytes between two experts lowers the objective.

use crate::error::{Error, Result};
use crate::quant::QuantType;

/// The types `--target-size` chooses from when none are named, most precise first.
pub const DEFAULT_CANDIDATES: &[QuantType] = &[QuantType::Q8_0, QuantType::Q4S, QuantType::Q3S, QuantType::Q2S];

/// One expert's part of the problem.
#[derive(Debug, Clone)]
pub struct ExpertCost {
    /// Routing frequency (share of its layer's top-k choices).
    pub freq: f64,
    /// Relative squared error per candidate, in the order of `Problem::types`.
    pub err: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct Problem {
    pub types: Vec<QuantType>,
    /// Bytes of one expert's chunk per candidate, in the order of `types`.
    pub expert_bytes: Vec<u64>,
    pub experts: Vec<ExpertCost>,
    /// Bytes available for all the experts together.
    pub budget: u64,
}

/// The chosen type of each expert (index into `Problem::types`), and what it costs.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub choice: Vec<usize>,
    pub bytes: u64,
    pub objective: f64,
}

impl Problem {
    pub fn bytes_of(&self, choice: &[usize]) -> u64 {
        choice.iter().map(|&t| self.expert_bytes[t]).sum()
    }

    pub fn objective_of(&self, choice: &[usize]) -> f64 {
        choice.iter().zip(&self.experts).map(|(&t, x)| x.freq * x.err[t]).sum()
    }
}

/// Solve `p` (see the module's comment). Errors when even the smallest type overflows.
pub fn allocate(p: &Problem) -> Result<Allocation> {
    let nt = p.types.len();
    if nt == 0 || p.expert_bytes.len() != nt || p.experts.iter().any(|x| x.err.len() != nt) {
        return Err(Error::Invalid("allocation: the candidate types and their costs disagree".into()));
    }
    let smallest = (0..nt).min_by_key(|&t| p.expert_bytes[t]).unwrap();
    let mut choice = vec![smallest; p.experts.len()];
    let mut bytes = p.bytes_of(&choice);
    if bytes > p.budget {
        return Err(Error::Invalid(format!(
            "the experts need at least {bytes} bytes (all {}), {} are left for them under the target",
            p.types[smallest], p.budget
        )));
    }
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for (e, x) in p.experts.iter().enumerate() {
            let cur = choice[e];
            for t in 0..nt {
                let (b0, b1) = (p.expert_bytes[cur], p.expert_bytes[t]);
                if b1 <= b0 || bytes - b0 + b1 > p.budget {
                    continue;
                }
                let gain = x.freq * (x.err[cur] - x.err[t]);
                if gain <= 0.0 {
                    continue;
                }
                let rate = gain / (b1 - b0) as f64;
                // Ties go to the lower expert index, then the smaller type: deterministic.
                if best.is_none_or(|(r, _, _)| rate > r) {
                    best = Some((rate, e, t));
                }
            }
        }
        let Some((_, e, t)) = best else { break };
        bytes = bytes - p.expert_bytes[choice[e]] + p.expert_bytes[t];
        choice[e] = t;
    }
    Ok(Allocation { objective: p.objective_of(&choice), bytes, choice })
}

/// Relative squared error of `q` on a sample of rows of one matrix (`rows` x `cols`, row-major),
/// each column weighted by `importance` when given: sum imp (w - w')^2 / sum imp w^2.
pub fn measure_rows(q: QuantType, w: &[f32], cols: usize, importance: Option<&[f32]>) -> f64 {
    let q = q.for_row(cols);
    let Some(rb) = q.row_bytes(cols) else { return f64::INFINITY };
    let mut buf = vec![0u8; rb];
    let mut back = vec![0f32; cols];
    let (mut num, mut den) = (0f64, 0f64);
    for row in w.chunks_exact(cols) {
        super::quantize_row(q, row, importance, &mut buf);
        q.dequantize_row(&buf, &mut back);
        for (j, (&x, &y)) in row.iter().zip(&back).enumerate() {
            let imp = importance.map_or(1.0, |v| v[j] as f64);
            num += imp * ((x - y) as f64).powi(2);
            den += imp * (x as f64).powi(2);
        }
    }
    if den > 0.0 { num / den } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(freqs: &[f64], budget: u64) -> Problem {
        // Three types: 8, 4 and 2 bytes, errors 0.01, 0.1, 0.4 for every expert.
        Problem {
            types: vec![QuantType::Q8_0, QuantType::Q4S, QuantType::Q4_0],
            expert_bytes: vec![8, 4, 2],
            experts: freqs.iter().map(|&f| ExpertCost { freq: f, err: vec![0.01, 0.1, 0.4] }).collect(),
            budget,
        }
    }

    /// Every assignment, for checking the greedy answer on small cases.
    fn brute_force(p: &Problem) -> f64 {
        let n = p.experts.len();
        let nt = p.types.len();
        let mut best = f64::INFINITY;
        for code in 0..nt.pow(n as u32) {
            let choice: Vec<usize> = (0..n).map(|i| code / nt.pow(i as u32) % nt).collect();
            if p.bytes_of(&choice) <= p.budget {
                best = best.min(p.objective_of(&choice));
            }
        }
        best
    }

    #[test]
    fn most_routed_experts_get_the_precise_types() {
        let p = problem(&[0.05, 0.4, 0.05, 0.3, 0.2], 5 * 4);
        let a = allocate(&p).unwrap();
        assert!(a.bytes <= p.budget);
        // Upgrading 0.4 and 0.3 to q8 (+8 bytes) and dropping the two 0.05 to 2-byte types.
        assert_eq!(a.choice[1], 0);
        assert!(a.choice[0] >= a.choice[3] && a.choice[2] >= a.choice[3]);
    }

    #[test]
    fn greedy_matches_brute_force_on_small_problems() {
        let mut x = 7u64;
        for case in 0..200 {
            let n = 1 + case % 5;
            let freqs: Vec<f64> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 40) % 1000) as f64 + 1.0
                })
                .collect();
            let budget = 2 * n as u64 + (case as u64 * 3) % (6 * n as u64 + 1);
            let p = problem(&freqs, budget);
            let a = allocate(&p).unwrap();
            assert!(a.bytes <= budget);
            let opt = brute_force(&p);
            // Greedy on a convex error curve is optimal up to the last partial upgrade: allow
            // one expert's worth of slack.
            let slack = freqs.iter().cloned().fold(0.0, f64::max) * 0.39;
            assert!(a.objective <= opt + slack + 1e-12, "case {case}: {} vs optimum {opt}", a.objective);
        }
    }

    #[test]
    fn refuses_a_budget_below_the_smallest_type() {
        let e = allocate(&problem(&[0.5, 0.5], 3)).unwrap_err().to_string();
        assert!(e.contains("at least 4 bytes"), "{e}");
    }

    #[test]
    fn importance_weights_the_error() {
        let cols = 256;
        let w: Vec<f32> = (0..4 * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect();
        let plain = measure_rows(QuantType::Q4_0, &w, cols, None);
        let ones = vec![1.0f32; cols];
        assert!((measure_rows(QuantType::Q4_0, &w, cols, Some(&ones)) - plain).abs() < 1e-12);
        assert!(measure_rows(QuantType::Q8_0, &w, cols, None) < plain / 10.0);
    }
}
