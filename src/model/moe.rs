//! The mixture of experts: an f32 router picks `k` experts per token, each chosen expert runs
//! its GeGLU, and the outputs are summed weighted by the router's raw softmax probabilities.
//!
//! Tokens are grouped by expert, so that a batch of `T` tokens reads each expert's weights once
//! (one matrix-matrix product per projection) instead of once per token. Where the experts come
//! from (the resident weights, or a store that streams them) is the `ExpertSource`'s business.

use super::backend::Backend;
use super::geglu::{expert_rows, ExpertScratch};
use super::ops::{dot, grow, softmax};
use super::weights::Weights;
use crate::observe::MoeObserver;
use crate::error::Result;
use crate::residency::ExpertSource;
use std::sync::Arc;

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
    /// The router's input on the host, and the host experts' sum on its way to a device.
    xn_host: Vec<f32>,
    host_sum: Vec<f32>,
    expert: ExpertScratch,
    /// Calibration's observer, when one is recording.
    pub observer: Option<Arc<dyn MoeObserver>>,
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

/// `out[t] = sum over chosen e of gate_e * expert_e(x[t])` for the `t_n` rows of `xn`, routed
/// by `layer`'s router in `w`. Routing runs on the host in f32 (it flips on tiny differences);
/// the experts the backend holds run there, the others come from `experts` and run on the host.
#[allow(clippy::too_many_arguments)]
pub fn moe<B: Backend>(
    b: &B,
    experts: &dyn ExpertSource,
    w: &Weights,
    layer: usize,
    n_experts: usize,
    k: usize,
    xn: &B::Buf,
    t_n: usize,
    out: &mut B::Buf,
    s: &mut MoeScratch,
) -> Result<()> {
    let router = &w.layers[layer].router;
    let d = router.len() / n_experts;
    let xh = b.download(xn, t_n * d, &mut s.xn_host)?;
    let probs = grow(&mut s.probs, n_experts);
    if s.chosen.len() < t_n * k {
        s.chosen.resize(t_n * k, (0, 0.0));
    }
    for t in 0..t_n {
        route(router, &xh[t * d..][..d], k, probs, &mut s.chosen[t * k..][..k]);
        if let Some(o) = &s.observer {
            o.routed(layer, probs, &s.chosen[t * k..][..k]);
        }
    }
    s.needed.clear();
    s.needed.extend((0..n_experts).filter(|&e| s.chosen[..t_n * k].iter().any(|c| c.0 == e)));

    if let Some(next) = w.layers.get(layer + 1).filter(|_| experts.takes_guesses()) {
        // Guess the next layer's experts by applying its router to this layer's input: the
        // residual stream changes little from one layer to the next.
        let mut guess = vec![(0usize, 0f32); k];
        s.guess.clear();
        for t in 0..t_n {
            route(&next.router, &xh[t * d..][..d], k, probs, &mut guess);
            for &(e, _) in &guess {
                if !s.guess.contains(&e) {
                    s.guess.push(e);
                }
            }
        }
        experts.guess_next_layer(layer + 1, &s.guess);
    }

    b.zero(out, t_n * d)?;
    let chosen = &s.chosen[..t_n * k];
    let mut on_device = 0;
    let mut host_work = false;
    for &e in &s.needed {
        if b.holds_expert(layer, e) {
            members_of(e, chosen, k, &mut s.members);
            on_device += s.members.len() as u64;
            b.expert(layer, e, xn, t_n, &s.members, out, &mut s.expert)?;
        } else {
            host_work = true;
        }
    }
    b.routed((t_n * k) as u64, on_device);

    // The source is asked even when the backend holds every needed expert: a store counts
    // those as device hits and ranks them.
    let (needed, members, scratch, observer) = (&s.needed, &mut s.members, &mut s.expert, &s.observer);
    let mut host_experts = |acc: &mut [f32]| {
        experts.for_each_expert(layer, needed, &mut |e, x| {
            if !b.holds_expert(layer, e) {
                members_of(e, chosen, k, members);
                expert_rows(x, xh, members, acc, scratch);
                if let Some(o) = observer {
                    o.expert_ran(layer, e, xh, members, scratch.hidden(members.len(), x.gate.rows));
                }
            }
            Ok(())
        })
    };
    if host_work {
        b.add_from_host(out, t_n * d, &mut s.host_sum, host_experts)
    } else {
        host_experts(&mut [])
    }
}

/// The rows routed to expert `e`, with their gates.
fn members_of(e: usize, chosen: &[(usize, f32)], k: usize, members: &mut Vec<(usize, f32)>) {
    members.clear();
    for (t, c) in chosen.chunks_exact(k).enumerate() {
        if let Some(&(_, g)) = c.iter().find(|c| c.0 == e) {
            members.push((t, g));
        }
    }
}
