//! The weights the forward pass reads. Matrices are `kernels::Matrix` in canonical `[out, in]`
//! orientation; norm scales and the router stay f32 (routing flips on tiny differences).
//!
//! The struct is plain on purpose: a loader only has to fill it from `(qtype, rows, cols, bytes)`
//! per tensor. The experts may be here (every one resident) or not at all: the MoE takes them
//! from a `residency::ExpertSource`, which `Weights` is for its own experts and the residency
//! store is for streamed ones.

use crate::checkpoint::{Proj, Tensor, TensorSource};
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use crate::expert::Expert;
use crate::kernels::Matrix;
use crate::quant::QuantType;
use crate::residency::ExpertSource;
use rayon::prelude::*;

pub struct LayerWeights {
    /// Pre-attention norm (`rms_norm`).
    pub attn_norm: Vec<f32>,
    /// `[q_heads * head_dim, d_model]`, output feature `j` is head `j / head_dim`.
    pub q: Matrix,
    /// `[kv_heads * head_dim, d_model]`
    pub k: Matrix,
    pub v: Matrix,
    /// `[d_model, q_heads * head_dim]`
    pub o: Matrix,
    /// Post-attention norm (`rms_norm_1`), applied to the attention output before the residual.
    pub attn_out_norm: Vec<f32>,
    /// Pre-MoE norm (`rms_norm_2`).
    pub ffn_norm: Vec<f32>,
    /// `[n_experts, d_model]`, row-major f32.
    pub router: Vec<f32>,
    /// Post-MoE norm (`rms_norm_3`).
    pub ffn_out_norm: Vec<f32>,
    /// Every expert of the layer, or none when a store streams them.
    pub experts: Vec<Expert>,
}

impl LayerWeights {
    /// Bytes of the weights every token reads in this layer (everything but the experts).
    pub fn dense_nbytes(&self) -> usize {
        let vecs = self.attn_norm.len() + self.attn_out_norm.len() + self.ffn_norm.len()
            + self.router.len() + self.ffn_out_norm.len();
        self.q.nbytes() + self.k.nbytes() + self.v.nbytes() + self.o.nbytes() + 4 * vecs
    }
}

pub struct Weights {
    /// `[vocab, d_model]`: the input embedding and, tied, the output head.
    pub embedding: Matrix,
    pub output_norm: Vec<f32>,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    /// The expert `e` of `layer` (panics when the experts are not held here).
    pub fn expert(&self, layer: usize, e: usize) -> &Expert {
        &self.layers[layer].experts[e]
    }

    /// A dense matrix by name: the embedding (also the output head) or a layer's attention.
    ///
    /// # Panics
    /// On a tensor that is not a dense matrix.
    pub fn matrix(&self, t: Tensor) -> &Matrix {
        match t {
            Tensor::Embedding => &self.embedding,
            Tensor::AttnQ(l) => &self.layers[l].q,
            Tensor::AttnK(l) => &self.layers[l].k,
            Tensor::AttnV(l) => &self.layers[l].v,
            Tensor::AttnO(l) => &self.layers[l].o,
            other => panic!("{other} is not a dense matrix"),
        }
    }

    /// A norm scale or router by name.
    ///
    /// # Panics
    /// On a tensor that is a matrix.
    pub fn vector(&self, t: Tensor) -> &[f32] {
        match t {
            Tensor::OutputNorm => &self.output_norm,
            Tensor::AttnNorm(l) => &self.layers[l].attn_norm,
            Tensor::AttnOutNorm(l) => &self.layers[l].attn_out_norm,
            Tensor::FfnNorm(l) => &self.layers[l].ffn_norm,
            Tensor::Router(l) => &self.layers[l].router,
            Tensor::FfnOutNorm(l) => &self.layers[l].ffn_out_norm,
            other => panic!("{other} is not an f32 vector"),
        }
    }

