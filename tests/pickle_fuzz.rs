//! Mutation fuzzing of the pickle, ckpt-0 and torch-zip readers over the fixture files: bit
//! flips, truncations, insertions, deletions, splices between files, and corruption of length
//! and integer fields found by walking the opcodes and zip headers. Every input must either
//! decode completely or be refused with an error; nothing may panic, and no allocation may grow
//! with what a length field claims instead of with the input.
//!
//! `GROK1_FUZZ_SCALE=10 cargo test --release --test pickle_fuzz -- --nocapture` runs ten times
//! the default number of cases.

use grok1::checkpoint::{ckpt0, torch_bin, Ckpt0Source, TensorSource, TorchBinSource};
use grok1::GrokConfig;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Relaxed);
        let live = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(live, Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MICRO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/micro");
const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/bin");

struct Seed {
    bytes: Vec<u8>,
    /// (position, width) of length and integer fields.
    fields: Vec<(usize, usize)>,
    /// Position in the ckpt-0 order, or None for a torch archive.
    index: Option<usize>,
}

/// Record the argument fields of a pickle's opcodes (the subset these files use).
fn pickle_fields(b: &[u8], base: usize, out: &mut Vec<(usize, usize)>) {
    let mut p = 0;
    while p < b.len() {
        let op = b[p];
        p += 1;
        let (width, counted) = match op {
            0x80 | b'K' | b'h' | b'q' => (1, false),
            0x8c | b'C' | 0x8a => (1, true),
            b'M' => (2, false),
            b'J' | b'j' | b'r' => (4, false),
            b'X' | b'B' | 0x8b => (4, true),
            0x95 => (8, false),
            0x8d | 0x8e | 0x96 => (8, true),
            b'G' => {
                p += 8;
                continue;
            }
            b'c' => {
                for _ in 0..2 {
                    p += b[p..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| n + 1);
                }
                continue;
            }
            b'.' => return,
            _ => (0, false),
        };
        if width == 0 {
            continue;
        }
        if p + width > b.len() {
            return;
        }
        out.push((base + p, width));
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(&b[p..p + width]);
        p += width;
        if counted {
            p = p.saturating_add(u64::from_le_bytes(v) as usize);
        }
    }
}

/// Record the size, offset and length fields of a stored zip's headers, and the fields of the
/// pickle inside it.
fn zip_fields(b: &[u8]) -> Vec<(usize, usize)> {
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut p = 0;
    while b[p..].starts_with(b"PK\x03\x04") {
        out.extend([(p + 18, 4), (p + 22, 4), (p + 26, 2), (p + 28, 2)]);
        let (n, e, size) = (u16_at(p + 26), u16_at(p + 28), u32_at(p + 18));
        let data = p + 30 + n + e;
        if b[p + 30..p + 30 + n].ends_with(b"data.pkl") {
            pickle_fields(&b[data..data + size], data, &mut out);
        }
        p = data + size;
    }
    while b[p..].starts_with(b"PK\x01\x02") {
        out.extend([(p + 20, 4), (p + 24, 4), (p + 28, 2), (p + 30, 2), (p + 32, 2), (p + 42, 4)]);
        p += 46 + u16_at(p + 28) + u16_at(p + 30) + u16_at(p + 32);
    }
    assert!(b[p..].starts_with(b"PK\x05\x06"));
    out.extend([(p + 8, 2), (p + 10, 2), (p + 12, 4), (p + 16, 4), (p + 20, 2)]);
    out
}

fn corpus() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for i in 0..26 {
        let bytes = std::fs::read(format!("{MICRO}/ckpt0/{}", ckpt0::file_name(i))).unwrap();
        let mut fields = Vec::new();
        pickle_fields(&bytes, 0, &mut fields);
        seeds.push(Seed { bytes, fields, index: Some(i) });
    }
    for f in [
        "keyfan/pytorch_model-00001-of-00002.bin",
        "keyfan/pytorch_model-00002-of-00002.bin",
        "hpcai/pytorch_model.bin",
    ] {
        let bytes = std::fs::read(format!("{BIN}/{f}")).unwrap();
        let fields = zip_fields(&bytes);
        seeds.push(Seed { bytes, fields, index: None });
    }
    seeds
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Splice { at: Index, from: Index, src: Index, len: usize },
    Field { field: Index, value: u64, relative: bool },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![
        Just(0u64),
        Just(1),
        Just(0x7f),
        Just(0x80),
        Just(0xff),
        Just(0xffff),
        Just(0x7fff_ffff),
        Just(0xffff_ffff),
        Just(u64::MAX),
        Just(1 << 40),
        any::<u64>(),
    ];
    prop_oneof![
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), any::<Index>(), any::<Index>(), 1usize..512)
            .prop_map(|(at, from, src, len)| Mutation::Splice { at, from, src, len }),
        4 => (any::<Index>(), value, any::<bool>(), -2i64..=2).prop_map(|(field, v, relative, d)| {
            Mutation::Field { field, value: if relative { d as u64 } else { v }, relative }
        }),
    ]
}

