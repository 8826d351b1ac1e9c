//! `ExpertStore`: the cache, its bookkeeping, and the `fetch` iterator the model consumes.

use super::io::{AlignedBuf, ChunkReader, ReadPath};
use super::live::{ExpertRef, LiveBytes, Resident};
use super::policy::Policy;
use super::prefetch::{self, IoState, JobKind, JobQueue, Jobs};
use super::source::ExpertSource;
use super::state::{Counters, Slot, State};
use super::stats::{Mode, StoreStats};
use super::tiers::DeviceResidency;
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use crate::expert::Expert;
use crate::format::ConvertedModel;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Bytes of runtime expert matrices the cache may keep. A budget holding every expert
    /// selects `Mode::AllInRam`.
    pub ram_budget: u64,
    /// The benchmark baseline: no cache, no prefetch, every request read when asked for.
    pub no_cache: bool,
    pub read_path: ReadPath,
    /// Threads doing reads (and building the matrices from what they read).
    pub io_threads: usize,
    /// Forward steps after which an unused expert's score halves (see `policy`).
    pub half_life_steps: f64,
    /// Act on `hint_next_layer` (off: hints are counted but read nothing).
    pub prefetch: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ram_budget: 0,
            no_cache: false,
            read_path: ReadPath::Direct,
            io_threads: 2,
            half_life_steps: 64.0,
            prefetch: true,
        }
    }
}

struct Shared {
    model: Arc<ConvertedModel>,
    reader: ChunkReader,
    n_experts: usize,
    live: Arc<LiveBytes>,
    state: Mutex<State>,
    /// Signalled when a read finishes.
    landed: Condvar,
    /// Signalled when work is queued or the store shuts down.
    work: Condvar,
}

impl Jobs for Shared {
    type Output = Result<Resident>;

    fn next_job(&self) -> Option<(usize, JobKind)> {
        let mut st = self.state.lock().unwrap();
        loop {
            if st.shutdown {
                return None;
            }
            if let Some(s) = st.queue.pop() {
                let IoState::Queued(kind) = st.slots[s].io else {
                    unreachable!("slot {s} in the queue is not queued")
                };
                st.slots[s].io = IoState::Reading(kind);
                return Some((s, kind));
            }
            st = self.work.wait(st).unwrap();
        }
    }

    fn read(&self, slot: usize, buf: &mut AlignedBuf, zbuf: &mut Vec<u8>) -> (Result<Resident>, u64) {
        let chunk = self.model.expert_chunk(slot / self.n_experts, slot % self.n_experts);
        // A read that fails (I/O error, short file, checksum mismatch) is delivered as a failure
        // and never cached; a panic is turned into one too, so that no fetch waits forever.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.reader.with_raw(&self.model, chunk, buf, zbuf, |raw| Resident::from_chunk(chunk, raw, &self.live))
        }))
        .unwrap_or_else(|_| {
            Err(Error::bad_file(
                self.model.shard_path(chunk.shard),
                format!("reading expert chunk (layer {}, expert {}) panicked", chunk.layer, chunk.expert),
            ))
        });
        (read, chunk.bytes)
    }

    fn deliver(&self, slot: usize, kind: JobKind, stored: u64, busy: f64, read: Result<Resident>) {
        self.state.lock().unwrap().deliver(slot, kind, stored, busy, read);
        self.landed.notify_all();
    }
}

/// Experts of one converted model, resident in RAM within a budget or read on demand.
pub struct ExpertStore {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    n_layers: usize,
    io_threads: usize,
    prefetch: bool,
    total_bytes: u64,
}

