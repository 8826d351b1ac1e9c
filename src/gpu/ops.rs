//! The element-wise ops, attention and the device KV cache: thin launchers over `cu/ops.cu` and
//! `cu/attention.cu` that check buffer sizes before queueing work.

use super::device::{gpu_err, Gpu};
use super::launch;
use super::matrix::launch_on;
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(Error::Invalid(format!("{what}: buffer of {have} floats, needs {want}")));
    }
    Ok(())
}

/// What attention needs to know about the heads (`model::attention::AttnParams` on the CPU).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub multiplier: f32,
    pub logit_cap: f32,
}

impl AttnShape {
    pub fn from_config(c: &GrokConfig) -> AttnShape {
        AttnShape {
            n_q_heads: c.n_q_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            multiplier: c.attn_output_multiplier as f32,
            logit_cap: c.attn_logit_cap as f32,
        }
    }

    /// The most keys one attention call can see (its scores live in shared memory).
    pub fn max_keys(&self) -> usize {
        launch::attention_max_keys(self.head_dim)
    }
}

impl Gpu {
    /// `out[r] = scale * x[r] / sqrt(mean(x[r]^2) + eps)` for the `n = x.len() / d` rows of `x`;
    /// with `accumulate`, `out[r] +=` that (norm then residual add).
    pub fn rms_norm_rows(
        &self,
        x: &CudaView<'_, f32>,
        scale: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
        d: usize,
        eps: f32,
        accumulate: bool,
    ) -> Result<()> {
        let n = x.len() / d.max(1);
        need("rms_norm scale", scale.len(), d)?;
        need("rms_norm output", out.len(), n * d)?;
        let (d_i, acc) = (d as i32, accumulate as i32);
        let mut b = self.stream().launch_builder(self.func("rms_norm_rows"));
        b.arg(x).arg(scale).arg(out).arg(&d_i).arg(&eps).arg(&acc);
        // SAFETY: arguments match `rms_norm_rows` in cu/ops.cu; sizes checked above.
        unsafe { launch_on(&mut b, launch::rows(n), "rms_norm_rows") }?;
        Ok(())
    }

    /// Rotate-half RoPE in place on `[n_tok][n_heads][head_dim]`, token `t` at `pos0 + t`.
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        n_tok: usize,
        n_heads: usize,
        head_dim: usize,
        pos0: usize,
        theta: f64,
    ) -> Result<()> {
        need("rope input", x.len(), n_tok * n_heads * head_dim)?;
        if head_dim % 2 != 0 {
            return Err(Error::Invalid(format!("RoPE needs an even head_dim, got {head_dim}")));
        }
        let (t, h, hd, p) = (n_tok as i32, n_heads as i32, head_dim as i32, pos0 as i32);
        let mut b = self.stream().launch_builder(self.func("rope_rows"));
        b.arg(x).arg(&t).arg(&h).arg(&hd).arg(&p).arg(&theta);
        // SAFETY: arguments match `rope_rows`; size checked above.
        unsafe { launch_on(&mut b, launch::elementwise(n_tok * n_heads * head_dim / 2), "rope_rows") }?;
        Ok(())
    }

    /// Softmax of each row of `len` values, in place.
    pub fn softmax_rows(&self, x: &mut CudaViewMut<'_, f32>, len: usize) -> Result<()> {
        let n = x.len() / len.max(1);
        let l = len as i32;
        let mut b = self.stream().launch_builder(self.func("softmax_rows"));
        b.arg(x).arg(&l);
        // SAFETY: arguments match `softmax_rows`.
        unsafe { launch_on(&mut b, launch::rows(n), "softmax_rows") }?;
        Ok(())
    }

    /// `x = gelu_tanh(x)` element-wise.
    pub fn gelu_tanh(&self, x: &mut CudaViewMut<'_, f32>) -> Result<()> {
        let n = x.len() as i64;
        let mut b = self.stream().launch_builder(self.func("gelu_tanh"));
        b.arg(x).arg(&n);
        // SAFETY: arguments match `gelu_tanh`.
        unsafe { launch_on(&mut b, launch::elementwise(n as usize), "gelu_tanh") }?;
        Ok(())
    }

    /// `gate = gelu_tanh(gate) * up`, the expert's GeGLU product.
    pub fn geglu(&self, gate: &mut CudaViewMut<'_, f32>, up: &CudaView<'_, f32>) -> Result<()> {
        need("geglu up", up.len(), gate.len())?;
        let n = gate.len() as i64;
        let mut b = self.stream().launch_builder(self.func("geglu"));
        b.arg(gate).arg(up).arg(&n);
        // SAFETY: arguments match `geglu`; size checked above.
        unsafe { launch_on(&mut b, launch::elementwise(n as usize), "geglu") }?;
        Ok(())
    }

    /// `dst[i] = src[idx[i]]` for rows of `d` floats. Indices are trusted to lie inside `src`.
    pub fn gather_rows(
        &self,
        src: &CudaView<'_, f32>,
        idx: &CudaView<'_, i32>,
        dst: &mut CudaViewMut<'_, f32>,
        d: usize,
    ) -> Result<()> {
        let n = idx.len();
        need("gather output", dst.len(), n * d)?;
        let (n_i, d_i) = (n as i32, d as i32);
        let mut b = self.stream().launch_builder(self.func("gather_rows"));
        b.arg(src).arg(idx).arg(dst).arg(&n_i).arg(&d_i);
        // SAFETY: arguments match `gather_rows`; output size checked above.
        unsafe { launch_on(&mut b, launch::elementwise(n * d), "gather_rows") }?;
        Ok(())
    }

    /// `dst[idx[i]] += g[i] * src[i]` for rows of `d` floats; `idx` must not repeat.
    pub fn scatter_add_rows(
        &self,
        src: &CudaView<'_, f32>,
        idx: &CudaView<'_, i32>,
        g: &CudaView<'_, f32>,
        dst: &mut CudaViewMut<'_, f32>,
        d: usize,
    ) -> Result<()> {
        let n = idx.len();
        need("scatter source", src.len(), n * d)?;
        need("scatter gates", g.len(), n)?;
        let (n_i, d_i) = (n as i32, d as i32);
        let mut b = self.stream().launch_builder(self.func("scatter_add_rows"));
        b.arg(src).arg(idx).arg(g).arg(dst).arg(&n_i).arg(&d_i);
        // SAFETY: arguments match `scatter_add_rows`; sizes checked above.
        unsafe { launch_on(&mut b, launch::elementwise(n * d), "scatter_add_rows") }?;
        Ok(())
    }
}

