//! The expert store: identical experts under any budget and read path, in-use experts survive
//! eviction, statistics add up, the page cache stays clean, and the plan's numbers are sane.

mod support;

use grok1::checkpoint;
use grok1::convert::{convert, ConvertOptions};
use grok1::format::manifest::Compression;
use grok1::format::ConvertedModel;
use grok1::quant::QuantType;
use grok1::residency::io::{cached_bytes, drop_file_cache};
use grok1::residency::plan::{Hardware, PlanInput};
use grok1::residency::{
    plan, DeviceResidency, Expert, ExpertStore, Mode, ReadPath, StoreOptions, StoreStats,
};
use grok1::GrokConfig;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use support::micro_hf;

fn converted(dst: &Path, experts: QuantType, compression: Compression) -> Arc<ConvertedModel> {
    let src = checkpoint::open(&micro_hf(), None).unwrap();
    let o = ConvertOptions { experts, dense: QuantType::Q8_0, threads: 2, compression, ..Default::default() };
    convert(src.as_ref(), dst, &o, &mut |_| {}).unwrap();
    Arc::new(ConvertedModel::open(dst).unwrap())
}

/// Every expert's three matrices, dequantized from a direct read of its chunk.
fn reference(m: &ConvertedModel) -> Vec<[Vec<f32>; 3]> {
    let c = m.config();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for l in 0..c.n_layers {
        for e in 0..c.n_experts {
            m.read_expert(l, e, &mut buf).unwrap();
            let chunk = m.expert_chunk(l, e);
            let deq = |i: usize| {
                let t = &chunk.tensors[i];
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let rb = t.qtype.row_bytes(cols).unwrap();
                let bytes = &buf[t.offset as usize..(t.offset + t.bytes) as usize];
                let mut v = vec![0f32; rows * cols];
                for (r, o) in v.chunks_exact_mut(cols).enumerate() {
                    t.qtype.dequantize_row(&bytes[r * rb..(r + 1) * rb], o);
                }
                v
            };
            out.push([deq(0), deq(1), deq(2)]);
        }
    }
    out
}

fn dequant(e: &Expert) -> [Vec<f32>; 3] {
    let m = |x: &grok1::kernels::Matrix| {
        let mut v = vec![0f32; x.rows * x.cols];
        for (r, o) in v.chunks_exact_mut(x.cols).enumerate() {
            x.row_f32(r, o);
        }
        v
    };
    [m(&e.gate), m(&e.up), m(&e.down)]
}

/// Deterministic pseudo-random numbers (xorshift), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A skewed choice of `k` distinct experts of `n`: low indices are favoured.
    fn route(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut v = Vec::new();
        while v.len() < k {
            let a = (self.next() % n as u64) as usize;
            let b = (self.next() % n as u64) as usize;
            let e = a.min(b);
            if !v.contains(&e) {
                v.push(e);
            }
        }
        v
    }
}

fn check_identities(s: &StoreStats) {
    let gpu = s.gpu.unwrap_or_default();
    assert_eq!(s.requests, gpu.hits + s.ram.hits + s.ram.misses, "{}", s.summary());
    assert_eq!(
        s.ram.misses,
        s.prefetch.ready + s.prefetch.late + s.disk.demand_reads + s.disk.shared_reads,
        "{}",
        s.summary()
    );
    assert_eq!(s.disk.reads, s.disk.demand_reads + s.disk.prefetch_reads + s.disk.load_reads);
    assert_eq!(s.disk.errors, 0);
    assert!(s.prefetch.hinted_used <= s.prefetch.hinted);
    if s.mode != Mode::AllInRam {
        assert!(s.peak_cached_bytes <= s.ram_budget, "{}", s.summary());
    }
}

