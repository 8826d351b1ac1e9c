//! A device emulated on the CPU: its own copies of the weights it holds and its own activation
//! buffers ([`EmuBuf`], separate allocations the host cannot touch), every host<->device copy
//! counted, and the math done by the CPU kernels. It runs the forward pass's device schedule
//! exactly, so that placement, the hybrid MoE and the copies are checked on any machine; its
//! logits equal the CPU's bit for bit (the same kernels on the same values in the same order).
//!
//! Like a GPU's stream, the device runs its experts asynchronously: `expert` queues the work
//! for the device's own thread and returns, so the host computes its experts of the layer at the
//! same time; every other device step first waits for the queue to drain (one in-order stream).
//! [`EmulatedDevice::overlap`] counts, per layer, whether the host's experts started before the
//! device's had finished; [`EmulatedDevice::hold_queue`] makes the device's thread wait for the
//! host's experts to start, so that a test sees the schedule without depending on timing.
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
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// An activation buffer in the emulated device's memory, shared with the work queued on the
/// device as a device pointer is shared with the kernels queued on its stream.
#[derive(Default)]
pub struct EmuBuf(Arc<Mutex<Vec<f32>>>);

impl EmuBuf {
    fn get(&self) -> MutexGuard<'_, Vec<f32>> {
        self.0.lock().unwrap()
    }
}

/// One expert's work, queued for the device's thread.
struct Job {
    layer: usize,
    e: usize,
    xn: Arc<Mutex<Vec<f32>>>,
    out: Arc<Mutex<Vec<f32>>>,
    t_n: usize,
    members: Vec<(usize, f32)>,
    /// `QueueState::host_starts` when it was queued.
    host_starts: u64,
}

/// Per layer with experts on both sides: did the host's experts start while the device's were
/// still queued or running (`during`), or only after they had all finished (`after`)?
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverlapCounts {
    pub during: u64,
    pub after: u64,
}

#[derive(Default)]
struct QueueState {
    queued: u64,
    done: u64,
    /// `queued` at the last wait for the queue: jobs after it belong to the current layer.
    synced: u64,
    host_starts: u64,
    /// The device's thread starts a job only once the host's experts started after it was queued
    /// (or the host waits for the device).
    hold: bool,
    waiting: bool,
    overlap: OverlapCounts,
    failed: Option<String>,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap()
    }
}

/// The device's thread: runs the queued experts in order, each into the buffers it was given.
fn run_queue(
    jobs: std::sync::mpsc::Receiver<Job>,
    experts: Arc<Vec<Option<Expert>>>,
    n_experts: usize,
    queue: Arc<Queue>,
    stats: Arc<Mutex<GpuStats>>,
) {
    let mut scratch = ExpertScratch::default();
    for job in jobs {
        let mut st = queue.lock();
        while st.hold && !st.waiting && st.host_starts <= job.host_starts {
            st = queue.changed.wait(st).unwrap();
        }
        drop(st);
        let t0 = Instant::now();
        let result = match &experts[job.layer * n_experts + job.e] {
            Some(x) => {
                let d = x.down.rows;
                let (xn, mut out) = (job.xn.lock().unwrap(), job.out.lock().unwrap());
                // A panic here must not leave the host waiting for a job that never finishes.
                let run = std::panic::AssertUnwindSafe(|| {
                    expert_rows(x, &xn[..job.t_n * d], &job.members, &mut out[..job.t_n * d], &mut scratch)
                });
                std::panic::catch_unwind(run).err().map(|_| {
                    format!("expert {} of layer {} failed on the emulated device", job.e, job.layer)
                })
            }
            None => Some(format!("expert {} of layer {} asked of a device that does not hold it", job.e, job.layer)),
        };
        stats.lock().unwrap().gpu_seconds += t0.elapsed().as_secs_f64();
        let mut st = queue.lock();
        st.done += 1;
        if st.failed.is_none() {
            st.failed = result;
        }
        queue.changed.notify_all();
    }
}

