//! A device emulated on the CPU: its own copies of the weights it holds and its own activation
//! buffers ([`EmuBuf`], separate allocations the host cannot touch), every host<->device copy
//! counted, and the math done by the CPU kernels. It runs the forward pass's device schedule
//! exactly, so that placement, the hybrid MoE and the copies are checked on any machine; its
//! logits equal the CPU's bit for bit (the same kernels on the same values in the same order).
//!
//! The KV cache is the one piece not copied: the model's `KvCache` stands for the device's.
//! Keys and values are written and read only by the device steps (`attention`), never copied
//! over the bus, so this changes no count.

use crate::checkpoint::Tensor;
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use crate::expert::Expert;
use crate::format::ConvertedModel;
use crate::gpu::plan::GpuPlan;
use crate::gpu::stats::GpuStats;
use crate::model::attention::{AttnParams, AttnScratch};
use crate::model::backend::{Backend, Cpu};
use crate::model::geglu::{expert_rows, ExpertScratch};
use crate::model::{KvCache, Weights};
use std::sync::Mutex;
use std::time::Instant;

/// An activation buffer in the emulated device's memory.
#[derive(Default)]
pub struct EmuBuf(Vec<f32>);

pub struct EmulatedDevice {
    /// The device's copy of every dense tensor (no experts).
    dense: Weights,
    /// The device's copies of the experts the plan placed, at `layer * n_experts + expert`.
    experts: Vec<Option<Expert>>,
    n_experts: usize,
    attn: AttnParams,
    plan: GpuPlan,
    stats: Mutex<GpuStats>,
    /// The output head's result before it is copied to the host.
    logits: Mutex<Vec<f32>>,
}

impl EmulatedDevice {
    /// "Upload" per `plan`: the dense tensors and the placed experts of `copy`, a `Weights` of
    /// the model made for the device alone (experts `copy` lacks are read from nowhere: every
    /// placed one must be there).
    pub fn new(config: &GrokConfig, plan: GpuPlan, mut copy: Weights) -> Result<EmulatedDevice> {
        if let Some(why) = &plan.refused {
            return Err(Error::Invalid(format!("the plan puts nothing on the device: {why}")));
        }
        let ne = config.n_experts;
        let mut experts: Vec<Option<Expert>> = (0..config.n_layers * ne).map(|_| None).collect();
        for (l, layer) in copy.layers.iter_mut().enumerate() {
            let mut held = std::mem::take(&mut layer.experts).into_iter().map(Some).collect::<Vec<_>>();
            for e in (0..ne).filter(|&e| plan.holds(l, e)) {
                experts[l * ne + e] = held.get_mut(e).and_then(Option::take);
            }
        }
        EmulatedDevice::build(config, plan, copy, experts)
    }

    /// Upload from a converted model's files: its dense tensors, then each placed expert's chunk.
    pub fn upload(files: &ConvertedModel, plan: GpuPlan) -> Result<EmulatedDevice> {
        let config = files.config().clone();
        let dense = crate::model::load::load_dense_weights(files, &mut |_| {})?;
        let ne = config.n_experts;
        let mut experts: Vec<Option<Expert>> = (0..config.n_layers * ne).map(|_| None).collect();
        let mut raw = Vec::new();
        for &(l, e) in &plan.experts {
            files.read_expert(l, e, &mut raw)?;
            experts[l * ne + e] = Some(Expert::from_chunk(files.expert_chunk(l, e), &raw)?);
        }
        EmulatedDevice::build(&config, plan, dense, experts)
    }

    fn build(config: &GrokConfig, plan: GpuPlan, dense: Weights, experts: Vec<Option<Expert>>) -> Result<EmulatedDevice> {
        let ne = config.n_experts;
        if let Some(&(l, e)) = plan.experts.iter().find(|&&(l, e)| experts[l * ne + e].is_none()) {
            return Err(Error::Invalid(format!("the plan places expert {e} of layer {l}, which the weights given lack")));
        }
        Ok(EmulatedDevice {
            dense,
            experts,
            n_experts: ne,
            attn: AttnParams::from_config(config),
            plan,
            stats: Mutex::new(GpuStats::default()),
            logits: Mutex::new(Vec::new()),
        })
    }

    pub fn plan(&self) -> &GpuPlan {
        &self.plan
    }

    /// Copies, expert counts and device time so far.
    pub fn stats(&self) -> GpuStats {
        *self.stats.lock().unwrap()
    }

    /// Count `n` tokens through the whole model.
    pub fn tokens_done(&self, n: u64) {
        self.stats.lock().unwrap().tokens += n;
    }

    /// The CPU kernels over the device's own weights.
    fn kernels(&self) -> Cpu<'_> {
        Cpu::new(&self.dense, &self.attn)
    }

    /// Run one device step, adding its wall time to the device time.
    fn step(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let t0 = Instant::now();
        let r = f();
        self.stats.lock().unwrap().gpu_seconds += t0.elapsed().as_secs_f64();
        r
    }
}

impl Backend for EmulatedDevice {
    type Buf = EmuBuf;

    fn reserve(&self, buf: &mut EmuBuf, n: usize) -> Result<()> {
        self.kernels().reserve(&mut buf.0, n)
    }

