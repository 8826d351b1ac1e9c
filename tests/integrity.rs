//! Integrity on the read path: a byte flipped on disk in any expert chunk stops a budgeted run
//! with an error naming the chunk (every read path, demand and prefetch reads); `--verify-load`
//! catches flipped bytes in what an all-in-RAM run loads; a shard truncated while the model is
//! open gives an error naming it; clean models give bit-identical logits with and without the
//! checks, and models converted before `xxh3` was recorded still run.
//!
//! Each test says how to plant the fault that it must catch (remove the check it relies on).

mod support;

use grok1::checkpoint;
use grok1::convert::{convert, ConvertOptions};
use grok1::format::manifest::Compression;
use grok1::format::{ConvertedModel, Manifest, MANIFEST_FILE};
use grok1::quant::QuantType;
use grok1::residency::{ExpertStore, ReadPath, StoreOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use support::micro_hf;

fn converted(dst: &Path, compression: Compression) {
    let src = checkpoint::open(&micro_hf(), None).unwrap();
    let o = ConvertOptions {
        experts: QuantType::Q8_0,
        dense: QuantType::Q8_0,
        threads: 2,
        compression,
        ..Default::default()
    };
    convert(src.as_ref(), dst, &o, &mut |_| {}).unwrap();
}

fn manifest(dir: &Path) -> Manifest {
    Manifest::load(&dir.join(MANIFEST_FILE)).unwrap()
}

/// XOR one byte of `file` at `pos` with 0x40; calling it twice restores the file.
fn flip(file: &Path, pos: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, pos).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, pos).unwrap();
    f.sync_all().unwrap();
    // O_DIRECT reads see the file, buffered ones the page cache: both now hold the flip.
}

/// Every token of the micro model's vocabulary but the special ones: prefilled as one batch,
/// they route to every expert of every layer (were one never routed, the flip test would fail
/// for its chunk: the run would succeed for want of a read).
fn all_tokens() -> String {
    (3..256).map(|t| t.to_string()).collect::<Vec<_>>().join(",")
}

fn grok1_run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_grok1-run")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn logits(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--tokens"];
    let tokens = all_tokens();
    args.push(&tokens);
    args.extend(["--out", out.to_str().unwrap(), "--threads", "2"]);
    args.extend(extra);
    grok1_run(&args)
}

/// A budget below the micro model's expert bytes: the store streams experts.
const BUDGET: &str = "64KiB";

/// Plant: make `ConvertedModel::check_expert` (src/format/reader.rs) return `Ok(())` at once.
/// The runs then succeed with the flipped byte (or, for some flips, fail without naming xxh3).
#[test]
fn a_flipped_byte_in_any_expert_chunk_stops_a_budgeted_run_naming_the_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    converted(&model, Compression::None);
    let m = manifest(&model);
    let out = tmp.path().join("logits.npy");
    let clean = logits(&model, &out, &["--ram-budget", BUDGET]);
    assert!(clean.status.success(), "{}", stderr(&clean));
    let paths = [ReadPath::Direct, ReadPath::Pread, ReadPath::Mmap];
    for (i, c) in m.experts.iter().enumerate() {
        assert!(c.xxh3.is_some(), "the converter records xxh3 for every chunk");
        // Different offsets in each chunk: block scales, quants, the padding between tensors.
        let at = (i as u64 * 7919 + 13) % c.bytes;
        let shard = model.join(&m.shards[c.shard].file);
        flip(&shard, c.offset + at);
        let path = paths[i % paths.len()].name();
        let run = if i % 2 == 0 {
            logits(&model, &out, &["--ram-budget", BUDGET, "--read-path", path])
        } else {
            let tokens = all_tokens();
            let m = model.to_str().unwrap();
            grok1_run(&["generate", "--model", m, "--tokens", &tokens, "-n", "2", "--ram-budget", BUDGET, "--read-path", path])
        };
        flip(&shard, c.offset + at);
        let e = stderr(&run);
        assert!(!run.status.success(), "chunk {i} (layer {}, expert {}) flipped at {at}: the run succeeded", c.layer, c.expert);
        let named = format!("expert chunk (layer {}, expert {}), bytes {}..{}", c.layer, c.expert, c.offset, c.offset + c.bytes);
        assert!(e.contains(&named) && e.contains(&m.shards[c.shard].file) && e.contains("xxh3"), "chunk {i}: {e}");
    }
}