/// Keys and values of every layer on the device, f32, `[n_kv][capacity][head_dim]` per layer
/// (the CPU cache's layout), and which positions hold a non-pad token.
pub struct DeviceKvCache {
    pub capacity: usize,
    n_kv: usize,
    head_dim: usize,
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    key_valid: CudaSlice<u8>,
    len: usize,
    pad: u32,
}

impl DeviceKvCache {
    pub fn new(gpu: &Gpu, c: &GrokConfig, capacity: usize) -> Result<DeviceKvCache> {
        let per_layer = c.n_kv_heads * capacity * c.head_dim;
        let mut k = Vec::with_capacity(c.n_layers);
        let mut v = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            k.push(gpu.zeros(per_layer)?);
            v.push(gpu.zeros(per_layer)?);
        }
        Ok(DeviceKvCache {
            capacity,
            n_kv: c.n_kv_heads,
            head_dim: c.head_dim,
            k,
            v,
            key_valid: gpu.zeros(capacity)?,
            len: 0,
            pad: c.pad_token_id,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget every position from `len` on (a sequence cut back, or cleared with 0).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Claim positions `len .. len + tokens.len()`; their keys and values are written per layer.
    pub fn append_tokens(&mut self, gpu: &Gpu, tokens: &[u32]) -> Result<()> {
        if self.len + tokens.len() > self.capacity {
            return Err(Error::Invalid(format!(
                "device KV cache holds {} positions; {} + {} do not fit",
                self.capacity,
                self.len,
                tokens.len()
            )));
        }
        let valid: Vec<u8> = tokens.iter().map(|&t| (t != self.pad) as u8).collect();
        let mut dst = self.key_valid.slice_mut(self.len..self.len + tokens.len());
        gpu.stream().memcpy_htod(&valid, &mut dst).map_err(gpu_err("key mask upload"))?;
        self.len += tokens.len();
        Ok(())
    }

    /// Store `k`, `v` (`[n][n_kv * head_dim]`, token-major) of `layer` at positions `pos0 ..`.
    pub fn write(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        pos0: usize,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
    ) -> Result<()> {
        let kvd = self.n_kv * self.head_dim;
        let n = k.len() / kvd;
        need("kv_write values", v.len(), n * kvd)?;
        if pos0 + n > self.capacity {
            return Err(Error::Invalid(format!(
                "positions {pos0}..{} past the device cache's {}",
                pos0 + n,
                self.capacity
            )));
        }
        let (n_i, g, hd, cap, p) =
            (n as i32, self.n_kv as i32, self.head_dim as i32, self.capacity as i32, pos0 as i32);
        let mut b = gpu.stream().launch_builder(gpu.func("kv_write"));
        b.arg(k).arg(v).arg(&mut self.k[layer]).arg(&mut self.v[layer]);
        b.arg(&n_i).arg(&g).arg(&hd).arg(&cap).arg(&p);
        // SAFETY: arguments match `kv_write`; positions checked above.
        unsafe { launch_on(&mut b, launch::elementwise(n * kvd), "kv_write") }?;
        Ok(())
    }

    /// Attention of the `T = q.len() / (n_q_heads * head_dim)` queries at positions
    /// `p0 .. p0 + T` over this layer's keys `0 .. p0 + T` (already written).
    pub fn attend(
        &self,
        gpu: &Gpu,
        shape: &AttnShape,
        layer: usize,
        q: &CudaView<'_, f32>,
        p0: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let qd = shape.n_q_heads * shape.head_dim;
        let t = q.len() / qd;
        let n_keys = p0 + t;
        need("attention output", out.len(), t * qd)?;
        if shape.n_kv_heads != self.n_kv
            || shape.head_dim != self.head_dim
            || shape.n_q_heads % shape.n_kv_heads != 0
        {
            return Err(Error::Invalid(format!("attention shape {shape:?} does not fit the device cache")));
        }
        if n_keys > self.len || n_keys > shape.max_keys() {
            return Err(Error::Invalid(format!(
                "attention over {n_keys} keys: the cache holds {}, one call sees at most {}",
                self.len,
                shape.max_keys()
            )));
        }
        let g = launch::attention(shape.n_q_heads, t, shape.head_dim, n_keys);
        let ints =
            [t, p0, shape.n_q_heads, shape.n_kv_heads, shape.head_dim, self.capacity].map(|v| v as i32);
        let mut b = gpu.stream().launch_builder(gpu.func("attention"));
        b.arg(q).arg(&self.k[layer]).arg(&self.v[layer]).arg(&self.key_valid).arg(out);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&shape.multiplier).arg(&shape.logit_cap);
        // SAFETY: arguments match `attention` in cu/attention.cu; sizes and shared memory checked.
        unsafe { launch_on(&mut b, g, "attention") }?;
        Ok(())
    }
}