/// Decode-like traffic: per step, every layer hints a guess for the next layer and fetches its
/// routed experts; every yielded expert is compared with the reference.
fn drive(store: &ExpertStore, refs: &[[Vec<f32>; 3]], steps: usize, seed: u64, hint: bool) {
    let c = store.config().clone();
    let mut rng = Rng(seed);
    let mut next_route = rng.route(c.n_experts, c.n_experts_per_token);
    for _ in 0..steps {
        for l in 0..c.n_layers {
            let needed = next_route.clone();
            next_route = rng.route(c.n_experts, c.n_experts_per_token);
            if hint && l + 1 < c.n_layers {
                // A guess that is right about half the time.
                let guess = if rng.next() % 2 == 0 { next_route.clone() } else { rng.route(c.n_experts, 2) };
                store.hint_next_layer(l + 1, &guess);
            }
            let mut seen = HashSet::new();
            for item in store.fetch(l, &needed) {
                let (e, x) = item.unwrap();
                assert!(needed.contains(&e) && seen.insert(e), "expert {e} yielded unasked or twice");
                assert!(dequant(&x) == refs[l * c.n_experts + e], "layer {l} expert {e} differs");
            }
            assert_eq!(seen.len(), needed.len());
        }
        store.advance(1);
    }
}

/// Once every read has landed and the model holds nothing, the only experts alive are the
/// cached ones (no prefetched expert is left stranded outside the cache).
fn check_quiescent(store: &ExpertStore) {
    let t0 = std::time::Instant::now();
    loop {
        let s = store.stats();
        let issued = s.prefetch.issued - s.prefetch.cancelled;
        if s.disk.prefetch_reads == issued {
            assert_eq!(s.live_bytes, s.cached_bytes, "{}", s.summary());
            return;
        }
        assert!(t0.elapsed().as_secs() < 10, "reads never finished: {}", s.summary());
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn expert_bytes(m: &ConvertedModel) -> u64 {
    m.expert_chunk(0, 0).tensors.iter().map(|t| t.bytes).sum()
}

#[test]
fn experts_are_identical_under_any_budget_and_read_path() {
    let tmp = tempfile::tempdir().unwrap();
    for (q, comp) in [(QuantType::Q8_0, Compression::None), (QuantType::Iq4Nl, Compression::Zstd)] {
        let m = converted(&tmp.path().join(format!("{q}-{comp:?}")), q, comp);
        let refs = reference(&m);
        let eb = expert_bytes(&m);
        let n_layers = m.config().n_layers as u64;
        let total = eb * refs.len() as u64;
        for path in [ReadPath::Pread, ReadPath::Direct, ReadPath::Mmap] {
            for (budget, no_cache) in [(total, false), (n_layers * eb, false), (3 * eb, false), (0, true)] {
                let opts = StoreOptions { ram_budget: budget, no_cache, read_path: path, ..Default::default() };
                let store = ExpertStore::open(m.clone(), &opts).unwrap();
                drive(&store, &refs, 40, 0x9e3779b97f4a7c15 ^ budget, true);
                check_quiescent(&store);
                let s = store.stats();
                check_identities(&s);
                assert_eq!(s.tokens, 40);
                assert_eq!(s.requests, 40 * n_layers * 2);
                match s.mode {
                    Mode::AllInRam => {
                        assert_eq!(s.disk.reads, s.disk.load_reads, "{}", s.summary());
                        assert_eq!((s.disk.bytes, s.ram.hits), (0, s.requests));
                    }
                    Mode::NoCache => {
                        assert_eq!(s.disk.demand_reads, s.requests);
                        assert_eq!((s.cached_experts, s.prefetch.issued, s.prefetch.hinted), (0, 0, 0));
                    }
                    Mode::Cached => {
                        assert!(s.ram.hits > 0 && s.ram.misses > 0, "{}", s.summary());
                        assert!(s.prefetch.issued > 0 && s.prefetch.ready + s.prefetch.late > 0, "{}", s.summary());
                        assert!(s.evictions + s.not_admitted > 0);
                    }
                }
                assert_eq!(s.mode == Mode::AllInRam, budget == total);
                drop(store);
            }
        }
    }
}

#[test]
fn eviction_never_frees_an_expert_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let m = converted(&tmp.path().join("m"), QuantType::Q8_0, Compression::None);
    let refs = reference(&m);
    let eb = expert_bytes(&m);
    let opts = StoreOptions { ram_budget: 2 * eb, half_life_steps: 4.0, ..Default::default() };
    let store = ExpertStore::open(m.clone(), &opts).unwrap();
    let held: Vec<_> = store.fetch(0, &[0, 1]).map(|r| r.unwrap()).collect();
    assert!(store.is_cached(0, 0) && store.is_cached(0, 1));
    // Make other experts much hotter than the held ones.
    for _ in 0..20 {
        for item in store.fetch(1, &[5, 6]) {
            item.unwrap();
        }
    }
    let s = store.stats();
    assert!(store.is_cached(0, 0) && store.is_cached(0, 1), "{}", s.summary());
    assert!(s.not_admitted > 0 && s.evictions == 0, "{}", s.summary());
    for (e, x) in &held {
        assert!(dequant(x) == refs[*e]);
    }
    assert!(s.live_bytes >= 2 * eb);
    // Released, they make way for the hotter ones.
    drop(held);
    for _ in 0..2 {
        for item in store.fetch(1, &[5, 6]) {
            item.unwrap();
        }
    }
    let s = store.stats();
    assert!(store.is_cached(1, 5) && store.is_cached(1, 6), "{}", s.summary());
    assert!(!store.is_cached(0, 0) && s.evictions == 2);
    // Nothing leaks: what is alive is what the cache holds.
    assert_eq!(s.live_bytes, s.cached_bytes);
    check_identities(&s);
}

#[test]
fn a_dropped_fetch_leaves_the_store_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let m = converted(&tmp.path().join("m"), QuantType::Q8_0, Compression::None);
    let refs = reference(&m);
    let store = ExpertStore::open(m.clone(), &StoreOptions { ram_budget: expert_bytes(&m), ..Default::default() }).unwrap();
    for e in 0..8 {
        let mut f = store.fetch(1, &[e, (e + 3) % 8]);
        if e % 2 == 0 {
            f.next().unwrap().unwrap();
        }
        drop(f);
    }
    drive(&store, &refs, 10, 7, true);
    let s = store.stats();
    assert!(s.live_bytes <= s.cached_bytes + 4 * expert_bytes(&m), "{}", s.summary());
}

