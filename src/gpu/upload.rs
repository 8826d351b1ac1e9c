//! Copying a converted model's weights to the device: every dense tensor, and experts one
//! chunk at a time, counting the bytes.

use super::device::Gpu;
use super::matrix::DeviceMatrix;
use crate::checkpoint::Tensor;
use crate::error::{Error, Result};
use crate::format::manifest::{ExpertChunk, ProjName};
use crate::format::ConvertedModel;
use crate::quant::QuantType;
use cudarc::driver::CudaSlice;
use std::time::Instant;

/// One layer's dense weights on the device.
pub struct DeviceLayer {
    pub attn_norm: CudaSlice<f32>,
    pub q: DeviceMatrix,
    pub k: DeviceMatrix,
    pub v: DeviceMatrix,
    pub o: DeviceMatrix,
    pub attn_out_norm: CudaSlice<f32>,
    pub ffn_norm: CudaSlice<f32>,
    /// `[n_experts, d_model]` f32.
    pub router: DeviceMatrix,
    pub ffn_out_norm: CudaSlice<f32>,
}

/// Every dense tensor of a model on the device.
pub struct DenseWeights {
    /// `[vocab, d_model]`; on the device as the tied output head (the input embedding is one row
    /// per token, looked up on the host).
    pub embedding: DeviceMatrix,
    pub output_norm: CudaSlice<f32>,
    pub layers: Vec<DeviceLayer>,
}

/// What an upload moved.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UploadStats {
    pub tensors: usize,
    /// Device bytes of the uploaded weights.
    pub bytes: u64,
    pub seconds: f64,
}

impl UploadStats {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9) / 1e9
    }
}

struct Uploader<'a> {
    gpu: &'a Gpu,
    model: &'a ConvertedModel,
    stats: UploadStats,
    progress: &'a mut dyn FnMut(u64),
}

impl Uploader<'_> {
    fn check_shape(&self, t: Tensor, shape: &[usize]) -> Result<()> {
        let want = t.shape(self.model.config());
        if shape != want.as_slice() {
            return Err(Error::bad_tensor(
                t.to_string(),
                format!("shape {shape:?}, the config needs {want:?}"),
            ));
        }
        Ok(())
    }

    fn matrix(&mut self, t: Tensor) -> Result<DeviceMatrix> {
        let v = self.model.dense(&t.to_string())?;
        self.check_shape(t, v.shape)?;
        let m = DeviceMatrix::upload(self.gpu, v.qtype, v.shape[0], v.shape[1], v.bytes)
            .map_err(|e| Error::bad_tensor(t.to_string(), e.to_string()))?;
        self.count(m.nbytes(), v.bytes.len() as u64);
        Ok(m)
    }

    fn vector(&mut self, t: Tensor) -> Result<CudaSlice<f32>> {
        let v = self.model.dense(&t.to_string())?;
        self.check_shape(t, v.shape)?;
        if v.qtype != QuantType::F32 {
            return Err(Error::bad_tensor(t.to_string(), format!("stored as {}, expected f32", v.qtype)));
        }
        let mut f = vec![0f32; v.bytes.len() / 4];
        QuantType::F32.dequantize_row(v.bytes, &mut f);
        let s = self.gpu.upload(&f)?;
        self.count(v.bytes.len() as u64, v.bytes.len() as u64);
        Ok(s)
    }

    fn count(&mut self, device: u64, stored: u64) {
        self.stats.tensors += 1;
        self.stats.bytes += device;
        (self.progress)(stored);
    }
}

impl DenseWeights {
    /// Upload every dense tensor of `model`, checking each shape against its config.
    /// `progress` receives stored bytes as they are copied.
    pub fn upload(
        gpu: &Gpu,
        model: &ConvertedModel,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(DenseWeights, UploadStats)> {
        let t0 = Instant::now();
        let mut u = Uploader { gpu, model, stats: UploadStats::default(), progress };
        let c = model.config().clone();
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            layers.push(DeviceLayer {
                attn_norm: u.vector(Tensor::AttnNorm(l))?,
                q: u.matrix(Tensor::AttnQ(l))?,
                k: u.matrix(Tensor::AttnK(l))?,
                v: u.matrix(Tensor::AttnV(l))?,
                o: u.matrix(Tensor::AttnO(l))?,
                attn_out_norm: u.vector(Tensor::AttnOutNorm(l))?,
                ffn_norm: u.vector(Tensor::FfnNorm(l))?,
                router: u.matrix(Tensor::Router(l))?,
                ffn_out_norm: u.vector(Tensor::FfnOutNorm(l))?,
            });
        }
        let w = DenseWeights {
            embedding: u.matrix(Tensor::Embedding)?,
            output_norm: u.vector(Tensor::OutputNorm)?,
            layers,
        };
        gpu.synchronize()?;
        let mut stats = u.stats;
        stats.seconds = t0.elapsed().as_secs_f64();
        Ok((w, stats))
    }
}

/// One expert's three matrices on the device.
pub struct DeviceExpert {
    /// `[ffn, d_model]`, the GELU branch.
    pub gate: DeviceMatrix,
    pub up: DeviceMatrix,
    /// `[d_model, ffn]`.
    pub down: DeviceMatrix,
}

impl DeviceExpert {
    /// Upload from a raw (decompressed) expert chunk, as `ConvertedModel::read_expert` gives it.
    pub fn upload(gpu: &Gpu, chunk: &ExpertChunk, raw: &[u8]) -> Result<DeviceExpert> {
        let get = |p: ProjName| -> Result<DeviceMatrix> {
            let what = || format!("blk.{}.expert.{}.{}", chunk.layer, chunk.expert, p.as_str());
            let t = chunk
                .tensors
                .iter()
                .find(|t| t.proj == p)
                .ok_or_else(|| Error::bad_tensor(what(), "missing from its chunk"))?;
            if t.shape.len() != 2 {
                return Err(Error::bad_tensor(
                    what(),
                    format!("expected a matrix, found shape {:?}", t.shape),
                ));
            }
            let bytes = raw
                .get(t.offset as usize..(t.offset + t.bytes) as usize)
                .ok_or_else(|| Error::bad_tensor(what(), "lies past the end of its chunk"))?;
            DeviceMatrix::upload(gpu, t.qtype, t.shape[0], t.shape[1], bytes)
                .map_err(|e| Error::bad_tensor(what(), e.to_string()))
        };
        Ok(DeviceExpert { gate: get(ProjName::Gate)?, up: get(ProjName::Up)?, down: get(ProjName::Down)? })
    }

    pub fn nbytes(&self) -> u64 {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }
}

impl DenseWeights {
    /// Device bytes of all dense weights.
    pub fn nbytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                let vecs =
                    l.attn_norm.len() + l.attn_out_norm.len() + l.ffn_norm.len() + l.ffn_out_norm.len();
                l.q.nbytes()
                    + l.k.nbytes()
                    + l.v.nbytes()
                    + l.o.nbytes()
                    + l.router.nbytes()
                    + 4 * vecs as u64
            })
            .sum();
        layers + self.embedding.nbytes() + 4 * self.output_norm.len() as u64
    }
}
