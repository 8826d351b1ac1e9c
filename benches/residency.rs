//! Expert residency on a multi-GB converted model, run by hand:
//!
//! ```text
//! cargo bench --bench residency -- [--dir DIR] [--layers N] [--threads 1,2,4] [--json FILE]
//!                                   [--budget-fraction 0.25] [--steps N] [--compute-gbps X]
//!                                   [disk] [paths] [store] [decode]
//! ```
//!
//! * `disk`: sequential read speed of the expert shards (cold, O_DIRECT and buffered), the
//!   yardstick the chunk reads are compared with.
//! * `paths`: every expert chunk once, in random order, cold, by each read path (pread +
//!   FADV_DONTNEED, O_DIRECT, mmap + madvise), with 1..n threads: GB/s of raw chunk reads.
//! * `store`: the same through `ExpertStore` in no-cache mode (reads and matrix construction).
//! * `decode`: decode-like traffic with skewed routing under a RAM budget: no cache vs cache vs
//!   cache + prefetch (guesses right 70% of the time); stall time, disk bytes per token and peak
//!   RSS (VmHWM, reset through /proc/self/clear_refs) against the budget. Compute is simulated
//!   by sleeping expert bytes / `--compute-gbps`, so prefetch has something to overlap with.
//!
//! Cold cache without privileges: POSIX_FADV_DONTNEED on every shard before each run, checked
//! with mincore. The model (default 24 layers x 8 experts of 26.7 MB q8_0, 5.1 GB) is generated
//! once with the converter from a synthetic source and reused.

use grok1::checkpoint::{check_tensor_set, SourceTensor, Tensor, TensorSource};
use grok1::convert::{convert, ConvertOptions};
use grok1::format::{ConvertedModel, ShardKind};
use grok1::quant::QuantType;
use grok1::residency::io::{cached_bytes, drop_file_cache, AlignedBuf, ChunkReader};
use grok1::residency::{ExpertStore, ReadPath, StoreOptions, StoreStats};
use grok1::GrokConfig;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Deterministic pseudo-random weights, cheap enough to generate gigabytes of.
struct SynthSource {
    config: GrokConfig,
    tensors: Vec<SourceTensor>,
}

impl SynthSource {
    fn new(config: GrokConfig) -> SynthSource {
        let tensors: Vec<SourceTensor> = Tensor::all(&config)
            .into_iter()
            .map(|t| SourceTensor { tensor: t, shape: t.shape(&config), dtype: "f32".into(), origin: "synthetic".into() })
            .collect();
        check_tensor_set(&config, &tensors).unwrap();
        SynthSource { config, tensors }
    }
}

impl TensorSource for SynthSource {
    fn describe(&self) -> String {
        "synthetic".into()
    }
    fn config(&self) -> &GrokConfig {
        &self.config
    }
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }
    fn read_rows(&self, t: Tensor, row0: usize, out: &mut [f32]) -> grok1::Result<()> {
        let mut h = (format!("{t}").bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3)))
            ^ (row0 as u64).wrapping_mul(0x9e3779b97f4a7c15);
        for x in out.iter_mut() {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            *x = (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        }
        Ok(())
    }
    fn tokenizer_path(&self) -> Option<PathBuf> {
        None
    }
    fn input_bytes(&self) -> u64 {
        0
    }
}

struct Args {
    dir: PathBuf,
    layers: usize,
    threads: Vec<usize>,
    json: Option<PathBuf>,
    budget_fraction: f64,
    steps: usize,
    compute_gbps: f64,
    phases: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/residency-bench-model"),
        layers: 24,
        threads: vec![1, 2, 4],
        json: None,
        budget_fraction: 0.25,
        steps: 16,
        compute_gbps: 20.0,
        phases: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{x} needs a value"));
        match x.as_str() {
            "--bench" => {}
            "--dir" => a.dir = PathBuf::from(val()),
            "--layers" => a.layers = val().parse().unwrap(),
            "--threads" => a.threads = val().split(',').map(|t| t.parse().unwrap()).collect(),
            "--json" => a.json = Some(PathBuf::from(val())),
            "--budget-fraction" => a.budget_fraction = val().parse().unwrap(),
            "--steps" => a.steps = val().parse().unwrap(),
            "--compute-gbps" => a.compute_gbps = val().parse().unwrap(),
            p if !p.starts_with('-') => a.phases.push(p.to_string()),
            other => panic!("unknown argument {other}"),
        }
    }
    if a.phases.is_empty() {
        a.phases = ["disk", "paths", "store", "decode"].map(String::from).to_vec();
    }
    a
}

