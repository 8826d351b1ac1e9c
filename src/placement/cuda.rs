//! The CUDA implementation of the backend seam (feature `cuda`): the dense weights and the
//! placed experts as `DeviceMatrix`es, the activations in device buffers, attention over one
//! `DeviceKvCache` per sequence, every host<->device copy counted. Its products use f32
//! activations (the CPU quantizes them to int8), so its logits are close to the CPU's, not
//! equal: the GPU check compares them by KL.
//!
//! Per sequence (`KvCache::id`) the device keeps its own keys and values; layer 0 of each call
//! brings the device cache to the host cache's length and appends the call's tokens. A
//! `KvCache` tells the device when it is dropped; the device frees that sequence's cache on its
//! next attention step (or when it is dropped itself).
//!
//! Device time is measured by timing events on the stream around each stretch of device work
//! between two waits for the host (the router's input going out, the host experts' sum coming
//! in), added up once the call's logits are back: busy time, not the wall time of the call.

use super::cuda_buf::CudaBuf;
use crate::checkpoint::Tensor;
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use crate::format::ConvertedModel;
use crate::gpu::plan::GpuPlan;
use crate::gpu::stats::GpuStats;
use crate::gpu::{AttnShape, DenseWeights, DeviceExpert, DeviceKvCache, DeviceMatrix, Gpu};
use crate::model::attention::AttnScratch;
use crate::model::backend::Backend;
use crate::model::geglu::ExpertScratch;
use crate::model::{KvCache, KvDropList};
use cudarc::driver::{CudaEvent, CudaSlice, DriverError};
use std::collections::HashMap;
use std::sync::Mutex;

fn cuda(what: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Invalid(format!("GPU {what}: {e}"))
}

/// Device buffers of one expert evaluation and of the output head.
#[derive(Default)]
struct Work {
    idx: CudaBuf<i32>,
    gates: CudaBuf<f32>,
    xs: CudaBuf<f32>,
    gate: CudaBuf<f32>,
    up: CudaBuf<f32>,
    ys: CudaBuf<f32>,
    /// The host experts' sum on the device, and the row indices and unit gates that add it.
    host_sum: CudaBuf<f32>,
    rows: CudaBuf<i32>,
    ones: CudaBuf<f32>,
    logits: CudaBuf<f32>,
}

pub struct CudaDevice {
    gpu: Gpu,
    config: GrokConfig,
    dense: DenseWeights,
    /// At `layer * n_experts + expert`, the placed ones.
    experts: Vec<Option<DeviceExpert>>,
    shape: AttnShape,
    plan: GpuPlan,
    stats: Mutex<GpuStats>,
    kv: Mutex<HashMap<u64, DeviceKvCache>>,
    /// Ids of dropped `KvCache`s whose device caches are still to be freed.
    dropped: KvDropList,
    work: Mutex<Work>,
    timing: Mutex<Timing>,
}

/// Timing events, in pairs around each stretch of device work of the current call; reused.
#[derive(Default)]
struct Timing {
    events: Vec<CudaEvent>,
    used: usize,
    /// A stretch has begun and not ended.
    open: bool,
}

impl CudaDevice {
    /// Open the first GPU and upload the dense tensors and the experts `plan` places.
    pub fn upload(files: &ConvertedModel, plan: GpuPlan) -> Result<CudaDevice> {
        if let Some(why) = &plan.refused {
            return Err(Error::Invalid(format!("the plan puts nothing on the device: {why}")));
        }
        let gpu = Gpu::new()?;
        let config = files.config().clone();
        let (dense, _) = DenseWeights::upload(&gpu, files, &mut |_| {})?;
        let ne = config.n_experts;
        let mut experts: Vec<Option<DeviceExpert>> = (0..config.n_layers * ne).map(|_| None).collect();
        let mut raw = Vec::new();
        for &(l, e) in &plan.experts {
            files.read_expert(l, e, &mut raw)?;
            experts[l * ne + e] = Some(DeviceExpert::upload(&gpu, files.expert_chunk(l, e), &raw)?);
        }
        gpu.synchronize()?;
        Ok(CudaDevice {
            shape: AttnShape::from_config(&config),
            gpu,
            config,
            dense,
            experts,
            plan,
            stats: Mutex::new(GpuStats::default()),
            kv: Mutex::new(HashMap::new()),
            dropped: KvDropList::default(),
            work: Mutex::new(Work::default()),
            timing: Mutex::new(Timing::default()),
        })
    }

