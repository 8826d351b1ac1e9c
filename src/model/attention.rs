//! Causal grouped-query attention over the KV cache, with Grok's soft-capped logits and its
//! pad-key mask.

use super::ops::{axpy, dot, grow};
use crate::config::GrokConfig;
use rayon::prelude::*;

/// What attention needs from the config, in the types it computes with.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Scales `q . k` before the cap; Grok's stand-in for `1/sqrt(head_dim)`.
    pub multiplier: f32,
    /// Logits become `cap * tanh(x / cap)`.
    pub logit_cap: f32,
}

impl AttnParams {
    pub fn from_config(c: &GrokConfig) -> AttnParams {
        AttnParams {
            n_q_heads: c.n_q_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            multiplier: c.attn_output_multiplier as f32,
            logit_cap: c.attn_logit_cap as f32,
        }
    }

    /// The KV head query head `h` reads: heads come in contiguous groups of
    /// `n_q_heads / n_kv_heads` (the layout of the release and of HF `repeat_kv`).
    #[inline]
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.n_q_heads / self.n_kv_heads)
    }
}

/// Buffers reused between calls, so that decoding allocates nothing once they have grown.
#[derive(Default)]
pub struct AttnScratch {
    scores: Vec<f32>,
    /// The output head-major, `[n_q_heads, T, head_dim]`, so that each head writes one block.
    out_hm: Vec<f32>,
}

/// Below this many multiply-adds a call runs on the calling thread; above it heads go to rayon.
const PARALLEL_WORK: usize = 1 << 16;

/// The logit a masked key gets in the release (not -inf, which matters only when every key of a
/// query is masked: the softmax then spreads evenly over all keys).
const MASKED: f32 = -1e30;

/// Attention of `T` queries at positions `p0..p0 + T` over the keys at `0..p0 + T`.
///
/// * `q`: `[T, n_q_heads * head_dim]`, after RoPE; head `h` is features `h*hd .. (h+1)*hd`.
/// * `k`, `v`: `[n_kv_heads, stride, head_dim]`, positions `0..p0 + T` filled (post-RoPE keys).
/// * `key_valid[s]`: key `s` may be attended to (its token is not the pad token).
/// * `out`: `[T, n_q_heads * head_dim]`.
///
/// Query `p` attends to key `s` iff `s <= p` and `key_valid[s]`. A query with no such key gets
/// the mean of all `p0 + T` values, which is what the release's -1e30 fill gives over a sequence
/// of that length.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    p: &AttnParams,
    q: &[f32],
    p0: usize,
    k: &[f32],
    v: &[f32],
    stride: usize,
    key_valid: &[bool],
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let (h_n, hd) = (p.n_q_heads, p.head_dim);
    let qd = h_n * hd;
    let t_n = q.len() / qd;
    let n_keys = p0 + t_n;
    assert_eq!(out.len(), t_n * qd);
    assert!(n_keys <= stride && key_valid.len() >= n_keys);
    assert!(k.len() >= p.n_kv_heads * stride * hd && v.len() >= p.n_kv_heads * stride * hd);

    // Sized for a full cache at once, so that decoding does not regrow it token after token.
    let scores = &mut grow(&mut scratch.scores, h_n * stride)[..h_n * n_keys];
    let out_hm = grow(&mut scratch.out_hm, t_n * qd);
    let (mult, cap) = (p.multiplier, p.logit_cap);
    let inv_cap = 1.0 / cap;

    let head = |h: usize, sc: &mut [f32], o: &mut [f32]| {
        let g = p.kv_head(h);
        let kh = &k[g * stride * hd..][..n_keys * hd];
        let vh = &v[g * stride * hd..][..n_keys * hd];
        for t in 0..t_n {
            let qv = &q[t * qd + h * hd..][..hd];
            let ot = &mut o[t * hd..][..hd];
            ot.fill(0.0);
            let visible = p0 + t + 1;
            let sc = &mut sc[..visible];
            let mut max = MASKED;
            for (s, x) in sc.iter_mut().enumerate() {
                *x = if key_valid[s] {
                    let l = dot(qv, &kh[s * hd..][..hd]) * mult;
                    cap * (l * inv_cap).tanh()
                } else {
                    MASKED
                };
                max = max.max(*x);
            }
            if max == MASKED {
                let w = 1.0 / n_keys as f32;
                for s in 0..n_keys {
                    axpy(w, &vh[s * hd..][..hd], ot);
                }
                continue;
            }
            let mut sum = 0.0f32;
            for (s, x) in sc.iter_mut().enumerate() {
                *x = if key_valid[s] { (*x - max).exp() } else { 0.0 };
                sum += *x;
            }
            let inv = 1.0 / sum;
            for (s, &w) in sc.iter().enumerate() {
                if w != 0.0 {
                    axpy(w * inv, &vh[s * hd..][..hd], ot);
                }
            }
        }
    };

    let work = h_n * t_n * n_keys * hd;
    if work >= PARALLEL_WORK {
        scores
            .par_chunks_mut(n_keys)
            .zip(out_hm.par_chunks_mut(t_n * hd))
            .enumerate()
            .for_each(|(h, (sc, o))| head(h, sc, o));
    } else {
        for (h, (sc, o)) in scores.chunks_mut(n_keys).zip(out_hm.chunks_mut(t_n * hd)).enumerate() {
            head(h, sc, o);
        }
    }

    for h in 0..h_n {
        for t in 0..t_n {
            out[t * qd + h * hd..][..hd].copy_from_slice(&out_hm[(h * t_n + t) * hd..][..hd]);
        }
    }
}