fn bench_config(layers: usize) -> GrokConfig {
    GrokConfig {
        vocab_size: 512,
        d_model: 1024,
        ffn_size: 8192,
        n_layers: layers,
        n_q_heads: 8,
        n_kv_heads: 2,
        head_dim: 128,
        ..GrokConfig::default()
    }
}

fn model(a: &Args) -> Arc<ConvertedModel> {
    let want = bench_config(a.layers);
    if let Ok(m) = ConvertedModel::open(&a.dir) {
        if *m.config() == want {
            return Arc::new(m);
        }
    }
    eprintln!("generating the benchmark model in {} ...", a.dir.display());
    let t0 = Instant::now();
    let src = SynthSource::new(want);
    let o = ConvertOptions { experts: QuantType::Q8_0, dense: QuantType::Q8_0, ..Default::default() };
    if a.dir.exists() {
        std::fs::remove_dir_all(&a.dir).unwrap();
    }
    convert(&src, &a.dir, &o, &mut |_| {}).unwrap();
    eprintln!("generated in {:.0} s", t0.elapsed().as_secs_f64());
    Arc::new(ConvertedModel::open(&a.dir).unwrap())
}

fn expert_shards(m: &ConvertedModel) -> Vec<PathBuf> {
    (0..m.manifest.shards.len())
        .filter(|&s| m.manifest.shards[s].kind == ShardKind::Experts)
        .map(|s| m.shard_path(s))
        .collect()
}

/// Drop the shards from the page cache; returns the bytes still cached afterwards.
fn make_cold(shards: &[PathBuf]) -> u64 {
    shards.iter().map(|p| drop_file_cache(p).and_then(|_| cached_bytes(p)).unwrap()).sum()
}

