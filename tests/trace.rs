//! Routing traces: what a run writes reads back as the router decided it, damage is named by
//! file and record, the policy replay's MIN bounds every online policy, the decayed-frequency
//! replay counts what the real store counts, and a trace's ranking puts the most used experts
//! on the (emulated) device.

mod support;

use grok1::convert::{convert, ConvertOptions};
use grok1::format::manifest::Compression;
use grok1::format::ConvertedModel;
use grok1::gpu::plan::ModelBytes;
use grok1::model::{KvCache, Model};
use grok1::placement::{plan_for, plan_ranked};
use grok1::quant::QuantType;
use grok1::residency::replay::{arc, decayed_frequency, lru, min, Counts, StoreClock};
use grok1::residency::trace::{RoutingTrace, TraceShape, TraceWriter};
use grok1::residency::{ExpertStore, StoreOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use support::micro_hf;

fn converted(dst: &Path, experts: QuantType) -> Arc<ConvertedModel> {
    let src = grok1::checkpoint::open(&micro_hf(), None).unwrap();
    let o = ConvertOptions { experts, dense: QuantType::Q8_0, threads: 2, compression: Compression::None, ..Default::default() };
    convert(src.as_ref(), dst, &o, &mut |_| {}).unwrap();
    Arc::new(ConvertedModel::open(dst).unwrap())
}

fn shape_of(m: &Model) -> TraceShape {
    let c = m.config();
    TraceShape { n_layers: c.n_layers, n_experts: c.n_experts, top_k: c.n_experts_per_token }
}

/// A prompt of `prompt` tokens, then `gen` decode steps (greedy), traced into `path`.
fn traced_run(m: &mut Model, path: &Path, append: bool, prompt: usize, gen: usize) -> Vec<f32> {
    let w = Arc::new(TraceWriter::create(path, shape_of(m), append).unwrap());
    m.set_observer(w.clone());
    let c = m.config().clone();
    let toks: Vec<u32> = (0..prompt as u32).map(|i| 3 + (i * 37) % (c.vocab_size as u32 - 3)).collect();
    let mut cache = KvCache::new(&c, prompt + gen);
    let mut logits = m.prefill(&toks, &mut cache, false).unwrap();
    let mut all = logits.clone();
    for _ in 0..gen {
        let next = grok1::sampling::argmax(&logits);
        logits = m.decode(next, &mut cache).unwrap();
        all.extend_from_slice(&logits);
    }
    w.finish().unwrap();
    all
}

#[test]
fn a_trace_reads_back_as_the_router_decided_and_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let files = converted(&tmp.path().join("m"), QuantType::Q8_0);
    let load = || grok1::model::load::load_weights(&files, &mut |_| {}).unwrap();
    let mut m = Model::new(files.config().clone(), load()).unwrap();
    let path = tmp.path().join("t.trace");
    let traced = traced_run(&mut m, &path, false, 5, 3);
    // Tracing changes nothing the model computes.
    let mut plain = Model::new(files.config().clone(), load()).unwrap();
    let untraced = {
        let c = plain.config().clone();
        let toks: Vec<u32> = (0..5u32).map(|i| 3 + (i * 37) % (c.vocab_size as u32 - 3)).collect();
        let mut cache = KvCache::new(&c, 8);
        let mut logits = plain.prefill(&toks, &mut cache, false).unwrap();
        let mut all = logits.clone();
        for _ in 0..3 {
            logits = plain.decode(grok1::sampling::argmax(&logits), &mut cache).unwrap();
            all.extend_from_slice(&logits);
        }
        all
    };
    assert!(traced == untraced, "tracing changed the logits");

    let t = RoutingTrace::read(&path).unwrap();
    assert_eq!(t.shape, shape_of(&m));
    assert_eq!(t.passes.iter().map(|p| (p.position, p.n_tokens)).collect::<Vec<_>>(), vec![(0, 5), (5, 1), (6, 1), (7, 1)]);
    let s = t.shape;
    let mut distinct = std::collections::HashSet::new();
    for p in &t.passes {
        for l in 0..s.n_layers {
            for tok in 0..p.n_tokens {
                let probs = &p.probs[(l * p.n_tokens + tok) * s.n_experts..][..s.n_experts];
                let sum: f32 = probs.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "probabilities sum to {sum}");
                // The chosen are the top k of the probabilities, best first.
                let chosen = p.chosen_at(&s, l, tok);
                let mut order: Vec<usize> = (0..s.n_experts).collect();
                order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
                assert_eq!(chosen.iter().map(|&e| e as usize).collect::<Vec<_>>(), order[..s.top_k].to_vec());
                distinct.extend(chosen.iter().copied());
            }
        }
    }
    assert!(distinct.len() > 2, "the router chose only {distinct:?}");
    assert_eq!(t.counts().iter().sum::<u64>() as usize, s.n_layers * s.top_k * 8);

    // Appending adds records after the old ones.
    let _ = traced_run(&mut plain, &path, true, 2, 1);
    let t2 = RoutingTrace::read(&path).unwrap();
    assert_eq!(t2.passes.len(), 6);
    assert_eq!(t2.passes[..4], t.passes[..]);

    // A trace of another model is not appended to.
    let other = TraceShape { n_experts: s.n_experts * 2, ..s };
    let Err(e) = TraceWriter::create(&path, other, true) else { panic!("appended to a trace of another shape") };
    assert!(e.to_string().contains("t.trace") && e.to_string().contains("this model has"), "{e}");
}