    /// Read every tensor of `src`, quantizing the dense matrices (attention and the embedding)
    /// to `dense` and the expert matrices to `experts`.
    pub fn from_source(src: &dyn TensorSource, dense: QuantType, experts: QuantType) -> Result<Weights> {
        let c = src.config().clone();
        let matrix = |t: Tensor| load_matrix(src, t, if t.is_expert() { experts } else { dense });
        let vector = |t: Tensor| load_f32(src, t);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let experts = (0..c.n_experts)
                .map(|expert| {
                    let p = |proj| matrix(Tensor::Expert { layer: l, expert, proj });
                    Ok(Expert { gate: p(Proj::Gate)?, up: p(Proj::Up)?, down: p(Proj::Down)? })
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push(LayerWeights {
                attn_norm: vector(Tensor::AttnNorm(l))?,
                q: matrix(Tensor::AttnQ(l))?,
                k: matrix(Tensor::AttnK(l))?,
                v: matrix(Tensor::AttnV(l))?,
                o: matrix(Tensor::AttnO(l))?,
                attn_out_norm: vector(Tensor::AttnOutNorm(l))?,
                ffn_norm: vector(Tensor::FfnNorm(l))?,
                router: vector(Tensor::Router(l))?,
                ffn_out_norm: vector(Tensor::FfnOutNorm(l))?,
                experts,
            });
        }
        let w = Weights {
            embedding: matrix(Tensor::Embedding)?,
            output_norm: vector(Tensor::OutputNorm)?,
            layers,
        };
        w.check(&c)?;
        Ok(w)
    }

    /// Every shape against the config, naming the first tensor that does not fit.
    pub fn check(&self, c: &GrokConfig) -> Result<()> {
        let mat = |t: Tensor, m: &Matrix| {
            let want = t.shape(c);
            if [m.rows, m.cols] != want[..] {
                return Err(Error::bad_tensor(
                    t.to_string(),
                    format!("matrix is [{}, {}], the config needs {want:?}", m.rows, m.cols),
                ));
            }
            Ok(())
        };
        let vec = |t: Tensor, v: &[f32]| {
            let want: usize = t.shape(c).iter().product();
            if v.len() != want {
                return Err(Error::bad_tensor(
                    t.to_string(),
                    format!("has {} values, the config needs {want}", v.len()),
                ));
            }
            Ok(())
        };
        mat(Tensor::Embedding, &self.embedding)?;
        vec(Tensor::OutputNorm, &self.output_norm)?;
        if self.layers.len() != c.n_layers {
            return Err(Error::Invalid(format!(
                "weights have {} layers, the config {}",
                self.layers.len(),
                c.n_layers
            )));
        }
        for (l, w) in self.layers.iter().enumerate() {
            vec(Tensor::AttnNorm(l), &w.attn_norm)?;
            mat(Tensor::AttnQ(l), &w.q)?;
            mat(Tensor::AttnK(l), &w.k)?;
            mat(Tensor::AttnV(l), &w.v)?;
            mat(Tensor::AttnO(l), &w.o)?;
            vec(Tensor::AttnOutNorm(l), &w.attn_out_norm)?;
            vec(Tensor::FfnNorm(l), &w.ffn_norm)?;
            vec(Tensor::Router(l), &w.router)?;
            vec(Tensor::FfnOutNorm(l), &w.ffn_out_norm)?;
            // Experts streamed by a `residency::ExpertStore` are not held here.
            if !w.experts.is_empty() && w.experts.len() != c.n_experts {
                return Err(Error::Invalid(format!(
                    "layer {l} has {} experts, the config {}",
                    w.experts.len(),
                    c.n_experts
                )));
            }
            for (expert, e) in w.experts.iter().enumerate() {
                let t = |proj| Tensor::Expert { layer: l, expert, proj };
                mat(t(Proj::Gate), &e.gate)?;
                mat(t(Proj::Up), &e.up)?;
                mat(t(Proj::Down), &e.down)?;
            }
        }
        Ok(())
    }
}

/// The experts held here, every one resident.
impl ExpertSource for Weights {
    fn for_each_expert(
        &self,
        layer: usize,
        needed: &[usize],
        f: &mut dyn FnMut(usize, &Expert) -> Result<()>,
    ) -> Result<()> {
        for &e in needed {
            f(e, self.expert(layer, e))?;
        }
        Ok(())
    }
}

fn load_f32(src: &dyn TensorSource, t: Tensor) -> Result<Vec<f32>> {
    let n: usize = t.shape(src.config()).iter().product();
    let mut v = vec![0f32; n];
    src.read_rows(t, 0, &mut v)?;
    Ok(v)
}

fn load_matrix(src: &dyn TensorSource, t: Tensor, qtype: QuantType) -> Result<Matrix> {
    let shape = t.shape(src.config());
    let (rows, cols) = (shape[0], shape[1]);
    // As the converter does: the super-block types fall back to iq4_nl on shorter rows.
    let qtype = qtype.for_row(cols);
    let rb = qtype.row_bytes(cols).ok_or_else(|| {
        Error::bad_tensor(
            t.to_string(),
            format!("{cols} columns is not a whole number of {qtype} blocks of {}", qtype.block_len()),
        )
    })?;
    const BAND: usize = 64;
    let mut bytes = vec![0u8; rows * rb];
    bytes.par_chunks_mut(BAND * rb).enumerate().try_for_each(|(b, out)| {
        let n = out.len() / rb;
        let mut f = vec![0f32; n * cols];
        src.read_rows(t, b * BAND, &mut f)?;
        for (row, o) in f.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
            qtype.quantize_row(row, o);
        }
        Ok::<_, Error>(())
    })?;
    Matrix::from_bytes(qtype, rows, cols, &bytes)
        .map_err(|e| Error::bad_tensor(t.to_string(), e.to_string()))
}