fn apply(seeds: &[Seed], seed: &Seed, ms: &[Mutation]) -> Vec<u8> {
    let mut b = seed.bytes.clone();
    for m in ms {
        let n = b.len().max(1);
        match m {
            Mutation::Flip(i, bit) if !b.is_empty() => {
                let at = i.index(n);
                b[at] ^= 1 << bit
            }
            Mutation::Truncate(i) => b.truncate(i.index(n)),
            Mutation::Insert(i, v) => {
                let at = i.index(n + 1).min(b.len());
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Delete(i, len) if !b.is_empty() => {
                let at = i.index(n);
                b.drain(at..(at + len).min(b.len()));
            }
            Mutation::Splice { at, from, src, len } => {
                let other = &seeds[from.index(seeds.len())].bytes;
                let s = src.index(other.len());
                let chunk = &other[s..(s + len).min(other.len())];
                let at = at.index(n).min(b.len());
                let end = (at + chunk.len()).min(b.len());
                b.splice(at..end, chunk.iter().copied());
            }
            // Length fields are only meaningful at their original positions, so these apply to
            // the unshifted layout; later mutations may move things around.
            Mutation::Field { field, value, relative } if !seed.fields.is_empty() => {
                let (at, w) = seed.fields[field.index(seed.fields.len())];
                if at + w <= b.len() {
                    let mut v = [0u8; 8];
                    v[..w].copy_from_slice(&b[at..at + w]);
                    let old = u64::from_le_bytes(v);
                    let new = if *relative { old.wrapping_add(*value) } else { *value };
                    b[at..at + w].copy_from_slice(&new.to_le_bytes()[..w]);
                }
            }
            _ => {}
        }
    }
    b
}

/// Decode a (mutated) file completely; Ok(true) if accepted.
fn exercise(cfg: &GrokConfig, seed: &Seed, bytes: &[u8]) -> Result<bool, String> {
    match seed.index {
        Some(i) => match ckpt0::decode_file(cfg, i, bytes, Path::new("fuzzed")) {
            Ok(ts) => {
                assert!(!ts.is_empty());
                Ok(true)
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("fuzzed: ") && msg.len() > 10, "{msg}");
                Ok(false)
            }
        },
        None => match torch_bin::read_archive(bytes) {
            Ok(ts) => {
                for t in &ts {
                    let v = t.read_all(bytes);
                    assert_eq!(v.len(), t.tensor.shape.iter().product::<usize>());
                }
                Ok(true)
            }
            Err(e) => {
                assert!(!e.is_empty());
                Ok(false)
            }
        },
    }
}