impl ExpertStore {
    /// Open the store over `model`. With a budget that holds every expert, loads them all now
    /// (`Mode::AllInRam`) and never reads again.
    pub fn open(model: Arc<ConvertedModel>, opts: &StoreOptions) -> Result<ExpertStore> {
        let c = model.config().clone();
        let n = c.n_layers * c.n_experts;
        let slots: Vec<Slot> = (0..n)
            .map(|i| {
                let chunk = model.expert_chunk(i / c.n_experts, i % c.n_experts);
                Slot::new(chunk.tensors.iter().map(|t| t.bytes).sum())
            })
            .collect();
        let total_bytes: u64 = slots.iter().map(|s| s.bytes).sum();
        let mode = if opts.no_cache {
            Mode::NoCache
        } else if opts.ram_budget >= total_bytes {
            Mode::AllInRam
        } else {
            Mode::Cached
        };
        if opts.io_threads == 0 {
            return Err(Error::Invalid("the expert store needs at least one I/O thread".into()));
        }
        let reader = ChunkReader::open(&model, opts.read_path)?;
        let state = State {
            n_experts: c.n_experts,
            mode,
            budget: if mode == Mode::NoCache { 0 } else { opts.ram_budget },
            slots,
            queue: JobQueue::default(),
            shutdown: false,
            policy: Policy::new(n, opts.half_life_steps),
            clock: 0.0,
            cached_bytes: 0,
            counters: Counters::default(),
            device: None,
            hints: vec![Vec::new(); c.n_layers],
        };
        let shared = Arc::new(Shared {
            model,
            reader,
            n_experts: c.n_experts,
            live: Arc::new(LiveBytes::default()),
            state: Mutex::new(state),
            landed: Condvar::new(),
            work: Condvar::new(),
        });
        let mut threads = Vec::new();
        for i in 0..opts.io_threads {
            let sh = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("expert-io-{i}"))
                .spawn(move || prefetch::worker(&*sh))
                .map_err(|e| Error::Invalid(format!("cannot start an expert I/O thread: {e}")))?;
            threads.push(t);
        }
        let store = ExpertStore {
            shared,
            threads,
            n_layers: c.n_layers,
            io_threads: opts.io_threads,
            prefetch: opts.prefetch && mode == Mode::Cached,
            total_bytes,
        };
        if mode == Mode::AllInRam {
            let t0 = Instant::now();
            store.load((0..n).collect())?;
            store.shared.state.lock().unwrap().counters.load_seconds = t0.elapsed().as_secs_f64();
        }
        Ok(store)
    }

    pub fn config(&self) -> &GrokConfig {
        self.shared.model.config()
    }

    pub fn mode(&self) -> Mode {
        self.shared.state.lock().unwrap().mode
    }

    /// The read path in effect (`Direct` falls back to `Pread` where unsupported).
    pub fn read_path(&self) -> ReadPath {
        self.shared.reader.path()
    }

    /// Runtime bytes of every expert together.
    pub fn total_expert_bytes(&self) -> u64 {
        self.total_bytes
    }

    fn slot(&self, layer: usize, expert: usize) -> Result<usize> {
        let ne = self.shared.n_experts;
        if layer >= self.n_layers || expert >= ne {
            return Err(Error::Invalid(format!(
                "expert {expert} of layer {layer} asked for; the model has {} layers of {ne} experts",
                self.n_layers
            )));
        }
        Ok(layer * ne + expert)
    }

    /// Read `slots` into the cache unconditionally and wait for all of them.
    fn load(&self, slots: Vec<usize>) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.state.lock().unwrap();
        for &s in &slots {
            if st.slots[s].cached.is_none() && st.slots[s].io == IoState::Idle {
                st.queue_read(s, JobKind::Load);
            }
            st.slots[s].want += 1;
        }
        sh.work.notify_all();
        let mut first_err = None;
        for &s in &slots {
            while !(st.slots[s].cached.is_some() || st.slots[s].landed.is_some() || st.slots[s].failed.is_some()) {
                st = sh.landed.wait(st).unwrap();
            }
            if let Some(e) = st.take_failure(s) {
                first_err.get_or_insert(e);
            } else if st.slots[s].cached.is_none() {
                // Read by a prefetch or a demand read that the policy did not admit.
                let a = st.slots[s].landed.clone().expect("landed");
                st.admit(s, &a, true);
            }
            st.release(s);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Keep an expert resident whatever the policy says, within the budget.
    pub fn pin(&self, layer: usize, expert: usize) -> Result<()> {
        let s = self.slot(layer, expert)?;
        {
            let mut st = self.shared.state.lock().unwrap();
            if st.mode == Mode::NoCache {
                return Err(Error::Invalid("experts cannot be pinned without a cache".into()));
            }
            if st.slots[s].pinned {
                return Ok(());
            }
            let pinned: u64 = st.slots.iter().filter(|x| x.pinned).map(|x| x.bytes).sum();
            if pinned + st.slots[s].bytes > st.budget {
                return Err(Error::Invalid(format!(
                    "pinning expert {expert} of layer {layer} ({} bytes) would exceed the RAM budget of {} bytes ({pinned} already pinned)",
                    st.slots[s].bytes, st.budget
                )));
            }
            st.slots[s].pinned = true;
        }
        let r = self.load(vec![s]);
        if r.is_err() {
            self.shared.state.lock().unwrap().slots[s].pinned = false;
        }
        r
    }

    pub fn unpin(&self, layer: usize, expert: usize) -> Result<()> {
        let s = self.slot(layer, expert)?;
        self.shared.state.lock().unwrap().slots[s].pinned = false;
        Ok(())
    }

    /// Attach a device tier: experts it holds are no longer fetched nor cached in RAM.
    pub fn set_device(&self, device: Arc<dyn DeviceResidency>) {
        self.shared.state.lock().unwrap().device = Some(device);
    }

    /// The `n` experts with the highest decayed use counts, hottest first: what a device tier
    /// should hold.
    pub fn hottest(&self, n: usize) -> Vec<(usize, usize)> {
        let st = self.shared.state.lock().unwrap();
        let ne = self.shared.n_experts;
        st.policy.ranking(st.clock).into_iter().take(n).map(|s| (s / ne, s % ne)).collect()
    }

    /// Whether an expert is in the RAM cache right now.
    pub fn is_cached(&self, layer: usize, expert: usize) -> bool {
        self.slot(layer, expert).is_ok_and(|s| self.shared.state.lock().unwrap().slots[s].cached.is_some())
    }

    /// Count `n` tokens processed (per-token statistics).
    pub fn advance(&self, n: u64) {
        self.shared.state.lock().unwrap().counters.tokens += n;
    }

    /// Guess of the experts layer `layer` will ask for: read the ones not resident in the
    /// background, so that the fetch finds them landed (or in flight). Replaces any earlier
    /// guess for that layer. Ignored without a cache, and when everything is resident.
    pub fn hint_next_layer(&self, layer: usize, guessed: &[usize]) {
        if !self.prefetch || layer >= self.n_layers {
            return;
        }
        let ne = self.shared.n_experts;
        let mut st = self.shared.state.lock().unwrap();
        let guessed: Vec<usize> = dedup(guessed.iter().copied().filter(|&e| e < ne));
        st.counters.prefetch.hinted += guessed.len() as u64;
        let mut queued = false;
        for &e in &guessed {
            let s = layer * ne + e;
            if st.on_device(layer, e) {
                continue;
            }
            let slot = &mut st.slots[s];
            if slot.cached.is_some() || slot.landed.is_some() || slot.io != IoState::Idle {
                continue;
            }
            slot.prefetched = true;
            st.queue_read(s, JobKind::Prefetch);
            st.counters.prefetch.issued += 1;
            queued = true;
        }
        st.hints[layer] = guessed;
        drop(st);
        if queued {
            self.shared.work.notify_all();
        }
    }

    /// The experts `needed` for `layer`, each as soon as it is resident: cached ones at once,
    /// the others as their reads land. Every expert is yielded exactly once, unless a device
    /// tier holds it (the model computes those on the device).
    pub fn fetch(&self, layer: usize, needed: &[usize]) -> Fetch<'_> {
        let sh = &self.shared;
        let ne = sh.n_experts;
        let mut ready = VecDeque::new();
        let mut pending = Vec::new();
        let mut errors = VecDeque::new();
        let needed = dedup(needed.iter().copied());
        let mut st = sh.state.lock().unwrap();
        let st = &mut *st;
        if layer >= self.n_layers || needed.iter().any(|&e| e >= ne) {
            errors.push_back(self.slot(layer, needed.iter().copied().max().unwrap_or(0)).unwrap_err());
            return Fetch { store: self, layer, ready, pending, errors };
        }
        st.clock += 1.0 / self.n_layers as f64;
        st.counters.fetches += 1;
        let hinted = std::mem::take(&mut st.hints[layer]);
        st.counters.prefetch.hinted_used += hinted.iter().filter(|e| needed.contains(e)).count() as u64;
        // Judge the prefetches for this layer the fetch does not need.
        for e in (0..ne).filter(|e| !needed.contains(e)) {
            let s = layer * ne + e;
            let slot = &mut st.slots[s];
            if !slot.prefetched {
                continue;
            }
            slot.prefetched = false;
            st.counters.prefetch.wasted += 1;
            if slot.io == IoState::Queued(JobKind::Prefetch) && st.queue.cancel(s) {
                slot.io = IoState::Idle;
                st.counters.prefetch.cancelled += 1;
            }
            st.forget_if_unwanted(s);
        }
        let mut queued = false;
        for &e in &needed {
            let s = layer * ne + e;
            st.counters.requests += 1;
            st.policy.touch(s, st.clock);
            if let Some(d) = &st.device {
                if d.holds(layer, e) {
                    st.counters.gpu.hits += 1;
                    continue;
                }
                st.counters.gpu.misses += 1;
            }
            let c = &mut st.counters;
            let slot = &mut st.slots[s];
            let was_prefetched = std::mem::replace(&mut slot.prefetched, false);
            if let Some(a) = slot.cached.clone().or_else(|| slot.landed.clone()) {
                if was_prefetched {
                    c.ram.misses += 1;
                    c.prefetch.ready += 1;
                } else {
                    c.ram.hits += 1;
                }
                if slot.want == 0 {
                    slot.landed = None;
                }
                ready.push_back((e, ExpertRef(a)));
                continue;
            }
            c.ram.misses += 1;
            if slot.failed.is_some() && slot.io == IoState::Idle {
                // A failed prefetch: report it now rather than reading again.
                errors.push_back(st.report_failure(s).expect("failure present"));
                continue;
            }
            match slot.io {
                IoState::Idle => {
                    slot.io = IoState::Queued(JobKind::Demand);
                    st.queue.push(s, JobKind::Demand);
                    queued = true;
                }
                IoState::Queued(JobKind::Prefetch) => {
                    // Still counted as a prefetch read when it lands; only its place changes.
                    st.queue.promote(s);
                    c.prefetch.late += 1;
                }
                IoState::Reading(JobKind::Prefetch) => c.prefetch.late += 1,
                // Another fetch's demand read or a load: wait for the same read.
                _ => c.disk.shared_reads += 1,
            }
            st.slots[s].want += 1;
            pending.push(e);
        }
        if queued {
            sh.work.notify_all();
        }
        Fetch { store: self, layer, ready, pending, errors }
    }

    pub fn stats(&self) -> StoreStats {
        let st = self.shared.state.lock().unwrap();
        let c = &st.counters;
        StoreStats {
            mode: st.mode,
            read_path: self.shared.reader.path(),
            io_threads: self.io_threads,
            ram_budget: st.budget,
            total_expert_bytes: self.total_bytes,
            steps: st.clock,
            tokens: c.tokens,
            fetches: c.fetches,
            requests: c.requests,
            gpu: st.device.as_ref().map(|_| c.gpu),
            ram: c.ram,
            disk: c.disk.clone(),
            load_bytes: c.load_bytes,
            prefetch: c.prefetch,
            stall_seconds: c.stall_seconds,
            load_seconds: c.load_seconds,
            cached_experts: st.slots.iter().filter(|s| s.cached.is_some()).count(),
            pinned_experts: st.slots.iter().filter(|s| s.pinned).count(),
            cached_bytes: st.cached_bytes,
            peak_cached_bytes: c.peak_cached_bytes,
            live_bytes: self.shared.live.now(),
            peak_live_bytes: self.shared.live.peak(),
            evictions: c.evictions,
            not_admitted: c.not_admitted,
        }
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().shutdown = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn dedup(it: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = Vec::new();
    for e in it {
        if !v.contains(&e) {
            v.push(e);
        }
    }
    v
}

/// The experts of one `fetch`, resident ones first, then each read as it lands.
pub struct Fetch<'a> {
    store: &'a ExpertStore,
    layer: usize,
    ready: VecDeque<(usize, ExpertRef)>,
    /// Experts still being read, in request order.
    pending: Vec<usize>,
    errors: VecDeque<Error>,
}

