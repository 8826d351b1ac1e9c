//! Where the steps of the forward pass run. `grok.rs` is one function over a [`Backend`]: the
//! CPU ([`Cpu`], the default), or a device that holds the dense weights and some of the experts
//! in its own memory (implemented beside the model, in the placement module).
//!
//! The residual stream and every activation live in the backend's buffers (`Backend::Buf`);
//! the host sees them only through [`Backend::download`] and changes them only through
//! [`Backend::upload`] and [`Backend::add_from_host`], the three places where a device copies
//! over its bus. Per token that is the embedding row in, per layer the router's input out and
//! (when the host computed some of the chosen experts) their sum in, and the logits out.
//!
//! The weights are named by their `Tensor`, so each backend computes with its own copy. For the
//! CPU every method is the host computation itself, the copies are no-ops, and the generic
//! forward pass compiles to what it was before the seam existed.

use super::attention::{attend, AttnParams, AttnScratch};
use super::kv_cache::KvCache;
use super::geglu::{expert_rows, ExpertScratch};
use super::ops::{add_rms_norm_rows, project, rms_norm_rows, rope_in_place, rope_phases};
use super::weights::Weights;
use crate::checkpoint::Tensor;
use crate::error::Result;

/// Every step can fail on a device (an allocation, a launch); on the CPU none does.
pub trait Backend: Sync {
    /// An activation buffer in this backend's memory.
    type Buf: Default + Send;

    /// Make `buf` hold at least `n` values (never shrinking: steady-state calls allocate nothing).
    fn reserve(&self, buf: &mut Self::Buf, n: usize) -> Result<()>;

    /// Whether this backend computes expert `e` of `layer` itself (the host computes the rest).
    fn holds_expert(&self, _layer: usize, _e: usize) -> bool {
        false
    }

    /// Set `dst[..n]` to what `fill` writes on the host (through `staging` on a device).
    fn upload(&self, dst: &mut Self::Buf, n: usize, staging: &mut Vec<f32>, fill: impl FnOnce(&mut [f32])) -> Result<()>;

    /// `src[..n]` on the host (copied into `staging` on a device).
    fn download<'a>(&self, src: &'a Self::Buf, n: usize, staging: &'a mut Vec<f32>) -> Result<&'a [f32]>;

    /// `acc[..n] += s`, where `s` is what `sum` adds up on the host starting from zeros. On the
    /// CPU `sum` adds straight into `acc`.
    fn add_from_host(
        &self,
        acc: &mut Self::Buf,
        n: usize,
        staging: &mut Vec<f32>,
        sum: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<()>;

    /// `buf[..n] = 0`.
    fn zero(&self, buf: &mut Self::Buf, n: usize) -> Result<()>;

    /// Rotary phases for positions `p0..p0 + t_n`, `[t_n, head_dim / 2]` each, once per call for
    /// every layer's [`Backend::rope`] (a device that computes them inside its RoPE kernel may
    /// leave them empty).
    fn rope_phases(&self, p0: usize, t_n: usize, head_dim: usize, theta: f64, cos: &mut Self::Buf, sin: &mut Self::Buf) -> Result<()>;

    /// `out[..n_rows]` = rows `first_row..first_row + n_rows` of `x`, each RMS-normed by `scale`.
    fn rms_norm_rows(&self, x: &Self::Buf, first_row: usize, n_rows: usize, scale: Tensor, eps: f32, out: &mut Self::Buf) -> Result<()>;

    /// `acc[..n_rows] += rms_norm(x[..n_rows]) * scale` (the residual add); `tmp` holds one row.
    fn add_rms_norm_rows(&self, acc: &mut Self::Buf, x: &Self::Buf, n_rows: usize, scale: Tensor, eps: f32, tmp: &mut Self::Buf) -> Result<()>;

    /// `y[..n_rows] = m x[..n_rows]` for the dense matrix `m`.
    fn project(&self, m: Tensor, x: &Self::Buf, n_rows: usize, y: &mut Self::Buf) -> Result<()>;

    /// Rotate each head of `n_rows` rows of `width` values, row `t` at position `p0 + t`, by the
    /// phases `rope_phases` computed for them.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        n_rows: usize,
        width: usize,
        head_dim: usize,
        p0: usize,
        theta: f64,
        cos: &Self::Buf,
        sin: &Self::Buf,
    ) -> Result<()>;

    /// Write `k`, `v` of `t_n` tokens at `p0` into `cache` for `layer`, then attend `q` over it.
    /// The cache is the sequence's `KvCache`: the CPU's keys and values live in it; a device
    /// keeps its own for that sequence (the emulated device uses the host's, which no step
    /// copies over the bus).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        p0: usize,
        t_n: usize,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        cache: &mut KvCache,
        out: &mut Self::Buf,
        scratch: &mut AttnScratch,
    ) -> Result<()>;

    /// Add expert `e` of `layer`, weighted by each member's gate, to the member rows of `out`
    /// (`members`: (row, gate) pairs). Only called for experts [`Backend::holds_expert`] names.
    #[allow(clippy::too_many_arguments)]
    fn expert(
        &self,
        layer: usize,
        e: usize,
        xn: &Self::Buf,
        t_n: usize,
        members: &[(usize, f32)],
        out: &mut Self::Buf,
        scratch: &mut ExpertScratch,
    ) -> Result<()>;

    /// The tied output head over `n_rows` normed rows, into the host's `logits`.
    fn logits(&self, xn: &Self::Buf, n_rows: usize, logits: &mut [f32], staging: &mut Vec<f32>) -> Result<()>;

    /// One layer routed `chosen` (token, expert) pairs, `on_device` of them to this backend.
    fn routed(&self, _chosen: u64, _on_device: u64) {}
}