fn scale() -> u32 {
    std::env::var("GROK1_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

fn runner(cases: u32) -> TestRunner {
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
    }
    d
}

fn read_everything(s: &dyn TensorSource) {
    for st in s.tensors() {
        let mut v = vec![0f32; st.rows() * st.cols()];
        s.read_rows(st.tensor, 0, &mut v).unwrap();
    }
}

/// One test, so the allocation high-water marks belong to the fuzzing alone.
#[test]
fn mutated_fixtures_decode_or_fail_cleanly() {
    let cfg = GrokConfig::from_hf_json(&Path::new(MICRO).join("ckpt0/config.json")).unwrap();
    let seeds = corpus();
    let input_max = seeds.iter().map(|s| s.bytes.len()).max().unwrap();
    let fields: usize = seeds.iter().map(|s| s.fields.len()).sum();
    let base_peak = LIVE.load(Relaxed);
    PEAK.store(base_peak, Relaxed);
    LARGEST.store(0, Relaxed);

    // In-memory campaign over single files.
    let (execs, accepted) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let t0 = Instant::now();
    let strategy = (any::<Index>(), prop::collection::vec(mutation(), 1..5));
    runner(150_000 * scale())
        .run(&strategy, |(which, ms)| {
            // ckpt-0 files are small and many; weight the three archives up to a quarter.
            let k = which.index(seeds.len() * 4);
            let seed = if k < 3 * seeds.len() { &seeds[k % 26] } else { &seeds[26 + k % 3] };
            let bytes = apply(&seeds, seed, &ms);
            if exercise(&cfg, seed, &bytes).unwrap() {
                accepted.fetch_add(1, Relaxed);
            }
            execs.fetch_add(1, Relaxed);
            Ok(())
        })
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let n = execs.load(Relaxed);
    eprintln!(
        "fuzz: {n} executions in {secs:.1} s ({:.0}/s) over {} seed files and {fields} length fields; \
         {} decoded, {} refused with an error",
        n as f64 / secs,
        seeds.len(),
        accepted.load(Relaxed),
        n - accepted.load(Relaxed)
    );

    // Whole directories through the sources: one mutated file among intact ones.
    let d = copy_dir(&Path::new(MICRO).join("ckpt0"));
    let h = copy_dir(&Path::new(BIN).join("hpcai"));
    let (dir_execs, dir_ok) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let t1 = Instant::now();
    runner(600 * scale())
        .run(&strategy, |(which, ms)| {
            let k = which.index(27);
            let (seed, path): (&Seed, PathBuf) = if k < 26 {
                (&seeds[k], d.path().join(ckpt0::file_name(k)))
            } else {
                (&seeds[28], h.path().join("pytorch_model.bin"))
            };
            std::fs::write(&path, apply(&seeds, seed, &ms)).unwrap();
            let opened: Result<Box<dyn TensorSource>, _> = if k < 26 {
                Ckpt0Source::open(d.path(), None).map(|s| Box::new(s) as _)
            } else {
                TorchBinSource::open(h.path(), None).map(|s| Box::new(s) as _)
            };
            match opened {
                Ok(s) => {
                    read_everything(&*s);
                    dir_ok.fetch_add(1, Relaxed);
                }
                Err(e) => assert!(e.to_string().len() > 10, "{e}"),
            }
            std::fs::write(&path, &seed.bytes).unwrap();
            dir_execs.fetch_add(1, Relaxed);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "fuzz: {} directory opens in {:.1} s, {} opened and read completely",
        dir_execs.load(Relaxed),
        t1.elapsed().as_secs_f64(),
        dir_ok.load(Relaxed)
    );

    let largest = LARGEST.load(Relaxed);
    let peak = PEAK.load(Relaxed) - base_peak;
    eprintln!(
        "fuzz: largest single allocation {} KiB, peak heap {} KiB (largest input {} KiB)",
        largest >> 10,
        peak >> 10,
        input_max >> 10
    );
    // Legitimate decoding allocates about 4 bytes of f32 per stored element, so a few times the
    // input is expected; anything near what a corrupted length field can claim (GBs) is a bug.
    assert!(largest < 8 * input_max, "largest allocation {largest} B");
    assert!(peak < 64 * input_max, "peak heap {peak} B");
}
