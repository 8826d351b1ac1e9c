//! Filling `Weights` from a converted model directory, and finding its tokenizer.

use super::weights::{LayerWeights, Weights};
use crate::checkpoint::Tensor;
use crate::error::{Error, IoContext, Result};
use crate::expert::Expert;
use crate::format::ConvertedModel;
use crate::kernels::Matrix;
use crate::quant::QuantType;
use crate::tokenizer::Tokenizer;

fn dense_matrix(m: &ConvertedModel, t: Tensor) -> Result<Matrix> {
    let v = m.dense(&t.to_string())?;
    if v.shape.len() != 2 {
        return Err(Error::bad_tensor(t.to_string(), format!("expected a matrix, found shape {:?}", v.shape)));
    }
    let matrix = Matrix::from_bytes(v.qtype, v.shape[0], v.shape[1], v.bytes)
        .map_err(|e| Error::bad_tensor(t.to_string(), e.to_string()));
    m.release_dense(&t.to_string());
    matrix
}

fn dense_f32(m: &ConvertedModel, t: Tensor) -> Result<Vec<f32>> {
    let v = m.dense(&t.to_string())?;
    if v.qtype != QuantType::F32 {
        return Err(Error::bad_tensor(t.to_string(), format!("stored as {}, expected f32", v.qtype)));
    }
    let mut out = vec![0f32; v.bytes.len() / 4];
    QuantType::F32.dequantize_row(v.bytes, &mut out);
    Ok(out)
}

/// Load every weight into memory. `progress` receives stored bytes as they are loaded.
pub fn load_weights(m: &ConvertedModel, progress: &mut dyn FnMut(u64)) -> Result<Weights> {
    load(m, true, progress)
}

/// Load the dense weights only, for a model whose experts a `residency::ExpertStore` streams.
pub fn load_dense_weights(m: &ConvertedModel, progress: &mut dyn FnMut(u64)) -> Result<Weights> {
    load(m, false, progress)
}

/// Bytes of one expert's matrices, the mean over the experts (a size-targeted conversion gives
/// experts different types).
pub fn expert_bytes(m: &ConvertedModel) -> usize {
    // The mean: with a type per expert the chunks differ.
    let c = m.config();
    let n = c.n_layers * c.n_experts;
    let total: usize = (0..n)
        .map(|i| m.expert_chunk(i / c.n_experts, i % c.n_experts).tensors.iter().map(|t| t.bytes as usize).sum::<usize>())
        .sum();
    total / n.max(1)
}

fn load(m: &ConvertedModel, with_experts: bool, progress: &mut dyn FnMut(u64)) -> Result<Weights> {
    let c = m.config().clone();
    let mut raw = Vec::new();
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let mut experts = Vec::with_capacity(c.n_experts);
        for e in (0..c.n_experts).filter(|_| with_experts) {
            m.read_expert(l, e, &mut raw)?;
            let chunk = m.expert_chunk(l, e);
            experts.push(Expert::from_chunk(chunk, &raw)?);
            progress(chunk.bytes);
        }
        let lw = LayerWeights {
            attn_norm: dense_f32(m, Tensor::AttnNorm(l))?,
            q: dense_matrix(m, Tensor::AttnQ(l))?,
            k: dense_matrix(m, Tensor::AttnK(l))?,
            v: dense_matrix(m, Tensor::AttnV(l))?,
            o: dense_matrix(m, Tensor::AttnO(l))?,
            attn_out_norm: dense_f32(m, Tensor::AttnOutNorm(l))?,
            ffn_norm: dense_f32(m, Tensor::FfnNorm(l))?,
            router: dense_f32(m, Tensor::Router(l))?,
            ffn_out_norm: dense_f32(m, Tensor::FfnOutNorm(l))?,
            experts,
        };
        progress(lw.dense_nbytes() as u64);
        layers.push(lw);
    }
    let w = Weights {
        embedding: dense_matrix(m, Tensor::Embedding)?,
        output_norm: dense_f32(m, Tensor::OutputNorm)?,
        layers,
    };
    progress(w.embedding.nbytes() as u64);
    m.release_mapped_pages();
    w.check(&c)?;
    Ok(w)
}

/// The model's `tokenizer.model`, refused if its sha256 differs from the manifest's.
pub fn load_tokenizer(m: &ConvertedModel) -> Result<Tokenizer> {
    let entry = m.manifest.tokenizer.as_ref().ok_or_else(|| {
        Error::bad_file(m.dir.join(crate::format::MANIFEST_FILE), "this model has no tokenizer.model; use --tokens")
    })?;
    let path = m.dir.join(&entry.file);
    let bytes = std::fs::read(&path).at(&path)?;
    let sha = crate::format::writer::sha256_hex(&bytes);
    if sha != entry.sha256 {
        return Err(Error::bad_file(&path, format!("sha256 {sha} does not match the manifest's {}", entry.sha256)));
    }
    Tokenizer::from_bytes(&bytes).map_err(|e| Error::bad_file(&path, e.to_string()))
}