#[test]
fn pinned_experts_stay_and_pins_respect_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let m = converted(&tmp.path().join("m"), QuantType::Q8_0, Compression::None);
    let eb = expert_bytes(&m);
    let store = ExpertStore::open(m.clone(), &StoreOptions { ram_budget: 2 * eb, ..Default::default() }).unwrap();
    store.pin(0, 3).unwrap();
    store.pin(0, 3).unwrap();
    for _ in 0..30 {
        for l in 0..2 {
            for item in store.fetch(l, &[4, 5]) {
                item.unwrap();
            }
        }
    }
    assert!(store.is_cached(0, 3));
    store.pin(1, 2).unwrap();
    let err = store.pin(1, 7).unwrap_err().to_string();
    assert!(err.contains("exceed the RAM budget"), "{err}");
    assert_eq!(store.stats().pinned_experts, 2);
    store.unpin(0, 3).unwrap();
    assert_eq!(store.stats().pinned_experts, 1);
    assert_eq!(store.hottest(2).len(), 2);
    let hot: HashSet<(usize, usize)> = store.hottest(4).into_iter().collect();
    assert_eq!(hot, HashSet::from([(0, 4), (0, 5), (1, 4), (1, 5)]));
}

#[test]
fn prefetch_accuracy_is_counted_per_guess() {
    let tmp = tempfile::tempdir().unwrap();
    let m = converted(&tmp.path().join("m"), QuantType::Q8_0, Compression::None);
    let store = ExpertStore::open(m.clone(), &StoreOptions { ram_budget: 0, ..Default::default() }).unwrap();
    // Right guesses.
    store.hint_next_layer(1, &[2, 3]);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let got: Vec<usize> = store.fetch(1, &[2, 3]).map(|r| r.unwrap().0).collect();
    assert_eq!(got.len(), 2);
    let s = store.stats();
    assert_eq!((s.prefetch.hinted, s.prefetch.hinted_used, s.prefetch.issued), (2, 2, 2));
    assert_eq!(s.prefetch.ready + s.prefetch.late, 2);
    assert_eq!(s.disk.demand_reads, 0);
    // Wrong guesses: wasted (and cancelled if they had not started).
    store.hint_next_layer(0, &[6, 7]);
    for item in store.fetch(0, &[0]) {
        item.unwrap();
    }
    let s = store.stats();
    assert_eq!((s.prefetch.hinted, s.prefetch.hinted_used, s.prefetch.wasted), (4, 2, 2));
    assert!((s.prefetch_accuracy() - 0.5).abs() < 1e-12);
    check_identities(&s);
}