/// The same through the library on a zstd model, with the flip found by a prefetch read (the
/// hint reads it, the fetch that needs it reports the failure) and by a demand read; the store
/// neither caches nor hands out the damaged expert, and reads it again (failing again) when
/// asked again. Plant: as above.
#[test]
fn prefetch_and_demand_reads_of_a_damaged_compressed_chunk_fail_and_nothing_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    converted(&model, Compression::Zstd);
    let m = manifest(&model);
    for (i, c) in m.experts.iter().enumerate() {
        let shard = model.join(&m.shards[c.shard].file);
        let at = (i as u64 * 4099 + 1) % c.bytes;
        flip(&shard, c.offset + at);
        let files = Arc::new(ConvertedModel::open(&model).unwrap());
        let path = if i % 2 == 0 { ReadPath::Direct } else { ReadPath::Pread };
        // Room for half the experts: the damaged one would be admitted if it were read clean.
        let half: u64 = m.experts.iter().flat_map(|x| &x.tensors).map(|t| t.bytes).sum::<u64>() / 2;
        let opts = StoreOptions { ram_budget: half, read_path: path, ..Default::default() };
        let store = ExpertStore::open(files, &opts).unwrap();
        if i % 2 == 0 {
            store.hint_next_layer(c.layer, &[c.expert]);
        }
        for attempt in 0..2 {
            let got: Vec<_> = store.fetch(c.layer, &[c.expert]).collect();
            assert_eq!(got.len(), 1);
            let e = got.into_iter().next().unwrap().err().unwrap_or_else(|| panic!("chunk {i}, attempt {attempt}: handed out")).to_string();
            assert!(e.contains(&format!("layer {}, expert {}", c.layer, c.expert)) && e.contains("xxh3"), "{e}");
            assert!(!store.is_cached(c.layer, c.expert));
        }
        drop(store);
        flip(&shard, c.offset + at);
    }
}

/// Plant: remove the `verifies_all` block of `ConvertedModel::dense` (src/format/reader.rs):
/// the run with the flipped dense byte then succeeds.
#[test]
fn verify_load_catches_flipped_bytes_in_an_all_in_ram_load() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    converted(&model, Compression::None);
    let m = manifest(&model);
    let out = tmp.path().join("logits.npy");

    let d = m.dense_entry("blk.1.attn_q").unwrap();
    let shard = model.join(&m.shards[d.shard].file);
    flip(&shard, d.offset + d.bytes / 3);
    // Without the flag an all-in-RAM load checks dense tensors' sizes, not their bytes.
    let unchecked = logits(&model, &out, &[]);
    assert!(unchecked.status.success(), "{}", stderr(&unchecked));
    let run = logits(&model, &out, &["--verify-load"]);
    let e = stderr(&run);
    assert!(!run.status.success());
    let named = format!("tensor blk.1.attn_q, bytes {}..{}", d.offset, d.offset + d.bytes);
    assert!(e.contains(&named) && e.contains(&m.shards[d.shard].file) && e.contains("xxh3"), "{e}");
    flip(&shard, d.offset + d.bytes / 3);

    let c = m.expert_chunk(1, 6).unwrap();
    let shard = model.join(&m.shards[c.shard].file);
    flip(&shard, c.offset + 100);
    for budget in [None, Some("1GiB")] {
        // No budget: `load_weights`; a budget holding every expert: the store loads them all.
        let mut extra = vec!["--verify-load"];
        if let Some(b) = budget {
            extra.extend(["--ram-budget", b]);
        }
        let run = logits(&model, &out, &extra);
        let e = stderr(&run);
        assert!(!run.status.success(), "{budget:?}");
        assert!(e.contains("expert chunk (layer 1, expert 6), bytes") && e.contains("xxh3"), "{budget:?}: {e}");
    }
    flip(&shard, c.offset + 100);
}

/// Remove every `xxh3` from the manifest, as a model converted before the field existed.
fn strip_xxh3(model: &Path) {
    let p = model.join(MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    for list in ["dense", "experts"] {
        for item in v[list].as_array_mut().unwrap() {
            assert!(item.as_object_mut().unwrap().remove("xxh3").is_some());
        }
    }
    write_manifest(&p, &v);
}

fn write_manifest(p: &Path, v: &serde_json::Value) {
    let mut perm = std::fs::metadata(p).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(p, perm).unwrap();
    std::fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// `verify` compares the xxh3s too: a manifest whose xxh3 for one chunk and one dense tensor
/// disagrees with bytes whose sha256 still matches is reported, naming both. Plant: drop
/// `&& fast_ok` in `check_shard` (src/format/verify.rs).
#[test]
fn verify_compares_the_xxh3s() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    converted(&model, Compression::None);
    assert!(grok1::format::verify(&model, &|_| {}).unwrap().ok);
    let p = model.join(MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    for item in v["experts"].as_array_mut().unwrap() {
        if item["layer"] == 1 && item["expert"] == 2 {
            item["xxh3"] = "0000000000000000".into();
        }
    }
    for item in v["dense"].as_array_mut().unwrap() {
        if item["name"] == "blk.0.ffn_router" {
            item["xxh3"] = "0000000000000000".into();
        }
    }
    write_manifest(&p, &v);
    let report = grok1::format::verify(&model, &|_| {}).unwrap();
    let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("layer 1, expert 2")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("blk.0.ffn_router")), "{problems:?}");
}

