//! The mixture of experts: an f32 router picks `k` experts per token, each chosen expert runs
//! its GeGLU, and the outputs are summed weighted by the router's raw softmax probabilities.
//!
//! Tokens are grouped by expert, so that a batch of `T` tokens reads each expert's weights once
//! (one matrix-matrix product per projection) instead of once per token.

use super::attention::grow;
use super::ops::{axpy, dot, gelu_tanh, softmax};
use super::weights::Weights;
use crate::kernels::Matrix;

/// Buffers reused between calls.
#[derive(Default)]
pub struct MoeScratch {
    probs: Vec<f32>,
    /// Per token, `k` (expert, gate) pairs, best first.
    chosen: Vec<(usize, f32)>,
    /// Tokens routed to the expert being evaluated, and their gates.
    members: Vec<(usize, f32)>,
    xs: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    ys: Vec<f32>,
}

/// Softmax of the router logits over all experts, then the `k` largest probabilities (the lower
/// expert index first on ties). The gates are those probabilities, not renormalised.
pub fn route(router: &[f32], x: &[f32], k: usize, probs: &mut [f32], chosen: &mut [(usize, f32)]) {
    let d = x.len();
    for (p, w) in probs.iter_mut().zip(router.chunks_exact(d)) {
        *p = dot(w, x);
    }
    softmax(probs);
    for j in 0..k {
        let mut best = usize::MAX;
        for (e, &pe) in probs.iter().enumerate() {
            if chosen[..j].iter().any(|c| c.0 == e) {
                continue;
            }
            // Strictly greater: an equal probability later in the list never displaces an earlier one.
            if best == usize::MAX || pe > probs[best] {
                best = e;
            }
        }
        let b = best;
        chosen[j] = (b, probs[b]);
    }
}

/// `y = W x` for one row, `ys = W xs` for several.
pub(crate) fn project(m: &Matrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    if n == 1 {
        m.matvec(xs, ys)
    } else {
        m.matmul(xs, n, ys)
    }
}

/// `out[t] = sum over chosen e of gate_e * expert_e(x[t])` for the rows of `xn` (`[T, d]`).
pub fn moe(
    weights: &Weights,
    layer: usize,
    n_experts: usize,
    k: usize,
    xn: &[f32],
    out: &mut [f32],
    s: &mut MoeScratch,
) {
    let router = &weights.layers[layer].router;
    let d = router.len() / n_experts;
    let t_n = xn.len() / d;
    let probs = grow(&mut s.probs, n_experts);
    if s.chosen.len() < t_n * k {
        s.chosen.resize(t_n * k, (0, 0.0));
    }
    for t in 0..t_n {
        route(router, &xn[t * d..][..d], k, probs, &mut s.chosen[t * k..][..k]);
    }

    out.fill(0.0);
    for e in 0..n_experts {
        s.members.clear();
        for t in 0..t_n {
            if let Some(&(_, g)) = s.chosen[t * k..][..k].iter().find(|c| c.0 == e) {
                s.members.push((t, g));
            }
        }
        let n = s.members.len();
        if n == 0 {
            continue;
        }
        let w = weights.expert(layer, e);
        let f = w.gate.rows;
        let xs = grow(&mut s.xs, n * d);
        for (i, &(t, _)) in s.members.iter().enumerate() {
            xs[i * d..][..d].copy_from_slice(&xn[t * d..][..d]);
        }
        let gate = grow(&mut s.gate, n * f);
        let up = grow(&mut s.up, n * f);
        project(&w.gate, xs, n, gate);
        project(&w.up, xs, n, up);
        for (g, u) in gate.iter_mut().zip(up.iter()) {
            *g = gelu_tanh(*g) * u;
        }
        let ys = grow(&mut s.ys, n * d);
        project(&w.down, gate, n, ys);
        for (i, &(t, g)) in s.members.iter().enumerate() {
            axpy(g, &ys[i * d..][..d], &mut out[t * d..][..d]);
        }
    }
}