#[test]
fn damage_is_named_by_file_and_record() {
    let tmp = tempfile::tempdir().unwrap();
    let files = converted(&tmp.path().join("m"), QuantType::Q8_0);
    let mut m = Model::new(files.config().clone(), grok1::model::load::load_weights(&files, &mut |_| {}).unwrap()).unwrap();
    let path = tmp.path().join("t.trace");
    traced_run(&mut m, &path, false, 4, 3);
    let good = std::fs::read(&path).unwrap();
    let t = RoutingTrace::read(&path).unwrap();
    let s = t.shape;
    // Record 0 holds 4 tokens, the others one each.
    let rec = |n: usize| 12 + s.n_layers * n * (2 * s.top_k + 4 * s.n_experts) + 4;
    let start_of_2 = 32 + rec(4) + rec(1);
    let err = |bytes: &[u8]| {
        let p = tmp.path().join("bad.trace");
        std::fs::write(&p, bytes).unwrap();
        RoutingTrace::read(&p).err().expect("damage goes unnoticed").to_string()
    };
    let mut flipped = good.clone();
    flipped[start_of_2 + 20] ^= 0x10;
    let e = err(&flipped);
    assert!(e.contains("bad.trace") && e.contains("record 2") && e.contains("checksum"), "{e}");
    let e = err(&good[..good.len() - 3]);
    assert!(e.contains("record 3") && e.contains("truncated"), "{e}");
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(err(&magic).contains("not a routing trace"));
    let mut version = good.clone();
    version[8] = 9;
    assert!(err(&version).contains("version 9"));
    let mut header = good.clone();
    header[16] ^= 1;
    assert!(err(&header).contains("header checksum"));
    let mut tag = good.clone();
    tag[start_of_2] = b'X';
    assert!(err(&tag).contains("record 2") && err(&tag).contains("tag"));
    assert!(err(&good[..20]).contains("header"));
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
}

/// Fetches of a model with `layers` x `experts`, `k` distinct per layer, drawn with a skew
/// (`skew` 0: uniform).
fn random_fetches(rng: &mut Rng, steps: usize, layers: usize, experts: usize, k: usize, skew: u32) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for _ in 0..steps {
        for l in 0..layers {
            let mut f: Vec<usize> = Vec::new();
            while f.len() < k {
                let mut e = (rng.next() % experts as u64) as usize;
                for _ in 0..skew {
                    e = e.min((rng.next() % experts as u64) as usize);
                }
                if !f.contains(&(l * experts + e)) {
                    f.push(l * experts + e);
                }
            }
            f.sort_unstable();
            out.push(f);
        }
    }
    out
}

