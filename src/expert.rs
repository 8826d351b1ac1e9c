//! One expert's weights, the same type wherever the expert lives: held by the model's resident
//! `Weights`, read into the residency cache, or (later) mirrored on a device.
//!
//! It sits below both `model` and `residency` so that neither has to import the other for a
//! struct of three matrices: the model computes with it, residency reads and caches it.

use crate::checkpoint::{Proj, Tensor};
use crate::error::{Error, Result};
use crate::format::manifest::{ExpertChunk, ProjName};
use crate::kernels::Matrix;

/// One expert's GeGLU: `down( gelu(gate x) * (up x) )`.
pub struct Expert {
    /// `linear` in the release, `[ffn, d_model]`; gets the GELU.
    pub gate: Matrix,
    /// `linear_v`, `[ffn, d_model]`, the linear branch.
    pub up: Matrix,
    /// `linear_1`, `[d_model, ffn]`.
    pub down: Matrix,
}

impl Expert {
    /// Bytes of the three matrices' storage.
    pub fn nbytes(&self) -> usize {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }

    /// Build from the raw (decompressed) bytes of the expert's chunk.
    pub fn from_chunk(chunk: &ExpertChunk, raw: &[u8]) -> Result<Expert> {
        let part = |proj| chunk_matrix(chunk, raw, proj);
        Ok(Expert { gate: part(Proj::Gate)?, up: part(Proj::Up)?, down: part(Proj::Down)? })
    }
}

impl std::fmt::Debug for Expert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expert {{ {} bytes }}", self.nbytes())
    }
}

/// One projection of an expert, from the raw (decompressed) bytes of its chunk.
pub fn chunk_matrix(chunk: &ExpertChunk, raw: &[u8], proj: Proj) -> Result<Matrix> {
    let name = || Tensor::Expert { layer: chunk.layer, expert: chunk.expert, proj }.to_string();
    let t = chunk
        .tensors
        .iter()
        .find(|t| t.proj == ProjName::from(proj))
        .ok_or_else(|| Error::bad_tensor(name(), "missing from its expert chunk"))?;
    if t.shape.len() != 2 {
        return Err(Error::bad_tensor(name(), format!("shape {:?}, expected a matrix", t.shape)));
    }
    let bytes = raw
        .get(t.offset as usize..(t.offset + t.bytes) as usize)
        .ok_or_else(|| Error::bad_tensor(name(), "lies past the end of its chunk"))?;
    Matrix::from_bytes(t.qtype, t.shape[0], t.shape[1], bytes).map_err(|e| Error::bad_tensor(name(), e.to_string()))
}