struct HoldsFirstExpert;
impl DeviceResidency for HoldsFirstExpert {
    fn holds(&self, _layer: usize, expert: usize) -> bool {
        expert == 0
    }
}

#[test]
fn a_device_tier_takes_its_experts_out_of_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let m = converted(&tmp.path().join("m"), QuantType::Q8_0, Compression::None);
    let store = ExpertStore::open(m.clone(), &StoreOptions { ram_budget: 4 * expert_bytes(&m), ..Default::default() }).unwrap();
    store.set_device(Arc::new(HoldsFirstExpert));
    for _ in 0..5 {
        let got: Vec<usize> = store.fetch(0, &[0, 1]).map(|r| r.unwrap().0).collect();
        assert_eq!(got, vec![1]);
    }
    let s = store.stats();
    let g = s.gpu.unwrap();
    assert_eq!((g.hits, g.misses), (5, 5));
    assert!(!store.is_cached(0, 0));
    check_identities(&s);
}

#[test]
fn a_corrupt_chunk_is_an_error_naming_its_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("z");
    let m = converted(&dir, QuantType::Q8_0, Compression::Zstd);
    let c = m.expert_chunk(1, 4).clone();
    let path = m.shard_path(c.shard);
    let shard_file = m.manifest.shards[c.shard].file.clone();
    drop(m);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[c.offset as usize..(c.offset + c.bytes) as usize] {
        *b = 0x5a;
    }
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&path, perm).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let m = Arc::new(ConvertedModel::open(&dir).unwrap());
    let store = ExpertStore::open(m, &StoreOptions { ram_budget: 0, ..Default::default() }).unwrap();
    let results: Vec<_> = store.fetch(1, &[3, 4]).collect();
    assert_eq!(results.len(), 2);
    let err = results.into_iter().find_map(|r| r.err()).expect("an error").to_string();
    // The chunk's xxh3 catches the damage before decompression is tried.
    assert!(err.contains("xxh3") && err.contains(&shard_file), "{err}");
    assert_eq!(store.stats().disk.errors, 1);
    // The store goes on serving the healthy experts.
    assert!(store.fetch(1, &[3]).all(|r| r.is_ok()));
    drop(store);
    // A model converted before xxh3 was recorded: decompression itself finds the damage.
    let mpath = dir.join(grok1::format::MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for chunk in v["experts"].as_array_mut().unwrap() {
        chunk.as_object_mut().unwrap().remove("xxh3");
    }
    let mut perm = std::fs::metadata(&mpath).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&mpath, perm).unwrap();
    std::fs::write(&mpath, serde_json::to_vec(&v).unwrap()).unwrap();
    let m = Arc::new(ConvertedModel::open(&dir).unwrap());
    let store = ExpertStore::open(m, &StoreOptions { ram_budget: 0, ..Default::default() }).unwrap();
    let err = store.fetch(1, &[4]).find_map(|r| r.err()).expect("an error").to_string();
    assert!(err.contains("does not decompress") && err.contains(&shard_file), "{err}");
}

#[test]
fn the_page_cache_does_not_keep_what_the_budget_excludes() {
    let tmp = tempfile::tempdir().unwrap();
    let m = converted(&tmp.path().join("m"), QuantType::Q8_0, Compression::None);
    let refs = reference(&m);
    let shards: Vec<_> = (0..m.manifest.shards.len())
        .filter(|&s| m.manifest.shards[s].kind == grok1::format::ShardKind::Experts)
        .map(|s| m.shard_path(s))
        .collect();
    let in_cache = || shards.iter().map(|p| cached_bytes(p).unwrap()).sum::<u64>();
    for p in &shards {
        drop_file_cache(p).unwrap();
    }
    if in_cache() > 0 {
        eprintln!("skipping: this file system ignores POSIX_FADV_DONTNEED");
        return;
    }
    for path in [ReadPath::Pread, ReadPath::Direct, ReadPath::Mmap] {
        let opts = StoreOptions { ram_budget: expert_bytes(&m), read_path: path, ..Default::default() };
        let store = ExpertStore::open(m.clone(), &opts).unwrap();
        drive(&store, &refs, 10, 3, true);
        assert!(store.stats().disk.reads > 10);
        drop(store);
        assert_eq!(in_cache(), 0, "{path:?} left expert pages in the page cache");
    }
}