fn check_min_bounds(fetches: &[Vec<usize>], n_slots: usize, layers: usize, what: &str) {
    for capacity in [1, 2, n_slots / 8, n_slots / 4, n_slots / 2, n_slots - 1] {
        let capacity = capacity.max(1);
        let best = min(fetches, capacity);
        let total: u64 = fetches.iter().map(|f| f.len() as u64).sum();
        assert_eq!(best.hits + best.misses, total);
        for half_life in [4.0, 64.0, f64::INFINITY] {
            let online = [
                ("LRU", lru(fetches, capacity)),
                ("ARC", arc(fetches, capacity)),
                ("decayed", decayed_frequency(fetches, n_slots, capacity, StoreClock { n_layers: layers, half_life_steps: half_life })),
            ];
            for (name, c) in online {
                assert_eq!(c.hits + c.misses, total, "{name}");
                assert!(best.hits >= c.hits, "{what}, capacity {capacity}: MIN {best:?} < {name} {c:?}");
            }
        }
    }
}

#[test]
fn min_bounds_every_online_policy_on_random_traces() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for (layers, experts, k, skew) in [(2, 8, 2, 0), (4, 8, 2, 2), (3, 16, 4, 1), (1, 8, 1, 3)] {
        let f = random_fetches(&mut rng, 150, layers, experts, k, skew);
        check_min_bounds(&f, layers * experts, layers, &format!("{layers}x{experts} top {k} skew {skew}"));
    }
}

#[test]
fn min_bounds_every_online_policy_on_adversarial_traces() {
    // A cyclic scan one larger than the cache: LRU and frequency without decay miss on every
    // request; MIN keeps capacity - 1 of them.
    let n = 9;
    let scan: Vec<Vec<usize>> = (0..20 * n).map(|i| vec![i % n]).collect();
    let lru_c = lru(&scan, n - 1);
    assert_eq!(lru_c.hits, 0, "{lru_c:?}");
    let best = min(&scan, n - 1);
    assert!(best.hit_rate() > 0.8, "{best:?}");
    check_min_bounds(&scan, n, 1, "cyclic scan");
    // A hot set with bursts of one-off experts (what flushes LRU), and an alternation of
    // two working sets (what flips frequency counts).
    let mut rng = Rng(77);
    let mut mixed = Vec::new();
    for i in 0..400 {
        if i % 10 < 7 {
            mixed.push(vec![(rng.next() % 4) as usize]);
        } else {
            mixed.push(vec![4 + (rng.next() % 60) as usize]);
        }
    }
    check_min_bounds(&mixed, 64, 1, "hot set and one-offs");
    let phases: Vec<Vec<usize>> = (0..600).map(|i| vec![(i / 100 % 2) * 8 + i % 8]).collect();
    check_min_bounds(&phases, 16, 1, "alternating working sets");
    assert_eq!(min(&[], 3), Counts::default());
}

#[test]
fn the_decayed_frequency_replay_counts_what_the_store_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let files = converted(&tmp.path().join("m"), QuantType::Q8_0);
    let c = files.config().clone();
    let bytes = grok1::model::load::expert_bytes(&files);
    let n_slots = c.n_layers * c.n_experts;
    for capacity in [2usize, 4, 7] {
        // No prefetch: a prefetched expert is a miss that is resident on time, which the
        // replay (of what was asked, not of what was guessed) does not model.
        let opts = StoreOptions { ram_budget: (capacity * bytes) as u64, prefetch: false, io_threads: 1, ..StoreOptions::default() };
        let store = ExpertStore::open(files.clone(), &opts).unwrap();
        let dense = grok1::model::load::load_dense_weights(&files, &mut |_| {}).unwrap();
        let mut m = Model::with_store(c.clone(), dense, store, bytes).unwrap();
        let path = tmp.path().join(format!("s{capacity}.trace"));
        traced_run(&mut m, &path, false, 6, 40);
        let s = m.store().unwrap().stats();
        let t = RoutingTrace::read(&path).unwrap();
        let r = decayed_frequency(&t.fetches(), n_slots, capacity, StoreClock { n_layers: c.n_layers, half_life_steps: opts.half_life_steps });
        eprintln!("capacity {capacity}: store {}/{} hits/misses, replay {r:?}", s.ram.hits, s.ram.misses);
        assert_eq!((s.ram.hits, s.ram.misses), (r.hits, r.misses), "capacity {capacity}: {}", s.summary());
        assert!(r.hits > 0 && r.misses > 0, "{r:?}");
    }
}