fn proc_status(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[derive(Serialize)]
struct Rate {
    what: String,
    threads: usize,
    bytes: u64,
    seconds: f64,
    gbps: f64,
    cold_bytes_left: u64,
    /// Bytes of the shards in the page cache after the run (what the read path left behind).
    cached_after: u64,
}

fn rate(what: impl Into<String>, threads: usize, bytes: u64, seconds: f64, cold: u64) -> Rate {
    let r = Rate { what: what.into(), threads, bytes, seconds, gbps: bytes as f64 / seconds / 1e9, cold_bytes_left: cold, cached_after: 0 };
    println!("{:<44} {:>2} thr  {:>7.2} GB in {:>6.2} s = {:>6.2} GB/s  (cached before: {} MB)",
        r.what, threads, bytes as f64 / 1e9, seconds, r.gbps, cold / 1_000_000);
    r
}

/// Sequential reads of whole shards in 16 MiB blocks, O_DIRECT or buffered.
fn sequential(shards: &[PathBuf], direct: bool) -> Rate {
    let cold = make_cold(shards);
    let block = 16 << 20;
    let mut buf = AlignedBuf::new();
    let t0 = Instant::now();
    let mut total = 0u64;
    for p in shards {
        let mut o = OpenOptions::new();
        o.read(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let mut f: File = o.open(p).unwrap();
        if !direct {
            // SAFETY: plain syscall on a valid descriptor.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        }
        let b = buf.get(block);
        loop {
            let n = f.read(b).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        if !direct {
            drop_file_cache(p).unwrap();
        }
    }
    rate(if direct { "sequential O_DIRECT 16 MiB" } else { "sequential buffered 16 MiB" }, 1, total, t0.elapsed().as_secs_f64(), cold)
}

/// Every chunk once in a random order, raw bytes only.
fn chunk_reads(m: &ConvertedModel, path: ReadPath, threads: usize, order: &[(usize, usize)]) -> Rate {
    let cold = make_cold(&expert_shards(m));
    let reader = ChunkReader::open(m, path).unwrap();
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    let bytes: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let (mut buf, mut z) = (AlignedBuf::new(), Vec::new());
                    let mut sum = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(l, e)) = order.get(i) else { return sum };
                        let c = m.expert_chunk(l, e);
                        // Touch one byte per page so mmap's faults happen inside the timing.
                        sum += reader
                            .with_raw(m, c, &mut buf, &mut z, |raw| {
                                std::hint::black_box(raw.iter().step_by(4096).map(|&b| b as u64).sum::<u64>());
                                Ok(raw.len() as u64)
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let secs = t0.elapsed().as_secs_f64();
    let left: u64 = expert_shards(m).iter().map(|p| cached_bytes(p).unwrap()).sum();
    let mut r = rate(format!("chunks, random order, {}", reader.path().name()), threads, bytes, secs, cold);
    println!("{:>60} page cache after: {} MB", "", left / 1_000_000);
    r.cached_after = left;
    r
}

/// Every expert through the store (no cache): reads plus matrix construction.
fn store_reads(m: &Arc<ConvertedModel>, path: ReadPath, threads: usize) -> Rate {
    let cold = make_cold(&expert_shards(m));
    let opts = StoreOptions { no_cache: true, read_path: path, io_threads: threads, ..Default::default() };
    let store = ExpertStore::open(m.clone(), &opts).unwrap();
    let c = m.config().clone();
    let all: Vec<usize> = (0..c.n_experts).collect();
    let t0 = Instant::now();
    for l in 0..c.n_layers {
        for item in store.fetch(l, &all) {
            item.unwrap();
        }
    }
    let s = store.stats();
    rate(format!("store fetch (read + matrices), {}", path.name()), threads, s.disk.bytes, t0.elapsed().as_secs_f64(), cold)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Routing with Zipf(1) popularity over a fixed random ranking of each layer's experts.
struct Router {
    rank: Vec<Vec<usize>>,
    cdf: Vec<f64>,
    rng: Rng,
}

impl Router {
    fn new(c: &GrokConfig, seed: u64) -> Router {
        let mut rng = Rng(seed);
        let rank = (0..c.n_layers)
            .map(|_| {
                let mut v: Vec<usize> = (0..c.n_experts).collect();
                for i in (1..v.len()).rev() {
                    v.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                v
            })
            .collect();
        let w: Vec<f64> = (1..=c.n_experts).map(|i| 1.0 / i as f64).collect();
        let sum: f64 = w.iter().sum();
        let cdf = w.iter().scan(0.0, |acc, x| { *acc += x / sum; Some(*acc) }).collect();
        Router { rank, cdf, rng }
    }
    fn route(&mut self, layer: usize, k: usize) -> Vec<usize> {
        let mut v = Vec::new();
        while v.len() < k {
            let u = self.rng.unit();
            let i = self.cdf.iter().position(|&c| u <= c).unwrap_or(self.cdf.len() - 1);
            let e = self.rank[layer][i];
            if !v.contains(&e) {
                v.push(e);
            }
        }
        v
    }
}

#[derive(Serialize)]
struct DecodeRun {
    name: String,
    tok_s: f64,
    stall_ms_per_token: f64,
    peak_rss_over_baseline: u64,
    page_cache_after: u64,
    stats: StoreStats,
}

fn decode(m: &Arc<ConvertedModel>, a: &Args, name: &str, opts: StoreOptions, hint: bool) -> DecodeRun {
    let shards = expert_shards(m);
    make_cold(&shards);
    let c = m.config().clone();
    let baseline = proc_status("VmRSS:");
    let peak_ok = reset_peak_rss();
    let store = ExpertStore::open(m.clone(), &opts).unwrap();
    let mut router = Router::new(&c, 42);
    let mut guess_rng = Rng(7);
    let routes: Vec<Vec<Vec<usize>>> =
        (0..a.steps).map(|_| (0..c.n_layers).map(|l| router.route(l, c.n_experts_per_token)).collect()).collect();
    let t0 = Instant::now();
    for step in &routes {
        for l in 0..c.n_layers {
            if hint && l + 1 < c.n_layers {
                let guess = if guess_rng.unit() < 0.7 { step[l + 1].clone() } else { router.route(l + 1, 2) };
                store.hint_next_layer(l + 1, &guess);
            }
            for item in store.fetch(l, &step[l]) {
                let (_, x) = item.unwrap();
                std::thread::sleep(Duration::from_secs_f64(x.nbytes() as f64 / (a.compute_gbps * 1e9)));
            }
        }
        store.advance(1);
    }
    let secs = t0.elapsed().as_secs_f64();
    let peak = if peak_ok { proc_status("VmHWM:") } else { 0 };
    let s = store.stats();
    drop(store);
    let page_cache_after = shards.iter().map(|p| cached_bytes(p).unwrap()).sum();
    let r = DecodeRun {
        name: name.to_string(),
        tok_s: a.steps as f64 / secs,
        stall_ms_per_token: 1e3 * s.stall_seconds_per_token(),
        peak_rss_over_baseline: peak.saturating_sub(baseline),
        page_cache_after,
        stats: s,
    };
    println!(
        "{:<28} {:>6.2} tok/s  stall {:>7.1} ms/tok  hit {:>5.1}%  disk {:>6.0} MB/tok  prefetch acc {:>5.1}%  peak RSS +{:.2} GB (budget {:.2} GB, live peak {:.2} GB)  page cache after {} MB",
        r.name, r.tok_s, r.stall_ms_per_token, 100.0 * r.stats.hit_rate(), r.stats.disk_bytes_per_token() / 1e6,
        100.0 * r.stats.prefetch_accuracy(), r.peak_rss_over_baseline as f64 / 1e9, r.stats.ram_budget as f64 / 1e9,
        r.stats.peak_live_bytes as f64 / 1e9, r.page_cache_after / 1_000_000,
    );
    r
}

#[derive(Serialize, Default)]
struct Report {
    model_bytes: u64,
    expert_bytes: u64,
    sequential: Vec<Rate>,
    paths: Vec<Rate>,
    store: Vec<Rate>,
    decode: Vec<DecodeRun>,
}

fn main() {
    let a = args();
    let m = model(&a);
    let shards = expert_shards(&m);
    let (dense, experts) = m.stored_bytes();
    let eb: u64 = m.expert_chunk(0, 0).tensors.iter().map(|t| t.bytes).sum();
    println!("model {}: {:.2} GB of experts in {} shard(s), {:.1} MB per expert, dense {:.2} GB",
        a.dir.display(), experts as f64 / 1e9, shards.len(), eb as f64 / 1e6, dense as f64 / 1e9);
    let mut rep = Report { model_bytes: dense + experts, expert_bytes: eb, ..Default::default() };
    let has = |p: &str| a.phases.iter().any(|x| x == p);
    if has("disk") {
        rep.sequential.push(sequential(&shards, true));
        rep.sequential.push(sequential(&shards, false));
    }
    let c = m.config().clone();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut order: Vec<(usize, usize)> = (0..c.n_layers).flat_map(|l| (0..c.n_experts).map(move |e| (l, e))).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    if has("paths") {
        for &t in &a.threads {
            for p in [ReadPath::Pread, ReadPath::Direct, ReadPath::Mmap] {
                rep.paths.push(chunk_reads(&m, p, t, &order));
            }
        }
    }
    if has("store") {
        for &t in &a.threads {
            for p in [ReadPath::Pread, ReadPath::Direct, ReadPath::Mmap] {
                rep.store.push(store_reads(&m, p, t));
            }
        }
    }
    if has("decode") {
        let total = eb * (c.n_layers * c.n_experts) as u64;
        let budget = (total as f64 * a.budget_fraction) as u64;
        println!("decode: {} steps, budget {:.2} GB of {:.2} GB, compute simulated at {} GB/s",
            a.steps, budget as f64 / 1e9, total as f64 / 1e9, a.compute_gbps);
        let base = StoreOptions { ram_budget: budget, read_path: ReadPath::Direct, io_threads: 2, ..Default::default() };
        rep.decode.push(decode(&m, &a, "no cache", StoreOptions { no_cache: true, ..base.clone() }, false));
        rep.decode.push(decode(&m, &a, "cache", base.clone(), false));
        rep.decode.push(decode(&m, &a, "cache + prefetch (70%)", base.clone(), true));
        rep.decode.push(decode(&m, &a, "cache + prefetch, pread", StoreOptions { read_path: ReadPath::Pread, ..base.clone() }, true));
        rep.decode.push(decode(&m, &a, "cache + prefetch, mmap", StoreOptions { read_path: ReadPath::Mmap, ..base }, true));
    }
    if let Some(j) = &a.json {
        std::fs::write(j, serde_json::to_string_pretty(&rep).unwrap()).unwrap();
    }
}
