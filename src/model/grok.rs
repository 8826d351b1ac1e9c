//! The Grok-1 forward pass, top to bottom in the order the data flows. All math is f32; weights
//! are whatever `Matrix` holds. The same code runs a prompt as a batch (`prefill`: matrix-matrix
//! products, tokens grouped by expert) and one token at a time (`decode`: matrix-vector products,
//! no allocation once the buffers have grown), on the CPU or on a device (`backend`): each step
//! names its weights, and the backend computes it where it holds them.

use super::attention::{AttnParams, AttnScratch};
use super::backend::{Backend, Cpu};
use super::kv_cache::KvCache;
use super::moe::{moe, MoeScratch};
use super::weights::Weights;
use crate::observe::MoeObserver;
use crate::checkpoint::Tensor;
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use crate::residency::{ExpertSource, ExpertStore};
use std::sync::{Arc, Mutex};

pub struct Model {
    config: GrokConfig,
    weights: Weights,
    /// Streams the experts when they are not in `weights`.
    store: Option<ExpertStore>,
    /// Bytes of one expert's three matrices.
    expert_bytes: usize,
    attn: AttnParams,
    /// Buffers of the decode loop on the CPU, kept between tokens.
    decode_scratch: Mutex<Scratch<Vec<f32>>>,
    /// Told what every forward pass routes (a routing trace), when set.
    observer: Option<Arc<dyn MoeObserver>>,
}

// One model serves any number of caches, from any thread.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Model>();
};

/// Activations of one forward call, `[T, width]` each, in a backend's buffers `B`; kept
/// between calls so that decoding allocates nothing.
#[derive(Default)]
pub struct Scratch<B> {
    h: B,
    xn: B,
    q: B,
    k: B,
    v: B,
    attn_out: B,
    /// A sub-block's output before its norm: attention after `o`, then the MoE.
    block_out: B,
    row: B,
    cos: B,
    sin: B,
    /// Host side of the embedding rows on their way in.
    staging: Vec<f32>,
    attn: AttnScratch,
    moe: MoeScratch,
}

/// Which rows of logits a forward call produces.
#[derive(Clone, Copy, PartialEq)]
enum Emit {
    AllRows,
    LastRow,
}

impl Model {
    pub fn new(config: GrokConfig, weights: Weights) -> Result<Model> {
        if weights.layers.iter().any(|l| l.experts.is_empty()) {
            return Err(Error::Invalid("the weights hold no experts: use Model::with_store".into()));
        }
        // The mean: experts may have different types (a size-targeted conversion).
        let all = weights.layers.iter().flat_map(|l| &l.experts);
        let expert_bytes = all.clone().map(|x| x.nbytes()).sum::<usize>() / all.count().max(1);
        Model::build(config, weights, None, expert_bytes)
    }

    /// A model whose experts come from `store` (`weights` holds the dense part only).
    pub fn with_store(config: GrokConfig, weights: Weights, store: ExpertStore, expert_bytes: usize) -> Result<Model> {
        Model::build(config, weights, Some(store), expert_bytes)
    }

    fn build(config: GrokConfig, weights: Weights, store: Option<ExpertStore>, expert_bytes: usize) -> Result<Model> {
        config.validate().map_err(Error::Invalid)?;
        weights.check(&config)?;
        Ok(Model {
            attn: AttnParams::from_config(&config),
            config,
            weights,
            store,
            expert_bytes,
            decode_scratch: Mutex::new(Scratch::default()),
            observer: None,
        })
    }

    /// Tell `observer` what every later forward pass routes, on any backend (a call's own
    /// observer, as `prefill_observed` sets, goes first).
    pub fn set_observer(&mut self, observer: Arc<dyn MoeObserver>) {
        self.observer = Some(observer);
    }

    /// The expert store, when experts are streamed.
    pub fn store(&self) -> Option<&ExpertStore> {
        self.store.as_ref()
    }

    /// Where the MoE takes its experts from: the store when they are streamed, else the weights.
    fn experts(&self) -> &dyn ExpertSource {
        match &self.store {
            Some(store) => store,
            None => &self.weights,
        }
    }