/// The host: computes with the model's own weights, in place.
pub struct Cpu<'a> {
    weights: &'a Weights,
    attn: &'a AttnParams,
}

impl<'a> Cpu<'a> {
    pub fn new(weights: &'a Weights, attn: &'a AttnParams) -> Cpu<'a> {
        Cpu { weights, attn }
    }
}

impl Backend for Cpu<'_> {
    type Buf = Vec<f32>;

    #[inline]
    fn reserve(&self, buf: &mut Vec<f32>, n: usize) -> Result<()> {
        if buf.len() < n {
            buf.resize(n, 0.0);
        }
        Ok(())
    }

    #[inline]
    fn upload(&self, dst: &mut Vec<f32>, n: usize, _staging: &mut Vec<f32>, fill: impl FnOnce(&mut [f32])) -> Result<()> {
        self.reserve(dst, n)?;
        fill(&mut dst[..n]);
        Ok(())
    }

    #[inline]
    fn download<'b>(&self, src: &'b Vec<f32>, n: usize, _staging: &'b mut Vec<f32>) -> Result<&'b [f32]> {
        Ok(&src[..n])
    }

    #[inline]
    fn add_from_host(
        &self,
        acc: &mut Vec<f32>,
        n: usize,
        _staging: &mut Vec<f32>,
        sum: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<()> {
        sum(&mut acc[..n])
    }

    fn zero(&self, buf: &mut Vec<f32>, n: usize) -> Result<()> {
        buf[..n].fill(0.0);
        Ok(())
    }

    fn rope_phases(&self, p0: usize, t_n: usize, hd: usize, theta: f64, cos: &mut Vec<f32>, sin: &mut Vec<f32>) -> Result<()> {
        self.reserve(cos, t_n * hd / 2)?;
        self.reserve(sin, t_n * hd / 2)?;
        for t in 0..t_n {
            let (cs, sn) = (&mut cos[t * hd / 2..][..hd / 2], &mut sin[t * hd / 2..][..hd / 2]);
            rope_phases(p0 + t, hd, theta, cs, sn);
        }
        Ok(())
    }

    fn rms_norm_rows(&self, x: &Vec<f32>, first: usize, n: usize, scale: Tensor, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        let scale = self.weights.vector(scale);
        let d = scale.len();
        rms_norm_rows(&x[first * d..][..n * d], scale, eps, &mut out[..n * d]);
        Ok(())
    }

    fn add_rms_norm_rows(&self, acc: &mut Vec<f32>, x: &Vec<f32>, n: usize, scale: Tensor, eps: f32, tmp: &mut Vec<f32>) -> Result<()> {
        let scale = self.weights.vector(scale);
        let d = scale.len();
        add_rms_norm_rows(&mut acc[..n * d], &x[..n * d], scale, eps, &mut tmp[..d]);
        Ok(())
    }

    fn project(&self, m: Tensor, x: &Vec<f32>, n: usize, y: &mut Vec<f32>) -> Result<()> {
        let m = self.weights.matrix(m);
        project(m, &x[..n * m.cols], n, &mut y[..n * m.rows]);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        n: usize,
        width: usize,
        hd: usize,
        _p0: usize,
        _theta: f64,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
    ) -> Result<()> {
        for t in 0..n {
            let (cs, sn) = (&cos[t * hd / 2..][..hd / 2], &sin[t * hd / 2..][..hd / 2]);
            rope_in_place(&mut x[t * width..][..width], hd, cs, sn);
        }
        Ok(())
    }

    fn attention(
        &self,
        layer: usize,
        p0: usize,
        t_n: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cache: &mut KvCache,
        out: &mut Vec<f32>,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        attention_on_host(self.attn, layer, p0, t_n, q, k, v, cache, out, scratch);
        Ok(())
    }

    fn expert(
        &self,
        layer: usize,
        e: usize,
        xn: &Vec<f32>,
        t_n: usize,
        members: &[(usize, f32)],
        out: &mut Vec<f32>,
        scratch: &mut ExpertScratch,
    ) -> Result<()> {
        let x = self.weights.expert(layer, e);
        let d = x.down.rows;
        expert_rows(x, &xn[..t_n * d], members, &mut out[..t_n * d], scratch);
        Ok(())
    }

    fn logits(&self, xn: &Vec<f32>, n: usize, logits: &mut [f32], _staging: &mut Vec<f32>) -> Result<()> {
        let m = &self.weights.embedding;
        project(m, &xn[..n * m.cols], n, logits);
        Ok(())
    }
}

/// The KV write and attention of one layer, on host memory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_on_host(
    attn: &AttnParams,
    layer: usize,
    p0: usize,
    t_n: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cache: &mut KvCache,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let (qd, kvd) = (attn.n_q_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim);
    cache.write(layer, p0, &k[..t_n * kvd], &v[..t_n * kvd]);
    let (kc, vc) = cache.layer(layer);
    attend(attn, &q[..t_n * qd], p0, kc, vc, cache.capacity(), cache.key_valid(), &mut out[..t_n * qd], scratch);
}
