//! Where the model runs: on the CPU alone, or with a device holding the dense weights and the
//! experts `gpu::plan` places, the rest of the experts staying with the CPU (and the residency
//! store, which learns what the device holds through `DeviceResidency` and never reads those).
//!
//! This sits beside the model, not inside it: `model` defines the forward pass over a
//! `Backend`, this module decides which backend a run gets and builds it. The devices:
//! * [`EmulatedDevice`]: the CPU playing a device, with its own buffers and counted copies,
//!   so that CI checks placement, the hybrid MoE and the copies without a GPU;
//! * [`CudaDevice`] (feature `cuda`): the same schedule on the first GPU, with the `gpu`
//!   module's device matrices, kernels and KV cache. It compiles in every CI build with the
//!   feature; it runs only where a GPU is (`benches/gpu-check.sh`).

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_buf;
mod emulated;

#[cfg(feature = "cuda")]
pub use cuda::CudaDevice;
#[cfg(feature = "cuda")]
pub use cuda_buf::CudaBuf;
pub use emulated::{EmuBuf, EmulatedDevice};

use crate::checkpoint::{Proj, Tensor};
use crate::config::GrokConfig;
use crate::error::Result;
use crate::format::ConvertedModel;
use crate::gpu::layout::unsupported;
use crate::gpu::plan::{default_budget, default_ranking, kv_bytes_per_token, plan, tensor_device_bytes, GpuPlan, ModelBytes};
use crate::gpu::stats::GpuStats;
use crate::kernels::Matrix;
use crate::model::{KvCache, Model, Scratch, Weights};
use crate::residency::DeviceResidency;
use std::sync::{Arc, Mutex};

/// The store skips the experts a plan puts on the device.
impl DeviceResidency for GpuPlan {
    fn holds(&self, layer: usize, expert: usize) -> bool {
        GpuPlan::holds(self, layer, expert)
    }
}

/// Which device a run asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceChoice {
    /// The CPU only.
    Cpu,
    /// The first GPU, with a byte budget (`None`: its free memory less a margin).
    Gpu { budget: Option<u64> },
    /// The CPU emulating a device of `budget` bytes.
    Emulated { budget: u64 },
}

/// Device bytes of a model's parts, from its weights in memory (as `ModelBytes::from_manifest`
/// counts them from a manifest).
pub fn model_bytes(config: &GrokConfig, w: &Weights) -> ModelBytes {
    let mat = |t: Tensor, m: &Matrix| (t.to_string(), tensor_device_bytes(m.qtype, &[m.rows, m.cols], m.nbytes() as u64));
    let vec = |t: Tensor, v: &[f32]| (t.to_string(), tensor_device_bytes(crate::quant::QuantType::F32, &[v.len()], 4 * v.len() as u64));
    let mut dense = vec![mat(Tensor::Embedding, &w.embedding), vec(Tensor::OutputNorm, &w.output_norm)];
    let mut dense_cpu_only = unsupported(w.embedding.qtype).map(|why| format!("{}: {why}", Tensor::Embedding));
    let mut experts = Vec::new();
    let mut cpu_only = Vec::new();
    for l in 0..w.layers.len() {
        for t in [Tensor::AttnQ(l), Tensor::AttnK(l), Tensor::AttnV(l), Tensor::AttnO(l)] {
            dense.push(mat(t, w.matrix(t)));
            if dense_cpu_only.is_none() {
                dense_cpu_only = unsupported(w.matrix(t).qtype).map(|why| format!("{t}: {why}"));
            }
        }
        for t in [Tensor::AttnNorm(l), Tensor::AttnOutNorm(l), Tensor::FfnNorm(l), Tensor::Router(l), Tensor::FfnOutNorm(l)] {
            dense.push(vec(t, w.vector(t)));
        }
        for (e, x) in w.layers[l].experts.iter().enumerate() {
            let t = |proj| Tensor::Expert { layer: l, expert: e, proj };
            experts.push(mat(t(Proj::Gate), &x.gate).1 + mat(t(Proj::Up), &x.up).1 + mat(t(Proj::Down), &x.down).1);
            cpu_only.push([&x.gate, &x.up, &x.down].iter().find_map(|m| unsupported(m.qtype)));
        }
    }
    ModelBytes {
        n_layers: config.n_layers,
        n_experts: config.n_experts,
        dense,
        experts,
        kv_bytes_per_token: kv_bytes_per_token(config),
        cpu_only,
        dense_cpu_only,
    }
}