/// Older models (no `xxh3`) stay readable: a budgeted run says once that it cannot check, and
/// `--verify-load` falls back to sha256. Plant: drop the `sha256` fallback in `check_expert`
/// (pass `None` for it): the flipped expert then loads.
#[test]
fn models_without_xxh3_still_run_and_verify_load_uses_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    converted(&model, Compression::None);
    let out = tmp.path().join("logits.npy");
    let with = logits(&model, &out, &[]);
    assert!(with.status.success(), "{}", stderr(&with));
    let reference = std::fs::read(&out).unwrap();
    strip_xxh3(&model);
    let run = logits(&model, &out, &["--ram-budget", BUDGET]);
    let e = stderr(&run);
    assert!(run.status.success(), "{e}");
    assert_eq!(e.matches("no xxh3 checksums").count(), 1, "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), reference);

    let m = manifest(&model);
    let c = m.expert_chunk(0, 3).unwrap();
    let shard = model.join(&m.shards[c.shard].file);
    flip(&shard, c.offset + 5);
    let run = logits(&model, &out, &["--verify-load"]);
    let e = stderr(&run);
    assert!(!run.status.success());
    assert!(e.contains("expert chunk (layer 0, expert 3), bytes") && e.contains("sha256"), "{e}");
}

/// Plant: remove the length check of the `Mmap` branch of `ChunkReader::with_raw`
/// (src/residency/io.rs): the mmap case then dies of SIGBUS; or make the `Direct` loop treat a
/// zero-length read as the end of the chunk: it then decodes a short buffer.
#[test]
fn a_shard_truncated_while_the_store_runs_gives_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    for path in [ReadPath::Direct, ReadPath::Pread, ReadPath::Mmap] {
        let model = tmp.path().join(path.name());
        converted(&model, Compression::None);
        let files = Arc::new(ConvertedModel::open(&model).unwrap());
        let c = files.config().clone();
        let opts = StoreOptions { ram_budget: 1, read_path: path, ..Default::default() };
        let store = ExpertStore::open(files.clone(), &opts).unwrap();
        assert_eq!(store.fetch(0, &[0, 1]).filter(|r| r.is_ok()).count(), 2);
        let m = manifest(&model);
        let s = m.shards.iter().position(|s| s.file.starts_with("experts")).unwrap();
        let shard = model.join(&m.shards[s].file);
        // Cut in the middle of a chunk that is not the last, so that some reads are short and
        // some find nothing at all.
        let cut = m.experts.iter().filter(|x| x.shard == s).nth(5).map(|x| x.offset + x.bytes / 2).unwrap();
        std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(cut).unwrap();
        let mut errors = Vec::new();
        for l in 0..c.n_layers {
            let all: Vec<usize> = (0..c.n_experts).collect();
            for r in store.fetch(l, &all) {
                if let Err(e) = r {
                    errors.push(e.to_string());
                }
            }
        }
        let past: usize = m.experts.iter().filter(|x| x.shard == s && x.offset + x.bytes > cut).count();
        assert_eq!(errors.len(), past, "{path:?}: {errors:?}");
        for e in &errors {
            assert!(e.contains(&m.shards[s].file) && e.contains("the file ends"), "{path:?}: {e}");
        }
        assert!(errors.iter().any(|e| e.contains(&format!("ends {} bytes into it", cut - m.experts.iter().filter(|x| x.shard == s).nth(5).unwrap().offset))), "{errors:?}");
    }
}

/// The checks change nothing on a clean model: logits are bit-identical all in RAM, with
/// `--verify-load`, and streamed on every read path. (A check that rejected clean bytes, or a
/// read path that handed the check different bytes than the kernels, fails this test.)
#[test]
fn clean_models_give_identical_logits_with_and_without_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    converted(&model, Compression::None);
    let out = tmp.path().join("logits.npy");
    let base = logits(&model, &out, &[]);
    assert!(base.status.success(), "{}", stderr(&base));
    let reference = std::fs::read(&out).unwrap();
    let runs: [&[&str]; 5] = [
        &["--verify-load"],
        &["--verify-load", "--ram-budget", BUDGET],
        &["--ram-budget", BUDGET, "--read-path", "direct"],
        &["--ram-budget", BUDGET, "--read-path", "pread"],
        &["--ram-budget", BUDGET, "--read-path", "mmap", "--io-threads", "1"],
    ];
    for extra in runs {
        let run = logits(&model, &out, extra);
        assert!(run.status.success(), "{extra:?}: {}", stderr(&run));
        assert!(!stderr(&run).contains("no xxh3"), "{extra:?}");
        assert_eq!(std::fs::read(&out).unwrap(), reference, "{extra:?}");
    }
}