    pub fn config(&self) -> &GrokConfig {
        &self.config
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Run `tokens` as one batch after whatever `cache` already holds; returns the logits of
    /// every token (`[T, vocab]`, row-major) or of the last one only (`[vocab]`).
    pub fn prefill(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Vec<f32>> {
        let rows = if all_logits { tokens.len() } else { 1 };
        let mut logits = vec![0f32; rows * self.config.vocab_size];
        let emit = if all_logits { Emit::AllRows } else { Emit::LastRow };
        self.forward(&self.cpu(), tokens, cache, &mut Scratch::default(), emit, &mut logits)?;
        Ok(logits)
    }

    /// `prefill` on the CPU with `observer` told what the MoE routes and computes (calibration);
    /// returns the last token's logits.
    pub fn prefill_observed(&self, tokens: &[u32], cache: &mut KvCache, observer: Arc<dyn MoeObserver>) -> Result<Vec<f32>> {
        let mut logits = vec![0f32; self.config.vocab_size];
        let mut s = Scratch::default();
        s.moe.observer = Some(observer);
        self.forward(&self.cpu(), tokens, cache, &mut s, Emit::LastRow, &mut logits)?;
        Ok(logits)
    }

    /// `prefill` on backend `b`.
    pub fn prefill_on<B: Backend>(&self, b: &B, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Vec<f32>> {
        let rows = if all_logits { tokens.len() } else { 1 };
        let mut logits = vec![0f32; rows * self.config.vocab_size];
        let emit = if all_logits { Emit::AllRows } else { Emit::LastRow };
        self.forward(b, tokens, cache, &mut Scratch::default(), emit, &mut logits)?;
        Ok(logits)
    }

    /// `decode_into` on backend `b`, with the caller's buffers for it.
    pub fn decode_into_on<B: Backend>(
        &self,
        b: &B,
        token: u32,
        cache: &mut KvCache,
        logits: &mut [f32],
        s: &mut Scratch<B::Buf>,
    ) -> Result<()> {
        self.forward(b, &[token], cache, s, Emit::LastRow, logits)
    }

    /// The CPU backend over this model's weights.
    fn cpu(&self) -> Cpu<'_> {
        Cpu::new(&self.weights, &self.attn)
    }

    /// One token at the next position of `cache`; returns its logits.
    pub fn decode(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        let mut logits = vec![0f32; self.config.vocab_size];
        self.decode_into(token, cache, &mut logits)?;
        Ok(logits)
    }

    /// `decode` into a caller's buffer of `vocab` logits: nothing is allocated per token.
    pub fn decode_into(&self, token: u32, cache: &mut KvCache, logits: &mut [f32]) -> Result<()> {
        let mut s = self.decode_scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.forward(&self.cpu(), &[token], cache, &mut s, Emit::LastRow, logits)
    }

    /// Bytes of weights one decoded token reads: the embedding row, every layer's attention,
    /// router and norms, `k` experts per layer, and the whole tied output head.
    pub fn decode_weight_bytes(&self) -> usize {
        let w = &self.weights;
        let emb = &w.embedding;
        let mut total = emb.nbytes() / emb.rows + emb.nbytes() + 4 * w.output_norm.len();
        for lw in &w.layers {
            total += lw.dense_nbytes() + self.config.n_experts_per_token * self.expert_bytes;
        }
        total
    }

    fn forward<B: Backend>(
        &self,
        b: &B,
        tokens: &[u32],
        cache: &mut KvCache,
        s: &mut Scratch<B::Buf>,
        emit: Emit,
        logits: &mut [f32],
    ) -> Result<()> {
        let c = &self.config;
        let w = &self.weights;
        let (t_n, p0) = (tokens.len(), cache.len());
        let (d, qd, kvd, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.head_dim);
        let eps = c.rms_norm_eps as f32;
        self.check_call(tokens, cache, emit, logits)?;
        if s.moe.observer.is_none() {
            s.moe.observer = self.observer.clone();
        }
        if let Some(o) = &s.moe.observer {
            o.pass_started(p0, t_n);
        }

        // The new positions' pad flags must be in place before any layer attends to them.
        cache.append_tokens(tokens);

        // Rotary phases depend only on the absolute position: once per call, for every layer.
        b.rope_phases(p0, t_n, hd, c.rope_theta, &mut s.cos, &mut s.sin)?;

        // Embedding, scaled: looked up on the host, one row per token.
        b.upload(&mut s.h, t_n * d, &mut s.staging, |h| {
            for (t, &tok) in tokens.iter().enumerate() {
                let row = &mut h[t * d..][..d];
                w.embedding.row_f32(tok as usize, row);
                for x in row.iter_mut() {
                    *x *= c.embedding_multiplier as f32;
                }
            }
        })?;

        for (buf, n) in [(&mut s.xn, t_n * d), (&mut s.q, t_n * qd), (&mut s.k, t_n * kvd), (&mut s.v, t_n * kvd)] {
            b.reserve(buf, n)?;
        }
        for (buf, n) in [(&mut s.attn_out, t_n * qd), (&mut s.block_out, t_n * d), (&mut s.row, d)] {
            b.reserve(buf, n)?;
        }

        for l in 0..c.n_layers {
            // Attention: h += norm1(attn(norm0(h)))
            b.rms_norm_rows(&s.h, 0, t_n, Tensor::AttnNorm(l), eps, &mut s.xn)?;
            b.project(Tensor::AttnQ(l), &s.xn, t_n, &mut s.q)?;
            b.project(Tensor::AttnK(l), &s.xn, t_n, &mut s.k)?;
            b.project(Tensor::AttnV(l), &s.xn, t_n, &mut s.v)?;
            b.rope(&mut s.q, t_n, qd, hd, p0, c.rope_theta, &s.cos, &s.sin)?;
            b.rope(&mut s.k, t_n, kvd, hd, p0, c.rope_theta, &s.cos, &s.sin)?;
            b.attention(l, p0, t_n, &s.q, &s.k, &s.v, cache, &mut s.attn_out, &mut s.attn)?;
            b.project(Tensor::AttnO(l), &s.attn_out, t_n, &mut s.block_out)?;
            b.add_rms_norm_rows(&mut s.h, &s.block_out, t_n, Tensor::AttnOutNorm(l), eps, &mut s.row)?;

            // Mixture of experts: h += norm3(moe(norm2(h)))
            b.rms_norm_rows(&s.h, 0, t_n, Tensor::FfnNorm(l), eps, &mut s.xn)?;
            let k = c.n_experts_per_token;
            moe(b, self.experts(), w, l, c.n_experts, k, &s.xn, t_n, &mut s.block_out, &mut s.moe)?;
            b.add_rms_norm_rows(&mut s.h, &s.block_out, t_n, Tensor::FfnOutNorm(l), eps, &mut s.row)?;
        }

        // Final norm, then the tied output head.
        let first = if emit == Emit::AllRows { 0 } else { t_n - 1 };
        let n_out = t_n - first;
        b.rms_norm_rows(&s.h, first, n_out, Tensor::OutputNorm, eps, &mut s.xn)?;
        b.logits(&s.xn, n_out, logits, &mut s.staging)?;
        for x in logits.iter_mut() {
            *x *= c.output_multiplier as f32;
        }
        self.experts().tokens_done(t_n as u64);
        Ok(())
    }

    fn check_call(&self, tokens: &[u32], cache: &KvCache, emit: Emit, logits: &[f32]) -> Result<()> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(Error::Invalid("forward pass over zero tokens".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
        if !cache.fits(c) {
            return Err(Error::Invalid(
                "the KV cache was made for a model with other layers or heads".into(),
            ));
        }
        if cache.len() + tokens.len() > cache.capacity() {
            return Err(Error::Invalid(format!(
                "KV cache full: {} positions held, {} more asked for, capacity {}",
                cache.len(),
                tokens.len(),
                cache.capacity()
            )));
        }
        let rows = if emit == Emit::AllRows { tokens.len() } else { 1 };
        if logits.len() != rows * c.vocab_size {
            return Err(Error::Invalid(format!(
                "logit buffer holds {} values, {rows} row(s) of {} needed",
                logits.len(),
                c.vocab_size
            )));
        }
        Ok(())
    }
}
