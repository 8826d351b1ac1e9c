//! Keys and values of every position seen so far, per layer, after RoPE (as the release caches
//! them), in f32. Stored head-major, `[kv_head][position][head_dim]`, so that one attention head
//! walks one contiguous block of memory.

use crate::config::GrokConfig;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Identities of caches, so that a device can keep its own keys and values for each.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Where dropped caches leave their ids, so that a device can free its copies of them.
#[derive(Clone, Default)]
pub struct KvDropList(Arc<Mutex<Vec<u64>>>);

impl KvDropList {
    /// The ids left since the last call.
    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

pub struct KvCache {
    /// Unique in this process.
    id: u64,
    /// Told this cache's id when it is dropped.
    on_drop: Vec<KvDropList>,
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// Per layer, `[n_kv_heads, capacity, head_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    tokens: Vec<u32>,
    /// `key_valid[s]`: position `s` may be attended to (its token is not the pad token).
    key_valid: Vec<bool>,
    pad_token_id: u32,
}

impl KvCache {
    /// Room for `max_tokens` positions. The memory is zeroed lazily by the OS, so an unused
    /// tail costs address space, not RAM.
    pub fn new(config: &GrokConfig, max_tokens: usize) -> KvCache {
        let per_layer = config.n_kv_heads * max_tokens * config.head_dim;
        KvCache {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            on_drop: Vec::new(),
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            capacity: max_tokens,
            k: (0..config.n_layers).map(|_| vec![0f32; per_layer]).collect(),
            v: (0..config.n_layers).map(|_| vec![0f32; per_layer]).collect(),
            tokens: Vec::with_capacity(max_tokens),
            key_valid: Vec::with_capacity(max_tokens),
            pad_token_id: config.pad_token_id,
        }
    }

    /// Positions filled so far; the next token goes to position `len()`.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The tokens at positions `0..len()`.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forget positions `len..`; a shorter prefix can then be continued differently.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.key_valid.truncate(len);
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes held for keys and values.
    pub fn nbytes(&self) -> usize {
        2 * self.k.len() * self.n_kv_heads * self.capacity * self.head_dim * 4
    }

    /// Claim the next positions for `tokens`; their keys and values are written per layer next.
    pub(crate) fn append_tokens(&mut self, tokens: &[u32]) {
        debug_assert!(self.len() + tokens.len() <= self.capacity);
        self.tokens.extend_from_slice(tokens);
        let pad = self.pad_token_id;
        self.key_valid.extend(tokens.iter().map(|&t| t != pad));
    }

    /// Whether this cache was made for a model of `config`'s shape.
    pub(crate) fn fits(&self, config: &GrokConfig) -> bool {
        self.k.len() == config.n_layers
            && self.n_kv_heads == config.n_kv_heads
            && self.head_dim == config.head_dim
    }

    /// This cache's identity: a device keys its own copy of the sequence by it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Leave this cache's id in `list` when it is dropped (once, however often asked).
    pub fn notify_on_drop(&mut self, list: &KvDropList) {
        if !self.on_drop.iter().any(|l| Arc::ptr_eq(&l.0, &list.0)) {
            self.on_drop.push(list.clone());
        }
    }

    pub(crate) fn key_valid(&self) -> &[bool] {
        &self.key_valid
    }

    /// Store `k`, `v` (`[n, kv_heads * head_dim]`, token-major) at positions `pos0..pos0 + n`.
    pub(crate) fn write(&mut self, layer: usize, pos0: usize, k: &[f32], v: &[f32]) {
        let (hd, cap) = (self.head_dim, self.capacity);
        let kv_dim = self.n_kv_heads * hd;
        let n = k.len() / kv_dim;
        debug_assert!(pos0 + n <= cap);
        for (src, dst) in [(k, &mut self.k[layer]), (v, &mut self.v[layer])] {
            for t in 0..n {
                for g in 0..self.n_kv_heads {
                    let from = &src[t * kv_dim + g * hd..][..hd];
                    dst[(g * cap + pos0 + t) * hd..][..hd].copy_from_slice(from);
                }
            }
        }
    }

    /// Keys and values of `layer`, `[kv_heads, capacity, head_dim]`.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        for l in &self.on_drop {
            l.0.lock().unwrap().push(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_cache_leaves_its_id_in_each_list_once() {
        let c = crate::synth::Preset::by_name("micro").unwrap().config;
        let (a, b) = (KvDropList::default(), KvDropList::default());
        let mut x = KvCache::new(&c, 4);
        let y = KvCache::new(&c, 4);
        let (xid, yid) = (x.id(), y.id());
        assert_ne!(xid, yid);
        x.notify_on_drop(&a);
        x.notify_on_drop(&a);
        x.notify_on_drop(&b);
        drop(y);
        assert!(a.take().is_empty(), "a cache that was never registered is not reported");
        drop(x);
        assert_eq!(a.take(), vec![xid]);
        assert_eq!(b.take(), vec![xid]);
        assert!(a.take().is_empty());
    }
}