    pub fn plan(&self) -> &GpuPlan {
        &self.plan
    }

    pub fn stats(&self) -> GpuStats {
        *self.stats.lock().unwrap()
    }

    pub fn tokens_done(&self, n: u64) {
        self.stats.lock().unwrap().tokens += n;
    }

    fn matrix(&self, t: Tensor) -> &DeviceMatrix {
        match t {
            Tensor::Embedding => &self.dense.embedding,
            Tensor::AttnQ(l) => &self.dense.layers[l].q,
            Tensor::AttnK(l) => &self.dense.layers[l].k,
            Tensor::AttnV(l) => &self.dense.layers[l].v,
            Tensor::AttnO(l) => &self.dense.layers[l].o,
            other => panic!("{other} is not a dense matrix"),
        }
    }

    fn vector(&self, t: Tensor) -> &CudaSlice<f32> {
        match t {
            Tensor::OutputNorm => &self.dense.output_norm,
            Tensor::AttnNorm(l) => &self.dense.layers[l].attn_norm,
            Tensor::AttnOutNorm(l) => &self.dense.layers[l].attn_out_norm,
            Tensor::FfnNorm(l) => &self.dense.layers[l].ffn_norm,
            Tensor::FfnOutNorm(l) => &self.dense.layers[l].ffn_out_norm,
            other => panic!("{other} is not a norm scale on the device"),
        }
    }

    /// Record the next timing event of the call on the stream.
    fn mark(&self, t: &mut Timing) -> Result<()> {
        if t.used == t.events.len() {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            t.events.push(self.gpu.stream().context().new_event(flags).map_err(cuda("creating an event"))?);
        }
        t.events[t.used].record(self.gpu.stream()).map_err(cuda("recording an event"))?;
        t.used += 1;
        Ok(())
    }

    /// Device work is about to be queued: begin a timed stretch unless one is open.
    fn busy(&self) -> Result<()> {
        let mut t = self.timing.lock().unwrap();
        if !t.open {
            self.mark(&mut t)?;
            t.open = true;
        }
        Ok(())
    }

    /// The host is about to wait for the device (or the device for the host): end the stretch.
    fn idle(&self) -> Result<()> {
        let mut t = self.timing.lock().unwrap();
        if t.open {
            self.mark(&mut t)?;
            t.open = false;
        }
        Ok(())
    }

    /// After the stream has finished the call: add up its timed stretches as device time.
    fn account(&self) -> Result<()> {
        let mut t = self.timing.lock().unwrap();
        let mut ms = 0f64;
        for pair in t.events[..t.used & !1].chunks_exact(2) {
            ms += pair[0].elapsed_ms(&pair[1]).map_err(cuda("reading an event"))? as f64;
        }
        t.used = 0;
        t.open = false;
        self.stats.lock().unwrap().gpu_seconds += ms / 1e3;
        Ok(())
    }

    /// Copy host values into the first `src.len()` values of `dst`, counted.
    fn copy_in<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        src: &[T],
        dst: &mut CudaBuf<T>,
    ) -> Result<()> {
        dst.reserve(&self.gpu, src.len())?;
        self.gpu.stream().memcpy_htod(src, &mut dst.view_mut(src.len())?).map_err(cuda("host-to-device copy"))?;
        self.stats.lock().unwrap().add_h2d_floats(std::mem::size_of_val(src) / 4);
        Ok(())
    }
}

impl Backend for CudaDevice {
    type Buf = CudaBuf<f32>;

    fn reserve(&self, buf: &mut CudaBuf<f32>, n: usize) -> Result<()> {
        buf.reserve(&self.gpu, n)
    }

    fn holds_expert(&self, layer: usize, e: usize) -> bool {
        self.experts[layer * self.config.n_experts + e].is_some()
    }

    fn upload(&self, dst: &mut CudaBuf<f32>, n: usize, staging: &mut Vec<f32>, fill: impl FnOnce(&mut [f32])) -> Result<()> {
        if staging.len() < n {
            staging.resize(n, 0.0);
        }
        fill(&mut staging[..n]);
        self.busy()?;
        self.copy_in(&staging[..n], dst)
    }