fn grok1_run(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_grok1-run")).args(args).output().unwrap();
    assert!(out.status.success(), "grok1-run {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn a_placement_trace_puts_the_most_used_experts_on_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let files = converted(&dir, QuantType::Bf16);
    let c = files.config().clone();
    let model = dir.to_str().unwrap();
    let trace = tmp.path().join("bench.trace");
    let (prompt, gen) = (4usize, 24usize);
    let bench = |extra: &[&str]| {
        let (p, g) = (prompt.to_string(), gen.to_string());
        let mut args = vec!["bench", "--model", model, "--prompt-tokens", &p, "--gen-tokens", &g, "--json"];
        args.extend_from_slice(extra);
        serde_json::from_slice::<serde_json::Value>(&grok1_run(&args).stdout).unwrap()
    };
    bench(&["--trace-routing", trace.to_str().unwrap()]);
    let t = RoutingTrace::read(&trace).unwrap();
    // Prefill, one untimed decode step, then the timed ones.
    assert_eq!(t.passes.len(), 2 + gen);

    // A device with room for the dense part and four experts.
    let mb = ModelBytes::from_manifest(&files.manifest);
    let (kv, batch) = (prompt + gen + 1, (prompt + gen + 1).min(512));
    let all = plan_for(&mb, &c, 1 << 40, kv, batch).unwrap();
    let per_expert = all.expert_bytes / all.experts.len() as u64;
    let budget = all.kv_bytes + all.scratch_bytes + all.dense_bytes + 4 * per_expert + per_expert / 2;
    let ranking = t.expert_ranking();
    let by_trace = plan_ranked(&mb, &c, budget, Some(&ranking), kv, batch).unwrap();
    let by_default = plan_for(&mb, &c, budget, kv, batch).unwrap();
    assert_eq!(by_trace.experts, ranking[..4].to_vec());
    assert_eq!(by_default.experts.len(), 4);
    let counts = t.counts();
    let most: Vec<u64> = ranking[..4].iter().map(|&(l, e)| counts[l * c.n_experts + e]).collect();
    assert!(counts.iter().enumerate().all(|(s, &n)| ranking[..4].contains(&(s / c.n_experts, s % c.n_experts)) || n <= *most.iter().min().unwrap()));

    // The device's hit rate over the timed tokens is what the trace predicts for each plan.
    let predicted = |held: &[(usize, usize)]| {
        let (mut hit, mut all) = (0u64, 0u64);
        for p in &t.passes[2..] {
            for l in 0..c.n_layers {
                for &e in p.chosen_at(&t.shape, l, 0) {
                    all += 1;
                    hit += held.contains(&(l, e as usize)) as u64;
                }
            }
        }
        hit as f64 / all as f64
    };
    let b = budget.to_string();
    let rate = |r: &serde_json::Value| r["gpu"]["gpu_expert_hit_rate"].as_f64().unwrap();
    let with_trace = bench(&["--emulate-gpu", &b, "--placement-trace", trace.to_str().unwrap()]);
    let without = bench(&["--emulate-gpu", &b]);
    eprintln!("device hit rate: {} with the trace, {} without", rate(&with_trace), rate(&without));
    assert!((rate(&with_trace) - predicted(&by_trace.experts)).abs() < 1e-12, "{with_trace}");
    assert!((rate(&without) - predicted(&by_default.experts)).abs() < 1e-12, "{without}");
    assert!(rate(&with_trace) > rate(&without), "with {} without {}", rate(&with_trace), rate(&without));

    // A trace of another shape is refused, naming the file.
    let other = tmp.path().join("other.trace");
    let w = TraceWriter::create(&other, TraceShape { n_layers: c.n_layers + 1, n_experts: c.n_experts, top_k: 2 }, false).unwrap();
    w.finish().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_grok1-run"))
        .args(["bench", "--model", model, "--prompt-tokens", "2", "--gen-tokens", "1", "--emulate-gpu", &b, "--placement-trace", other.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("other.trace") && err.contains("layers"), "{err}");

    // replay-trace prints every policy at every budget, MIN on top of each budget's online ones.
    let out = grok1_run(&["replay-trace", trace.to_str().unwrap(), "--budgets", "1/8,1/4,1/2", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 12);
    for b in rows.chunks(4) {
        let best = b.iter().find(|r| r["policy"].as_str().unwrap().starts_with("MIN")).unwrap()["hits"].as_u64().unwrap();
        assert!(b.iter().all(|r| r["hits"].as_u64().unwrap() <= best), "{b:?}");
    }
}