    fn holds_expert(&self, layer: usize, e: usize) -> bool {
        self.experts[layer * self.n_experts + e].is_some()
    }

    fn upload(&self, dst: &mut EmuBuf, n: usize, staging: &mut Vec<f32>, fill: impl FnOnce(&mut [f32])) -> Result<()> {
        self.kernels().reserve(staging, n)?;
        fill(&mut staging[..n]);
        self.reserve(dst, n)?;
        dst.0[..n].copy_from_slice(&staging[..n]);
        self.stats.lock().unwrap().add_h2d_floats(n);
        Ok(())
    }

    fn download<'a>(&self, src: &'a EmuBuf, n: usize, staging: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        self.kernels().reserve(staging, n)?;
        staging[..n].copy_from_slice(&src.0[..n]);
        self.stats.lock().unwrap().add_d2h_floats(n);
        Ok(&staging[..n])
    }

    fn add_from_host(
        &self,
        acc: &mut EmuBuf,
        n: usize,
        staging: &mut Vec<f32>,
        sum: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<()> {
        self.kernels().reserve(staging, n)?;
        staging[..n].fill(0.0);
        let t0 = Instant::now();
        sum(&mut staging[..n])?;
        let host = t0.elapsed().as_secs_f64();
        let mut st = self.stats.lock().unwrap();
        st.cpu_expert_seconds += host;
        st.add_h2d_floats(n);
        drop(st);
        self.step(|| {
            for (a, s) in acc.0[..n].iter_mut().zip(&staging[..n]) {
                *a += s;
            }
            Ok(())
        })
    }

    fn zero(&self, buf: &mut EmuBuf, n: usize) -> Result<()> {
        self.step(|| self.kernels().zero(&mut buf.0, n))
    }

    fn rope_phases(&self, p0: usize, t_n: usize, hd: usize, theta: f64, cos: &mut EmuBuf, sin: &mut EmuBuf) -> Result<()> {
        self.step(|| self.kernels().rope_phases(p0, t_n, hd, theta, &mut cos.0, &mut sin.0))
    }

    fn rms_norm_rows(&self, x: &EmuBuf, first: usize, n: usize, scale: Tensor, eps: f32, out: &mut EmuBuf) -> Result<()> {
        self.step(|| self.kernels().rms_norm_rows(&x.0, first, n, scale, eps, &mut out.0))
    }

    fn add_rms_norm_rows(&self, acc: &mut EmuBuf, x: &EmuBuf, n: usize, scale: Tensor, eps: f32, tmp: &mut EmuBuf) -> Result<()> {
        self.step(|| self.kernels().add_rms_norm_rows(&mut acc.0, &x.0, n, scale, eps, &mut tmp.0))
    }

    fn project(&self, m: Tensor, x: &EmuBuf, n: usize, y: &mut EmuBuf) -> Result<()> {
        self.step(|| self.kernels().project(m, &x.0, n, &mut y.0))
    }

    fn rope(
        &self,
        x: &mut EmuBuf,
        n: usize,
        width: usize,
        hd: usize,
        p0: usize,
        theta: f64,
        cos: &EmuBuf,
        sin: &EmuBuf,
    ) -> Result<()> {
        self.step(|| self.kernels().rope(&mut x.0, n, width, hd, p0, theta, &cos.0, &sin.0))
    }

    fn attention(
        &self,
        layer: usize,
        p0: usize,
        t_n: usize,
        q: &EmuBuf,
        k: &EmuBuf,
        v: &EmuBuf,
        cache: &mut KvCache,
        out: &mut EmuBuf,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        self.step(|| self.kernels().attention(layer, p0, t_n, &q.0, &k.0, &v.0, cache, &mut out.0, scratch))
    }

    fn expert(
        &self,
        layer: usize,
        e: usize,
        xn: &EmuBuf,
        t_n: usize,
        members: &[(usize, f32)],
        out: &mut EmuBuf,
        scratch: &mut ExpertScratch,
    ) -> Result<()> {
        let x = self.experts[layer * self.n_experts + e].as_ref().ok_or_else(|| {
            Error::Invalid(format!("expert {e} of layer {layer} asked of a device that does not hold it"))
        })?;
        let d = x.down.rows;
        self.step(|| {
            expert_rows(x, &xn.0[..t_n * d], members, &mut out.0[..t_n * d], scratch);
            Ok(())
        })
    }

    fn logits(&self, xn: &EmuBuf, n: usize, logits: &mut [f32], _staging: &mut Vec<f32>) -> Result<()> {
        let mut dev = self.logits.lock().unwrap();
        let m = &self.dense.embedding;
        self.step(|| {
            self.kernels().reserve(&mut dev, n * m.rows)?;
            crate::model::ops::project(m, &xn.0[..n * m.cols], n, &mut dev[..n * m.rows]);
            Ok(())
        })?;
        logits.copy_from_slice(&dev[..logits.len()]);
        self.stats.lock().unwrap().add_d2h_floats(logits.len());
        Ok(())
    }

    fn routed(&self, chosen: u64, on_device: u64) {
        self.stats.lock().unwrap().add_layer(chosen, on_device);
    }
}