    fn download<'a>(&self, src: &'a CudaBuf<f32>, n: usize, staging: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        if staging.len() < n {
            staging.resize(n, 0.0);
        }
        self.busy()?;
        self.gpu.stream().memcpy_dtoh(&src.view(n)?, &mut staging[..n]).map_err(cuda("device-to-host copy"))?;
        self.idle()?;
        self.gpu.synchronize()?;
        self.stats.lock().unwrap().add_d2h_floats(n);
        Ok(&staging[..n])
    }

    fn add_from_host(
        &self,
        acc: &mut CudaBuf<f32>,
        n: usize,
        staging: &mut Vec<f32>,
        sum: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<()> {
        if staging.len() < n {
            staging.resize(n, 0.0);
        }
        staging[..n].fill(0.0);
        // The device's experts of this layer run on while the host computes its own.
        self.idle()?;
        let t0 = std::time::Instant::now();
        sum(&mut staging[..n])?;
        self.stats.lock().unwrap().cpu_expert_seconds += t0.elapsed().as_secs_f64();
        let d = self.config.d_model;
        let rows = n / d;
        let mut w = self.work.lock().unwrap();
        let w = &mut *w;
        self.busy()?;
        self.copy_in(&staging[..n], &mut w.host_sum)?;
        if w.rows.len() < rows {
            // Set up once per batch size: row indices 0.. and unit gates.
            let idx: Vec<i32> = (0..rows as i32).collect();
            self.copy_in(&idx, &mut w.rows)?;
            self.copy_in(&vec![1f32; rows], &mut w.ones)?;
        }
        self.gpu.scatter_add_rows(&w.host_sum.view(n)?, &w.rows.view(rows)?, &w.ones.view(rows)?, &mut acc.view_mut(n)?, d)
    }

    fn zero(&self, buf: &mut CudaBuf<f32>, n: usize) -> Result<()> {
        self.busy()?;
        self.gpu.stream().memset_zeros(&mut buf.view_mut(n)?).map_err(cuda("memset"))
    }

    fn rope_phases(&self, _p0: usize, _t_n: usize, _hd: usize, _theta: f64, _cos: &mut CudaBuf<f32>, _sin: &mut CudaBuf<f32>) -> Result<()> {
        // The RoPE kernel computes its phases from the position and theta.
        Ok(())
    }

    fn rms_norm_rows(&self, x: &CudaBuf<f32>, first: usize, n: usize, scale: Tensor, eps: f32, out: &mut CudaBuf<f32>) -> Result<()> {
        self.busy()?;
        let d = self.config.d_model;
        let x = x.view((first + n) * d)?.slice(first * d..);
        self.gpu.rms_norm_rows(&x, &self.vector(scale).slice(..), &mut out.view_mut(n * d)?, d, eps, false)
    }

    fn add_rms_norm_rows(&self, acc: &mut CudaBuf<f32>, x: &CudaBuf<f32>, n: usize, scale: Tensor, eps: f32, _tmp: &mut CudaBuf<f32>) -> Result<()> {
        self.busy()?;
        let d = self.config.d_model;
        self.gpu.rms_norm_rows(&x.view(n * d)?, &self.vector(scale).slice(..), &mut acc.view_mut(n * d)?, d, eps, true)
    }

    fn project(&self, m: Tensor, x: &CudaBuf<f32>, n: usize, y: &mut CudaBuf<f32>) -> Result<()> {
        self.busy()?;
        let m = self.matrix(m);
        m.matmul(&self.gpu, &x.view(n * m.cols)?, n, &mut y.view_mut(n * m.rows)?)
    }

    fn rope(
        &self,
        x: &mut CudaBuf<f32>,
        n: usize,
        width: usize,
        hd: usize,
        p0: usize,
        theta: f64,
        _cos: &CudaBuf<f32>,
        _sin: &CudaBuf<f32>,
    ) -> Result<()> {
        self.busy()?;
        self.gpu.rope(&mut x.view_mut(n * width)?, n, width / hd, hd, p0, theta)
    }

    fn attention(
        &self,
        layer: usize,
        p0: usize,
        t_n: usize,
        q: &CudaBuf<f32>,
        k: &CudaBuf<f32>,
        v: &CudaBuf<f32>,
        cache: &mut KvCache,
        out: &mut CudaBuf<f32>,
        _scratch: &mut AttnScratch,
    ) -> Result<()> {
        self.busy()?;
        let mut caches = self.kv.lock().unwrap();
        for id in self.dropped.take() {
            caches.remove(&id);
        }
        let dkv = match caches.entry(cache.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                cache.notify_on_drop(&self.dropped);
                e.insert(DeviceKvCache::new(&self.gpu, &self.config, cache.capacity())?)
            }
        };
        if layer == 0 {
            dkv.truncate(p0);
            if dkv.len() != p0 {
                return Err(Error::Invalid(format!(
                    "the device holds {} positions of this sequence, the host {p0}",
                    dkv.len()
                )));
            }
            dkv.append_tokens(&self.gpu, &cache.tokens()[p0..p0 + t_n])?;
        }
        let (qd, kvd) = (self.config.q_dim(), self.config.kv_dim());
        dkv.write(&self.gpu, layer, p0, &k.view(t_n * kvd)?, &v.view(t_n * kvd)?)?;
        dkv.attend(&self.gpu, &self.shape, layer, &q.view(t_n * qd)?, p0, &mut out.view_mut(t_n * qd)?)
    }

    fn expert(
        &self,
        layer: usize,
        e: usize,
        xn: &CudaBuf<f32>,
        t_n: usize,
        members: &[(usize, f32)],
        out: &mut CudaBuf<f32>,
        _scratch: &mut ExpertScratch,
    ) -> Result<()> {
        let x = self.experts[layer * self.config.n_experts + e].as_ref().ok_or_else(|| {
            Error::Invalid(format!("expert {e} of layer {layer} asked of a device that does not hold it"))
        })?;
        let (d, f, n) = (self.config.d_model, self.config.ffn_size, members.len());
        self.busy()?;
        let mut w = self.work.lock().unwrap();
        let w = &mut *w;
        let idx: Vec<i32> = members.iter().map(|m| m.0 as i32).collect();
        let gates: Vec<f32> = members.iter().map(|m| m.1).collect();
        self.copy_in(&idx, &mut w.idx)?;
        self.copy_in(&gates, &mut w.gates)?;
        for (buf, len) in [(&mut w.xs, n * d), (&mut w.gate, n * f), (&mut w.up, n * f), (&mut w.ys, n * d)] {
            buf.reserve(&self.gpu, len)?;
        }
        let g = &self.gpu;
        g.gather_rows(&xn.view(t_n * d)?, &w.idx.view(n)?, &mut w.xs.view_mut(n * d)?, d)?;
        x.gate.matmul(g, &w.xs.view(n * d)?, n, &mut w.gate.view_mut(n * f)?)?;
        x.up.matmul(g, &w.xs.view(n * d)?, n, &mut w.up.view_mut(n * f)?)?;
        g.geglu(&mut w.gate.view_mut(n * f)?, &w.up.view(n * f)?)?;
        x.down.matmul(g, &w.gate.view(n * f)?, n, &mut w.ys.view_mut(n * d)?)?;
        g.scatter_add_rows(&w.ys.view(n * d)?, &w.idx.view(n)?, &w.gates.view(n)?, &mut out.view_mut(t_n * d)?, d)
    }

    fn logits(&self, xn: &CudaBuf<f32>, n: usize, logits: &mut [f32], _staging: &mut Vec<f32>) -> Result<()> {
        self.busy()?;
        let m = &self.dense.embedding;
        let mut w = self.work.lock().unwrap();
        w.logits.reserve(&self.gpu, n * m.rows)?;
        m.matmul(&self.gpu, &xn.view(n * m.cols)?, n, &mut w.logits.view_mut(n * m.rows)?)?;
        self.gpu.stream().memcpy_dtoh(&w.logits.view(logits.len())?, logits).map_err(cuda("device-to-host copy"))?;
        self.idle()?;
        self.gpu.synchronize()?;
        self.account()?;
        self.stats.lock().unwrap().add_d2h_floats(logits.len());
        Ok(())
    }

    fn routed(&self, chosen: u64, on_device: u64) {
        self.stats.lock().unwrap().add_layer(chosen, on_device);
    }
}