/// The plan for `budget` bytes: KV cache for `kv_tokens`, scratch for prefill batches of
/// `batch`, the dense part, then experts in the default ranking (every layer's expert 0, then
/// every layer's expert 1, ...: nothing is known about routing before the first token).
pub fn plan_for(bytes: &ModelBytes, config: &GrokConfig, budget: u64, kv_tokens: usize, batch: usize) -> Result<GpuPlan> {
    plan(bytes, config, budget, &default_ranking(config.n_layers, config.n_experts), kv_tokens, batch)
}

/// `plan_for` with the experts in `ranking`'s order (hottest first: a routing trace's), or
/// the default ranking when `None`.
pub fn plan_ranked(bytes: &ModelBytes, config: &GrokConfig, budget: u64, ranking: Option<&[(usize, usize)]>, kv_tokens: usize, batch: usize) -> Result<GpuPlan> {
    match ranking {
        Some(r) => plan(bytes, config, budget, r, kv_tokens, batch),
        None => plan_for(bytes, config, budget, kv_tokens, batch),
    }
}

/// The devices a model can be placed on (one per model: their size does not matter).
#[allow(clippy::large_enum_variant)]
enum Device {
    Emulated(EmulatedDevice, Mutex<Scratch<EmuBuf>>),
    #[cfg(feature = "cuda")]
    Cuda(CudaDevice, Mutex<Scratch<CudaBuf<f32>>>),
}

impl Device {
    fn plan(&self) -> &GpuPlan {
        match self {
            Device::Emulated(d, _) => d.plan(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d, _) => d.plan(),
        }
    }
}

/// A model and the device it runs on, if any.
pub struct PlacedModel {
    model: Model,
    /// With the device's buffers for the decode loop, kept between tokens.
    device: Option<Device>,
}

impl PlacedModel {
    /// On the CPU alone.
    pub fn cpu(model: Model) -> PlacedModel {
        PlacedModel { model, device: None }
    }

    /// On `device`, which holds the dense weights and the experts of its plan; the model's
    /// expert store (if any) stops reading and caching those.
    pub fn on_device(model: Model, device: EmulatedDevice) -> PlacedModel {
        PlacedModel::with(model, Device::Emulated(device, Mutex::default()))
    }

    /// On a GPU, which holds the dense weights and the experts of its plan.
    #[cfg(feature = "cuda")]
    pub fn on_gpu(model: Model, device: CudaDevice) -> PlacedModel {
        PlacedModel::with(model, Device::Cuda(device, Mutex::default()))
    }

    fn with(model: Model, device: Device) -> PlacedModel {
        if let Some(store) = model.store() {
            store.set_device(Arc::new(device.plan().clone()));
        }
        PlacedModel { model, device: Some(device) }
    }

    /// Place a converted model's run as `choice` asks, `kv_tokens` positions of context and
    /// prefill batches up to `batch` tokens. Also returns a line saying where it runs (and,
    /// when a device was asked for and is not used, why).
    pub fn place(model: Model, files: &ConvertedModel, choice: DeviceChoice, kv_tokens: usize, batch: usize) -> Result<(PlacedModel, String)> {
        PlacedModel::place_ranked(model, files, choice, kv_tokens, batch, None)
    }

    /// `place`, with the device taking experts in `ranking`'s order (`--placement-trace`).
    pub fn place_ranked(
        model: Model,
        files: &ConvertedModel,
        choice: DeviceChoice,
        kv_tokens: usize,
        batch: usize,
        ranking: Option<&[(usize, usize)]>,
    ) -> Result<(PlacedModel, String)> {
        let config = model.config().clone();
        let budget = match choice {
            DeviceChoice::Cpu => return Ok((PlacedModel::cpu(model), "running on the CPU".into())),
            DeviceChoice::Gpu { budget: Some(0) } => {
                return Ok((PlacedModel::cpu(model), "GPU budget 0: running on the CPU".into()))
            }
            DeviceChoice::Gpu { budget } => {
                let info = match crate::gpu::available() {
                    Err(why) => return Ok((PlacedModel::cpu(model), format!("no GPU found ({why}); running on the CPU"))),
                    Ok(info) => info,
                };
                let b = budget.unwrap_or_else(|| default_budget(info.free_bytes, info.total_bytes));
                let p = plan_ranked(&ModelBytes::from_manifest(&files.manifest), &config, b, ranking, kv_tokens, batch)?;
                if let Some(why) = &p.refused {
                    return Ok((PlacedModel::cpu(model), format!("GPU {} not used: {why}; running on the CPU", info.name)));
                }
                return PlacedModel::place_on_gpu(model, files, p, &info.name);
            }
            DeviceChoice::Emulated { budget } => budget,
        };
        let p = plan_ranked(&ModelBytes::from_manifest(&files.manifest), &config, budget, ranking, kv_tokens, batch)?;
        if let Some(why) = &p.refused {
            return Ok((PlacedModel::cpu(model), format!("emulated device not used: {why}; running on the CPU")));
        }
        let line = placement_line("emulated device", &p, &config);
        let device = EmulatedDevice::upload(files, p)?;
        Ok((PlacedModel::on_device(model, device), line))
    }

