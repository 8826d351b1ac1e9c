//! The mixture of experts: an f32 router picks `k` experts per token, each chosen expert runs
//! its GeGLU, and the outputs are summed weighted by the router's raw softmax probabilities.
//!
//! Tokens are grouped by expert, so that a batch of `T` tokens reads each expert's weights once
//! (one matrix-matrix product per projection) instead of once per token. Where the experts come
//! from (the resident weights, or a store that streams them) is the `ExpertSource`'s business.

use super::ops::{axpy, dot, gelu_tanh, grow, project, softmax};
use super::weights::Weights;
use crate::error::Result;
use crate::expert::Expert;
use crate::kernels::Matrix;
use crate::residency::ExpertSource;

/// Buffers reused between calls.
#[derive(Default)]
pub struct MoeScratch {
    probs: Vec<f32>,
    /// Per token, `k` (expert, gate) pairs, best first.
    chosen: Vec<(usize, f32)>,
    /// Tokens routed to the expert being evaluated, and their gates.
    members: Vec<(usize, f32)>,
    /// Experts used by the batch, and the guess for the next layer's.
    needed: Vec<usize>,
    guess: Vec<usize>,
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

/// `out[t] = sum over chosen e of gate_e * expert_e(x[t])` for the rows of `xn` (`[T, d]`),
/// routed by `layer`'s router in `w`, the experts taken from `experts`.
#[allow(clippy::too_many_arguments)]
pub fn moe(
    experts: &dyn ExpertSource,
    w: &Weights,
    layer: usize,
    n_experts: usize,
    k: usize,
    xn: &[f32],
    out: &mut [f32],
    s: &mut MoeScratch,
) -> Result<()> {
    let router = &w.layers[layer].router;
    let d = router.len() / n_experts;
    let t_n = xn.len() / d;
    let probs = grow(&mut s.probs, n_experts);
    if s.chosen.len() < t_n * k {
        s.chosen.resize(t_n * k, (0, 0.0));
    }
    for t in 0..t_n {
        route(router, &xn[t * d..][..d], k, probs, &mut s.chosen[t * k..][..k]);
    }
    s.needed.clear();
    s.needed.extend((0..n_experts).filter(|&e| s.chosen[..t_n * k].iter().any(|c| c.0 == e)));

    if let Some(next) = w.layers.get(layer + 1).filter(|_| experts.takes_guesses()) {
        // Guess the next layer's experts by applying its router to this layer's input: the
        // residual stream changes little from one layer to the next.
        let mut guess = vec![(0usize, 0f32); k];
        s.guess.clear();
        for t in 0..t_n {
            route(&next.router, &xn[t * d..][..d], k, probs, &mut guess);
            for &(e, _) in &guess {
                if !s.guess.contains(&e) {
                    s.guess.push(e);
                }
            }
        }
        experts.guess_next_layer(layer + 1, &s.guess);
    }

    out.fill(0.0);
    let needed = std::mem::take(&mut s.needed);
    let r = experts.for_each_expert(layer, &needed, &mut |e, x| {
        expert_contribution(e, x, xn, k, out, s);
        Ok(())
    });
    s.needed = needed;
    r
}

/// Add expert `e`'s output, weighted by its gate, to the rows of `out` routed to it.
fn expert_contribution(e: usize, x: &Expert, xn: &[f32], k: usize, out: &mut [f32], s: &mut MoeScratch) {
    let (w_gate, w_up, w_down) = (&x.gate, &x.up, &x.down);
    let d = w_gate.cols;
    let t_n = xn.len() / d;
    s.members.clear();
    for t in 0..t_n {
        if let Some(&(_, g)) = s.chosen[t * k..][..k].iter().find(|c| c.0 == e) {
            s.members.push((t, g));
        }
    }
    let n = s.members.len();
    if n == 0 {
        return;
    }
    let f = w_gate.rows;
    let gate = grow(&mut s.gate, n * f);
    let up = grow(&mut s.up, n * f);
    if n == 1 {
        let t = s.members[0].0;
        // One pass over the pool for both projections, the input quantized once.
        Matrix::matvec_pair(w_gate, w_up, &xn[t * d..][..d], gate, up);
    } else {
        let xs = grow(&mut s.xs, n * d);
        for (i, &(t, _)) in s.members.iter().enumerate() {
            xs[i * d..][..d].copy_from_slice(&xn[t * d..][..d]);
        }
        project(w_gate, xs, n, gate);
        project(w_up, xs, n, up);
    }
    for (g, u) in gate.iter_mut().zip(up.iter()) {
        *g = gelu_tanh(*g) * u;
    }
    let ys = grow(&mut s.ys, n * d);
    project(w_down, gate, n, ys);
    for (i, &(t, g)) in s.members.iter().enumerate() {
        axpy(g, &ys[i * d..][..d], &mut out[t * d..][..d]);
    }
}