pub struct EmulatedDevice {
    /// The device's copy of every dense tensor (no experts).
    dense: Weights,
    /// The device's copies of the experts the plan placed, at `layer * n_experts + expert`.
    experts: Arc<Vec<Option<Expert>>>,
    n_experts: usize,
    attn: AttnParams,
    plan: GpuPlan,
    stats: Arc<Mutex<GpuStats>>,
    /// The output head's result before it is copied to the host.
    logits: Mutex<Vec<f32>>,
    /// Expert work for the device's thread, and where it says how far it got.
    jobs: Mutex<Option<Sender<Job>>>,
    queue: Arc<Queue>,
    worker: Mutex<Option<JoinHandle<()>>>,
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
        let experts = Arc::new(experts);
        let stats = Arc::new(Mutex::new(GpuStats::default()));
        let queue = Arc::new(Queue::default());
        let (tx, rx) = channel();
        let worker = {
            let (experts, queue, stats) = (experts.clone(), queue.clone(), stats.clone());
            std::thread::Builder::new()
                .name("emulated-device".into())
                .spawn(move || run_queue(rx, experts, ne, queue, stats))
                .map_err(|e| Error::Invalid(format!("starting the emulated device's thread: {e}")))?
        };
        Ok(EmulatedDevice {
            dense,
            experts,
            n_experts: ne,
            attn: AttnParams::from_config(config),
            plan,
            stats,
            logits: Mutex::new(Vec::new()),
            jobs: Mutex::new(Some(tx)),
            queue,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Per layer with experts on both sides, whether the host's started before the device's had
    /// finished.
    pub fn overlap(&self) -> OverlapCounts {
        self.queue.lock().overlap
    }

    /// Make the device's thread start each queued expert only after the host's experts of that
    /// layer have started (or the host waits for it): with the overlapping schedule every such
    /// layer then counts in `OverlapCounts::during`, whatever the timing.
    pub fn hold_queue(&self, hold: bool) {
        self.queue.lock().hold = hold;
        self.queue.changed.notify_all();
    }

    /// Wait until the device has run everything queued (the stream's synchronisation).
    fn sync(&self) -> Result<()> {
        let mut st = self.queue.lock();
        st.waiting = true;
        self.queue.changed.notify_all();
        while st.done < st.queued {
            st = self.queue.changed.wait(st).unwrap();
        }
        st.waiting = false;
        st.synced = st.queued;
        match st.failed.take() {
            Some(why) => Err(Error::Invalid(why)),
            None => Ok(()),
        }
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

    /// Run one device step after the queued ones, adding its wall time to the device time.
    fn step(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        self.sync()?;
        let t0 = Instant::now();
        let r = f();
        self.stats.lock().unwrap().gpu_seconds += t0.elapsed().as_secs_f64();
        r
    }
}

impl Drop for EmulatedDevice {
    fn drop(&mut self) {
        // Closing the queue ends the device's thread once it has run what is queued.
        drop(self.jobs.lock().unwrap().take());
        if let Some(w) = self.worker.lock().unwrap().take() {
            let _ = w.join();
        }
    }
}

impl Backend for EmulatedDevice {
    type Buf = EmuBuf;

    fn reserve(&self, buf: &mut EmuBuf, n: usize) -> Result<()> {
        self.sync()?;
        self.kernels().reserve(&mut buf.get(), n)
    }

    fn holds_expert(&self, layer: usize, e: usize) -> bool {
        self.experts[layer * self.n_experts + e].is_some()
    }

    fn upload(&self, dst: &mut EmuBuf, n: usize, staging: &mut Vec<f32>, fill: impl FnOnce(&mut [f32])) -> Result<()> {
        self.kernels().reserve(staging, n)?;
        fill(&mut staging[..n]);
        self.reserve(dst, n)?;
        dst.get()[..n].copy_from_slice(&staging[..n]);
        self.stats.lock().unwrap().add_h2d_floats(n);
        Ok(())
    }

    fn download<'a>(&self, src: &'a EmuBuf, n: usize, staging: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        self.sync()?;
        self.kernels().reserve(staging, n)?;
        staging[..n].copy_from_slice(&src.get()[..n]);
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
        {
            let mut st = self.queue.lock();
            st.host_starts += 1;
            if st.queued > st.synced {
                if st.done < st.queued {
                    st.overlap.during += 1;
                } else {
                    st.overlap.after += 1;
                }
            }
            self.queue.changed.notify_all();
        }
        // The host's experts, while the device runs its own.
        let t0 = Instant::now();
        sum(&mut staging[..n])?;
        let host = t0.elapsed().as_secs_f64();
        let mut st = self.stats.lock().unwrap();
        st.cpu_expert_seconds += host;
        st.add_h2d_floats(n);
        drop(st);
        self.step(|| {
            for (a, s) in acc.get()[..n].iter_mut().zip(&staging[..n]) {
                *a += s;
            }
            Ok(())
        })
    }

    fn zero(&self, buf: &mut EmuBuf, n: usize) -> Result<()> {
        self.step(|| self.kernels().zero(&mut buf.get(), n))
    }

    fn rope_phases(&self, p0: usize, t_n: usize, hd: usize, theta: f64, cos: &mut EmuBuf, sin: &mut EmuBuf) -> Result<()> {
        self.step(|| self.kernels().rope_phases(p0, t_n, hd, theta, &mut cos.get(), &mut sin.get()))
    }

    fn rms_norm_rows(&self, x: &EmuBuf, first: usize, n: usize, scale: Tensor, eps: f32, out: &mut EmuBuf) -> Result<()> {
        self.step(|| self.kernels().rms_norm_rows(&x.get(), first, n, scale, eps, &mut out.get()))
    }

    fn add_rms_norm_rows(&self, acc: &mut EmuBuf, x: &EmuBuf, n: usize, scale: Tensor, eps: f32, tmp: &mut EmuBuf) -> Result<()> {
        self.step(|| self.kernels().add_rms_norm_rows(&mut acc.get(), &x.get(), n, scale, eps, &mut tmp.get()))
    }

    fn project(&self, m: Tensor, x: &EmuBuf, n: usize, y: &mut EmuBuf) -> Result<()> {
        self.step(|| self.kernels().project(m, &x.get(), n, &mut y.get()))
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
        self.step(|| self.kernels().rope(&mut x.get(), n, width, hd, p0, theta, &cos.get(), &sin.get()))
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
        self.step(|| {
            self.kernels().attention(layer, p0, t_n, &q.get(), &k.get(), &v.get(), cache, &mut out.get(), scratch)
        })
    }

    fn expert(
        &self,
        layer: usize,
        e: usize,
        xn: &EmuBuf,
        t_n: usize,
        members: &[(usize, f32)],
        out: &mut EmuBuf,
        _scratch: &mut ExpertScratch,
    ) -> Result<()> {
        if self.experts[layer * self.n_experts + e].is_none() {
            return Err(Error::Invalid(format!("expert {e} of layer {layer} asked of a device that does not hold it")));
        }
        let mut st = self.queue.lock();
        let job = Job {
            layer,
            e,
            xn: xn.0.clone(),
            out: out.0.clone(),
            t_n,
            members: members.to_vec(),
            host_starts: st.host_starts,
        };
        st.queued += 1;
        drop(st);
        let sent = self.jobs.lock().unwrap().as_ref().map(|tx| tx.send(job).is_ok());
        if sent != Some(true) {
            return Err(Error::Invalid("the emulated device's thread has stopped".into()));
        }
        Ok(())
    }

    fn logits(&self, xn: &EmuBuf, n: usize, logits: &mut [f32], _staging: &mut Vec<f32>) -> Result<()> {
        let mut dev = self.logits.lock().unwrap();
        let m = &self.dense.embedding;
        self.step(|| {
            self.kernels().reserve(&mut dev, n * m.rows)?;
            crate::model::ops::project(m, &xn.get()[..n * m.cols], n, &mut dev[..n * m.rows]);
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