    #[cfg(feature = "cuda")]
    fn place_on_gpu(model: Model, files: &ConvertedModel, p: GpuPlan, name: &str) -> Result<(PlacedModel, String)> {
        let line = placement_line(&format!("GPU {name}"), &p, model.config());
        match CudaDevice::upload(files, p) {
            Ok(device) => Ok((PlacedModel::on_gpu(model, device), line)),
            Err(e) => Ok((PlacedModel::cpu(model), format!("GPU {name} not used: {e}; running on the CPU"))),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn place_on_gpu(model: Model, _files: &ConvertedModel, _p: GpuPlan, name: &str) -> Result<(PlacedModel, String)> {
        // Not reached: without the feature `gpu::available` finds no GPU.
        Ok((PlacedModel::cpu(model), format!("GPU {name} not used: built without the cuda feature; running on the CPU")))
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn config(&self) -> &GrokConfig {
        self.model.config()
    }

    /// Whether a device runs the dense part (and its experts).
    pub fn uses_device(&self) -> bool {
        self.device.is_some()
    }

    /// The device's plan, when there is a device.
    pub fn device_plan(&self) -> Option<&GpuPlan> {
        self.device.as_ref().map(Device::plan)
    }

    /// The emulated device, when the run is on one.
    pub fn emulated_device(&self) -> Option<&EmulatedDevice> {
        match self.device.as_ref()? {
            Device::Emulated(d, _) => Some(d),
            #[cfg(feature = "cuda")]
            Device::Cuda(..) => None,
        }
    }

    /// The device's counts so far, when there is one.
    pub fn gpu_stats(&self) -> Option<GpuStats> {
        match self.device.as_ref()? {
            Device::Emulated(d, _) => Some(d.stats()),
            #[cfg(feature = "cuda")]
            Device::Cuda(d, _) => Some(d.stats()),
        }
    }

    /// `Model::prefill`, where the placement says.
    pub fn prefill(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Vec<f32>> {
        let n = tokens.len() as u64;
        match &self.device {
            None => self.model.prefill(tokens, cache, all_logits),
            Some(Device::Emulated(d, _)) => {
                let logits = self.model.prefill_on(d, tokens, cache, all_logits)?;
                d.tokens_done(n);
                Ok(logits)
            }
            #[cfg(feature = "cuda")]
            Some(Device::Cuda(d, _)) => {
                let logits = self.model.prefill_on(d, tokens, cache, all_logits)?;
                d.tokens_done(n);
                Ok(logits)
            }
        }
    }

    /// `Model::decode_into`, where the placement says.
    pub fn decode_into(&self, token: u32, cache: &mut KvCache, logits: &mut [f32]) -> Result<()> {
        match &self.device {
            None => self.model.decode_into(token, cache, logits),
            Some(Device::Emulated(d, s)) => {
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                self.model.decode_into_on(d, token, cache, logits, &mut s)?;
                d.tokens_done(1);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Some(Device::Cuda(d, s)) => {
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                self.model.decode_into_on(d, token, cache, logits, &mut s)?;
                d.tokens_done(1);
                Ok(())
            }
        }
    }

    /// `Model::decode`, where the placement says.
    pub fn decode(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        let mut logits = vec![0f32; self.config().vocab_size];
        self.decode_into(token, cache, &mut logits)?;
        Ok(logits)
    }
}

/// `emulated device: 12.0 MiB of 16.0 MiB budget: dense 3.1 MiB, 16 of 32 experts, KV ...`
pub fn placement_line(what: &str, p: &GpuPlan, c: &GrokConfig) -> String {
    use crate::gpu::plan::human;
    format!(
        "{what}: {} of a {} budget: dense {}, {} of {} experts ({}), KV cache for {} tokens ({}), scratch {}",
        human(p.used()),
        human(p.budget),
        human(p.dense_bytes),
        p.experts.len(),
        c.n_layers * c.n_experts,
        human(p.expert_bytes),
        p.kv_tokens,
        human(p.kv_bytes),
        human(p.scratch_bytes)
    )
}