impl Iterator for Fetch<'_> {
    type Item = Result<(usize, ExpertRef)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(r) = self.ready.pop_front() {
            return Some(Ok(r));
        }
        if let Some(e) = self.errors.pop_front() {
            return Some(Err(e));
        }
        if self.pending.is_empty() {
            return None;
        }
        let sh = &self.store.shared;
        let ne = sh.n_experts;
        let t0 = Instant::now();
        let mut st = sh.state.lock().unwrap();
        loop {
            for i in 0..self.pending.len() {
                let e = self.pending[i];
                let s = self.layer * ne + e;
                let slot = &mut st.slots[s];
                let out = if let Some(a) = slot.landed.clone().or_else(|| slot.cached.clone()) {
                    Ok((e, ExpertRef(a)))
                } else if slot.failed.is_some() {
                    Err(st.take_failure(s).expect("failure present"))
                } else {
                    continue;
                };
                st.release(s);
                self.pending.remove(i);
                st.counters.stall_seconds += t0.elapsed().as_secs_f64();
                return Some(out);
            }
            st = sh.landed.wait(st).unwrap();
        }
    }
}

impl Drop for Fetch<'_> {
    /// A fetch dropped before it yielded everything stops waiting for its reads.
    fn drop(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let ne = self.store.shared.n_experts;
        let mut st = self.store.shared.state.lock().unwrap();
        for &e in &self.pending {
            st.abandon(self.layer * ne + e);
        }
    }
}

/// The model's view of the store: experts as they land, and the next layer's guess as a hint.
impl ExpertSource for ExpertStore {
    fn for_each_expert(
        &self,
        layer: usize,
        needed: &[usize],
        f: &mut dyn FnMut(usize, &Expert) -> Result<()>,
    ) -> Result<()> {
        for item in self.fetch(layer, needed) {
            let (e, x) = item?;
            f(e, &x)?;
        }
        Ok(())
    }

    fn takes_guesses(&self) -> bool {
        // Without prefetch a hint reads nothing and counts nothing: no need to compute one.
        self.prefetch
    }

    fn guess_next_layer(&self, layer: usize, guessed: &[usize]) {
        self.hint_next_layer(layer, guessed);
    }

    fn tokens_done(&self, n: u64) {
        self.advance(n);
    }
}