#[test]
fn plans_for_a_workstation_and_a_cpu_only_server_are_sane() {
    let c = GrokConfig::default();
    let gb = 1_000_000_000u64;
    let ws = plan(&PlanInput::new(c.clone(), QuantType::Iq4Nl, QuantType::Q8_0, Hardware::new(128 << 30, 24 * gb))).unwrap();
    println!("Grok-1 q4 experts, q8 dense; 24 GB GPU + 128 GiB RAM:\n{}\n", ws.table());
    let cpu = plan(&PlanInput::new(c.clone(), QuantType::Iq4Nl, QuantType::Q8_0, Hardware::new(256 << 30, 0))).unwrap();
    println!("Grok-1 q4 experts, q8 dense; CPU only, 256 GiB RAM:\n{}\n", cpu.table());
    let q8 = plan(&PlanInput::new(c.clone(), QuantType::Q8_0, QuantType::Bf16, Hardware::new(128 << 30, 24 * gb))).unwrap();
    println!("Grok-1 q8 experts, bf16 dense; 24 GB GPU + 128 GiB RAM:\n{}\n", q8.table());

    for p in [&ws, &cpu, &q8] {
        assert_eq!(p.experts_gpu + p.experts_ram + p.experts_disk, 512);
        assert!((p.p_gpu + p.p_ram + p.p_disk - 1.0).abs() < 1e-9);
        assert!(p.fits && p.tok_s_no_prefetch <= p.tok_s && p.tok_s <= p.tok_s_perfect_prefetch);
        assert!(p.tok_s > 0.02 && p.tok_s < 20.0, "{}", p.table());
        assert!(p.vram_used <= p.input.hw.vram_bytes && p.ram_used <= p.input.hw.ram_bytes);
    }
    // Workstation: attention on the GPU, some experts beside it, most in RAM, the rest streamed.
    assert_eq!(ws.dense_on, grok1::residency::Tier::Gpu);
    assert!(ws.experts_gpu >= 30 && ws.experts_gpu <= 60, "{}", ws.table());
    assert!(ws.experts_ram > 300 && ws.experts_disk > 0, "{}", ws.table());
    assert_eq!(ws.bottleneck, "disk reads");
    // Uniform routing: the chance of a disk read is the share of experts on disk.
    assert!((ws.p_disk - ws.experts_disk as f64 / 512.0).abs() < 1e-9);
    // CPU only with 256 GiB: all of the 174 GB of q4 experts fit; RAM bandwidth decides.
    assert_eq!((cpu.experts_gpu, cpu.experts_ram, cpu.experts_disk), (0, 512, 0));
    let bytes_per_token = (2 * 64) as f64 * cpu.expert_bytes as f64 + (cpu.dense_bytes + cpu.kv_bytes) as f64;
    assert!((cpu.tok_s - 50e9 / bytes_per_token).abs() < 1e-9, "{}", cpu.table());
    // q8 experts are twice the bytes: more of them on disk, slower.
    assert!(q8.experts_disk > ws.experts_disk && q8.tok_s < ws.tok_s);
}

#[test]
fn the_store_and_its_handles_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ExpertStore>();
    send_sync::<grok1::residency::ExpertRef>();
    let tmp = tempfile::tempdir().unwrap();
    let m = converted(&tmp.path().join("m"), QuantType::Q8_0, Compression::None);
    let refs = reference(&m);
    let store = ExpertStore::open(m.clone(), &StoreOptions { ram_budget: 3 * expert_bytes(&m), ..Default::default() }).unwrap();
    // Two callers at once (say, two sequences decoded side by side) see the same experts.
    std::thread::scope(|s| {
        s.spawn(|| drive(&store, &refs, 20, 11, true));
        s.spawn(|| drive(&store, &refs, 20, 12, false));
    });
    check_quiescent(&store);
    check_identities(&store.stats());
}
