//! The converter end to end: fixtures in both namings convert and verify; corruption is found
//! and named; killed conversions resume to identical bytes; bad input gets its own error.

mod common;
mod support;

use grok1::checkpoint;
use grok1::convert::{convert, ConvertOptions};
use grok1::format::manifest::{Compression, Manifest};
use grok1::format::{verify, ConvertedModel, Problem, MANIFEST_FILE};
use grok1::quant::QuantType;
use safetensors::tensor::Dtype;
use std::path::Path;
use support::*;

fn opts(experts: QuantType, dense: QuantType) -> ConvertOptions {
    ConvertOptions { experts, dense, threads: 2, ..ConvertOptions::default() }
}

fn convert_dir(src: &Path, dst: &Path, o: &ConvertOptions) -> grok1::Result<()> {
    let s = checkpoint::open(src, None)?;
    convert(s.as_ref(), dst, o, &mut |_| {}).map(|_| ())
}

fn no_progress(_: u64) {}

#[test]
fn fixtures_convert_and_verify_in_every_type() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sources = vec![("keyfan", micro_hf()), ("hpcai", micro_hpcai())];
    if let Some(p) = shared_fixture("tiny/hf") {
        sources.push(("keyfan-sharded", p));
    }
    for (name, src) in sources {
        for (e, d) in [
            (QuantType::Bf16, QuantType::Bf16),
            (QuantType::Q8_0, QuantType::Bf16),
            (QuantType::Iq4Nl, QuantType::Q8_0),
            (QuantType::Q4_0, QuantType::Q8_0),
            (QuantType::Q4S, QuantType::Q8_0),
        ] {
            let dst = tmp.path().join(format!("{name}-{e}-{d}"));
            convert_dir(&src, &dst, &opts(e, d)).unwrap();
            let r = verify(&dst, &no_progress).unwrap();
            assert!(r.ok, "{name} {e}/{d}: {:?}", r.problems);
            let m = ConvertedModel::open(&dst).unwrap();
            assert_eq!(m.manifest.quant.experts, e);
            // Every expert chunk is one aligned, contiguous read.
            for c in &m.manifest.experts {
                assert_eq!(c.offset % 4096, 0);
                for t in &c.tensors {
                    // q4_s where rows are whole super-blocks (tiny), iq4_nl elsewhere (micro).
                    let want = if e == QuantType::Q4S { QuantType::int4_for(t.shape[1]) } else { e };
                    assert_eq!(t.qtype, want, "{name} {e}/{d}: {:?} {:?}", t.proj, t.shape);
                }
                let mut buf = Vec::new();
                m.read_expert(c.layer, c.expert, &mut buf).unwrap();
                assert_eq!(buf.len() as u64, c.raw_bytes);
            }
        }
    }
}

#[test]
fn lossless_bf16_reproduces_the_source_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    convert_dir(&micro_hpcai(), &dst, &opts(QuantType::Bf16, QuantType::Bf16)).unwrap();
    let src = checkpoint::open(&micro_hpcai(), None).unwrap();
    let m = ConvertedModel::open(&dst).unwrap();
    let mut buf = Vec::new();
    for s in src.tensors() {
        let mut want = vec![0f32; s.rows() * s.cols()];
        src.read_rows(s.tensor, 0, &mut want).unwrap();
        let (qtype, bytes): (QuantType, Vec<u8>) = match s.tensor {
            checkpoint::Tensor::Expert { layer, expert, proj } => {
                m.read_expert(layer, expert, &mut buf).unwrap();
                let c = m.expert_chunk(layer, expert);
                let t = c.tensors.iter().find(|t| t.proj == proj.into()).unwrap();
                (t.qtype, buf[t.offset as usize..(t.offset + t.bytes) as usize].to_vec())
            }
            t => {
                let v = m.dense(&t.to_string()).unwrap();
                (v.qtype, v.bytes.to_vec())
            }
        };
        let mut got = vec![0f32; want.len()];
        let rb = qtype.row_bytes(s.cols()).unwrap();
        for (r, out) in got.chunks_exact_mut(s.cols()).enumerate() {
            qtype.dequantize_row(&bytes[r * rb..(r + 1) * rb], out);
        }
        assert_eq!(got, want, "{}", s.tensor);
    }
}

#[test]
fn conversion_is_deterministic_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    convert_dir(&micro_hf(), &a, &ConvertOptions { threads: 1, ..opts(QuantType::Iq4Nl, QuantType::Q8_0) }).unwrap();
    convert_dir(&micro_hf(), &b, &ConvertOptions { threads: 2, ..opts(QuantType::Iq4Nl, QuantType::Q8_0) }).unwrap();
    assert_eq!(dir_contents(&a), dir_contents(&b));
}

#[test]
fn zstd_chunks_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("z");
    let plain = tmp.path().join("p");
    let o = opts(QuantType::Q8_0, QuantType::Bf16);
    convert_dir(&micro_hf(), &dst, &ConvertOptions { compression: Compression::Zstd, ..o.clone() }).unwrap();
    convert_dir(&micro_hf(), &plain, &o).unwrap();
    assert!(verify(&dst, &no_progress).unwrap().ok);
    let (z, p) = (ConvertedModel::open(&dst).unwrap(), ConvertedModel::open(&plain).unwrap());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for c in &p.manifest.experts {
        z.read_expert(c.layer, c.expert, &mut a).unwrap();
        p.read_expert(c.layer, c.expert, &mut b).unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn a_flipped_byte_anywhere_is_found_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    // Small shards so that several files exist.
    let o = ConvertOptions { shard_bytes: 64 << 10, ..opts(QuantType::Q8_0, QuantType::Bf16) };
    convert_dir(&micro_hf(), &good, &o).unwrap();
    let m = Manifest::load(&good.join(MANIFEST_FILE)).unwrap();
    assert!(m.shards.len() > 3);
    for (si, shard) in m.shards.iter().enumerate() {
        // A byte inside each dense tensor / tensor of each chunk of this shard.
        let mut targets: Vec<(u64, String)> = Vec::new();
        for d in m.dense.iter().filter(|d| d.shard == si) {
            targets.push((d.offset + d.bytes / 2, format!("tensor {}", d.name)));
        }
        for c in m.experts.iter().filter(|c| c.shard == si) {
            for t in &c.tensors {
                targets.push((
                    c.offset + t.offset + t.bytes / 3,
                    format!("expert chunk (layer {}, expert {}): sha256 mismatch in tensor(s) {}", c.layer, c.expert, t.proj.as_str()),
                ));
            }
        }
        for (off, expect) in &targets {
            let bad = tmp.path().join("bad");
            let _ = std::fs::remove_dir_all(&bad);
            copy_dir(&good, &bad);
            let p = bad.join(&shard.file);
            let mut bytes = std::fs::read(&p).unwrap();
            bytes[*off as usize] ^= 0x10;
            std::fs::write(&p, &bytes).unwrap();
            let r = verify(&bad, &no_progress).unwrap();
            assert!(!r.ok);
            let text: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
            assert!(text.iter().any(|t| t.contains(expect.as_str())), "{expect} not in {text:?}");
            assert!(r.problems.contains(&Problem::ShardChecksum { file: shard.file.clone() }));
            // And through the CLI: non-zero exit, the chunk named.
            let out = run(convert_bin().args(["verify"]).arg(&bad));
            assert!(!out.status.success());
            assert!(stdout(&out).contains(expect.as_str()), "{}", stdout(&out));
        }
    }
    // Truncated, missing and unexpected shards.
    let bad = tmp.path().join("bad2");
    copy_dir(&good, &bad);
    let f0 = bad.join(&m.shards[0].file);
    let len = std::fs::metadata(&f0).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f0).unwrap().set_len(len - 100).unwrap();
    std::fs::remove_file(bad.join(&m.shards[1].file)).unwrap();
    std::fs::write(bad.join("experts-99999.bin"), b"stray").unwrap();
    let r = verify(&bad, &no_progress).unwrap();
    assert!(r.problems.iter().any(|p| matches!(p, Problem::ShardSize { found, .. } if *found == len - 100)));
    assert!(r.problems.contains(&Problem::MissingShard { file: m.shards[1].file.clone() }));
    assert!(r.problems.contains(&Problem::UnexpectedFile { file: "experts-99999.bin".into() }));
    let out = run(convert_bin().args(["verify", "--json"]).arg(&bad));
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
}

/// `verify` on a copy of `good` changed by `edit`: the problems' texts, after asserting that the
/// report fails and that the CLI exits non-zero.
fn verify_edited(good: &Path, bad: &Path, edit: impl FnOnce(&Path)) -> Vec<String> {
    let _ = std::fs::remove_dir_all(bad);
    copy_dir(good, bad);
    edit(bad);
    let r = verify(bad, &no_progress).unwrap();
    assert!(!r.ok, "verify passed a damaged model");
    let out = run(convert_bin().args(["verify"]).arg(bad));
    assert!(!out.status.success(), "the CLI passed a damaged model: {}", stdout(&out));
    r.problems.iter().map(|p| p.to_string()).collect()
}

fn assert_named(text: &[String], expect: &str) {
    assert!(text.iter().any(|t| t.contains(expect)), "{expect:?} not in {text:?}");
}

/// Every kind of file a converted model holds, damaged: the tokenizer (a flipped byte, cut
/// short, missing), the manifest (not JSON, and each kind of field edited: hashes, offsets,
/// sizes, shapes, types), and zstd chunks (a flipped byte in every chunk, and a manifest that
/// records other tensor hashes for bytes that decompress fine). Each is found and named.
/// Plant: drop the tensor hashing of compressed chunks or the shape check from
/// `src/format/verify.rs` and the matching case fails.
#[test]
fn every_file_kind_damaged_is_found_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&micro_hf(), &src);
    std::fs::write(src.join("tokenizer.model"), (0..1000u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>()).unwrap();
    let good = tmp.path().join("good");
    let o = ConvertOptions { compression: Compression::Zstd, ..opts(QuantType::Q8_0, QuantType::Bf16) };
    convert_dir(&src, &good, &o).unwrap();
    assert!(verify(&good, &no_progress).unwrap().ok);
    let m = Manifest::load(&good.join(MANIFEST_FILE)).unwrap();
    assert!(m.tokenizer.is_some() && m.experts.iter().all(|c| c.compression == Compression::Zstd));
    let bad = tmp.path().join("bad");

    // The tokenizer.
    let tok = |edit: &dyn Fn(&Path)| verify_edited(&good, &bad, |d| edit(&d.join("tokenizer.model")));
    let t = tok(&|p| {
        let mut b = std::fs::read(p).unwrap();
        b[500] ^= 1;
        std::fs::write(p, b).unwrap();
    });
    assert_named(&t, "tokenizer.model: sha256 mismatch");
    let t = tok(&|p| std::fs::write(p, &std::fs::read(p).unwrap()[..999]).unwrap());
    assert_named(&t, "tokenizer.model: 999 bytes, the manifest says 1000");
    let t = tok(&|p| std::fs::remove_file(p).unwrap());
    assert_named(&t, "tokenizer.model: No such file");

    // Every compressed chunk, a byte flipped in the middle of its stored bytes.
    for c in &m.experts {
        let file = &m.shards[c.shard].file;
        let t = verify_edited(&good, &bad, |d| {
            let p = d.join(file);
            let mut b = std::fs::read(&p).unwrap();
            b[(c.offset + c.bytes / 2) as usize] ^= 0x10;
            std::fs::write(&p, b).unwrap();
        });
        assert_named(&t, &format!("{file}: expert chunk (layer {}, expert {}): sha256 mismatch", c.layer, c.expert));
        assert_named(&t, &format!("{file}: shard sha256 mismatch"));
    }

    // The manifest: not JSON at all, then each kind of field edited.
    let t = verify_edited(&good, &bad, |d| {
        let p = d.join(MANIFEST_FILE);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    });
    assert_named(&t, "manifest.json: not a valid manifest");
    let edit_manifest = |f: &dyn Fn(&mut serde_json::Value)| {
        verify_edited(&good, &bad, |d| {
            let p = d.join(MANIFEST_FILE);
            let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        })
    };
    let flip_hex = |v: &mut serde_json::Value| {
        let s = v.as_str().unwrap();
        let c = if s.starts_with('0') { '1' } else { '0' };
        *v = serde_json::Value::String(format!("{c}{}", &s[1..]));
    };
    let shard0 = &m.shards[0].file;
    assert_named(&edit_manifest(&|v| flip_hex(&mut v["shards"][0]["sha256"])), &format!("{shard0}: shard sha256 mismatch"));
    let t = edit_manifest(&|v| v["shards"][0]["bytes"] = (m.shards[0].bytes + 1).into());
    assert_named(&t, &format!("{shard0}: truncated"));
    let d0 = &m.dense[1];
    let dense_file = &m.shards[d0.shard].file;
    let t = edit_manifest(&|v| flip_hex(&mut v["dense"][1]["sha256"]));
    assert_named(&t, &format!("{dense_file}: tensor {}: sha256 mismatch", d0.name));
    let t = edit_manifest(&|v| v["dense"][1]["offset"] = (d0.offset + 64).into());
    assert_named(&t, &format!("tensor {}", d0.name));
    // A 2-D dense tensor with its dimensions swapped: same bytes, same hash, wrong shape.
    let (qi, q) = m.dense.iter().enumerate().find(|(_, d)| d.shape.len() == 2 && d.shape[0] != d.shape[1]).unwrap();
    let t = edit_manifest(&|v| v["dense"][qi]["shape"] = serde_json::json!([q.shape[1], q.shape[0]]));
    assert_named(&t, &format!("manifest.json: tensor {}: shape [{}, {}], the config gives {:?}", q.name, q.shape[1], q.shape[0], q.shape));
    let t = edit_manifest(&|v| v["dense"][qi]["qtype"] = "q8_0".into());
    assert_named(&t, &format!("manifest.json: tensor {}: {} bytes, but q8_0", q.name, q.bytes));
    let t = edit_manifest(&|v| v["dense"][qi]["name"] = "blk.0.attn_x".into());
    assert_named(&t, "manifest.json: tensor blk.0.attn_x: not a dense tensor of this config");
    assert_named(&t, &format!("manifest.json: tensor {}: missing", q.name));
    let c0 = &m.experts[0];
    let chunk0 = format!("expert chunk (layer {}, expert {})", c0.layer, c0.expert);
    let t = edit_manifest(&|v| flip_hex(&mut v["experts"][0]["sha256"]));
    assert_named(&t, &format!("{chunk0}: sha256 mismatch"));
    let t = edit_manifest(&|v| v["experts"][0]["offset"] = (c0.offset + 8).into());
    assert_named(&t, &chunk0);
    let t = edit_manifest(&|v| v["experts"][0]["raw_bytes"] = (c0.raw_bytes + 32).into());
    assert_named(&t, &format!("{chunk0}: decompresses to {} bytes, the manifest says {}", c0.raw_bytes, c0.raw_bytes + 32));
    // The stored bytes are intact; only what they decompress to disagrees with the manifest.
    let t = edit_manifest(&|v| flip_hex(&mut v["experts"][0]["tensors"][2]["sha256"]));
    assert_named(&t, &format!("{chunk0}: sha256 mismatch in tensor(s) down"));
    let t = edit_manifest(&|v| v["experts"][0]["tensors"][0]["shape"] = serde_json::json!([c0.tensors[0].shape[1], c0.tensors[0].shape[0]]));
    assert_named(&t, &format!("manifest.json: {chunk0}: tensor gate: shape"));
    let t = edit_manifest(&|v| v["experts"][0]["tensors"][1]["qtype"] = "q4_0".into());
    assert_named(&t, &format!("manifest.json: {chunk0}: tensor up: {} bytes, but q4_0", c0.tensors[1].bytes));
    let t = edit_manifest(&|v| v["experts"][0]["tensors"][1]["proj"] = "gate".into());
    assert_named(&t, &format!("manifest.json: {chunk0}: 2 gate tensors, expected one"));
    let t = edit_manifest(&|v| v["config"]["d_model"] = (m.config.d_model * 2).into());
    assert_named(&t, "manifest.json: tensor token_embd: shape");
    let t = edit_manifest(&|v| flip_hex(&mut v["tokenizer"]["sha256"]));
    assert_named(&t, "tokenizer.model: sha256 mismatch");
}

#[test]
fn killed_conversions_resume_to_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = micro_hf();
    let reference = tmp.path().join("reference");
    let args = |dst: &Path| {
        let mut c = convert_bin();
        c.arg("convert").arg(&src).arg(dst).args(["--experts", "q4", "--dense", "q8", "--shard-mib", "0", "--threads", "2"]);
        c
    };
    assert!(run(&mut args(&reference)).status.success());
    let want = dir_contents(&reference);
    let n_pieces = 20 + 48; // dense tensors + expert tensors, one piece each at this size
    for kill_at in [1, 7, 20, 21, 40, n_pieces - 1] {
        let dst = tmp.path().join(format!("k{kill_at}"));
        let out = run(args(&dst).env("GROK1_CRASH_AFTER_PIECES", kill_at.to_string()));
        assert!(!out.status.success(), "the crash hook at {kill_at} did not fire");
        assert!(!dst.join(MANIFEST_FILE).exists());
        // Without --resume the half-written destination is refused.
        let out = run(&mut args(&dst));
        assert!(!out.status.success());
        assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));
        // Resume may itself be killed again.
        let out = run(args(&dst).arg("--resume").env("GROK1_CRASH_AFTER_PIECES", "3"));
        assert!(!out.status.success());
        let out = run(args(&dst).arg("--resume"));
        assert!(out.status.success(), "{}", stderr(&out));
        if kill_at > 20 {
            assert!(stderr(&out).contains("reusing"), "finished shards should be reused: {}", stderr(&out));
        }
        assert_eq!(dir_contents(&dst), want, "resume after a kill at piece {kill_at}");
    }
    // A damaged finished shard is not reused: it is rewritten.
    let dst = tmp.path().join("damaged");
    assert!(!run(args(&dst).env("GROK1_CRASH_AFTER_PIECES", "30")).status.success());
    let shard = dst.join("dense-00000.bin");
    let mut b = std::fs::read(&shard).unwrap();
    b[10] ^= 1;
    std::fs::write(&shard, b).unwrap();
    let out = run(args(&dst).arg("--resume"));
    assert!(out.status.success());
    assert!(!stderr(&out).contains("reusing dense-00000.bin"));
    assert_eq!(dir_contents(&dst), want);
}

/// The CLI's `q4` is q4_s, with iq4_nl for the rows that are not whole 256-weight super-blocks:
/// on a synthetic model with d_model 256 and ffn 384, the expert gate and up rows (256 inputs)
/// and the attention projections are q4_s, the expert down rows (384 inputs) iq4_nl, and every
/// tensor's bytes are those of its type's quantizer.
#[test]
fn q4_is_q4_s_with_iq4_nl_for_other_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let mut preset = grok1::synth::Preset::by_name("micro").unwrap();
    let c = &mut preset.config;
    (c.d_model, c.ffn_size, c.n_layers, c.n_q_heads, c.n_kv_heads, c.head_dim) = (256, 384, 1, 4, 2, 64);
    c.embedding_multiplier = 16.0;
    c.attn_output_multiplier = 0.125;
    preset.init = grok1::synth::InitScales::for_d_model(256);
    let src = tmp.path().join("src");
    grok1::synth::write(&preset, &src, &grok1::synth::SynthOptions { seed: 5, ..Default::default() }, &|_| {}).unwrap();
    let dst = tmp.path().join("q4");
    let out = run(convert_bin().arg("convert").arg(&src).arg(&dst).args(["--experts", "q4", "--dense", "q4", "--threads", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(verify(&dst, &no_progress).unwrap().ok);
    let m = ConvertedModel::open(&dst).unwrap();
    assert_eq!((m.manifest.quant.experts, m.manifest.quant.dense), (QuantType::Q4S, QuantType::Q4S));
    let source = checkpoint::open(&src, None).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut buf = Vec::new();
    for s in source.tensors() {
        let (qtype, bytes): (QuantType, Vec<u8>) = match s.tensor {
            checkpoint::Tensor::Expert { layer, expert, proj } => {
                m.read_expert(layer, expert, &mut buf).unwrap();
                let t = m.expert_chunk(layer, expert).tensors.iter().find(|t| t.proj == proj.into()).unwrap();
                (t.qtype, buf[t.offset as usize..(t.offset + t.bytes) as usize].to_vec())
            }
            t => {
                let v = m.dense(&t.to_string()).unwrap();
                (v.qtype, v.bytes.to_vec())
            }
        };
        if qtype == QuantType::F32 {
            continue;
        }
        assert_eq!(qtype, QuantType::int4_for(s.cols()), "{}", s.tensor);
        seen.insert(qtype.name());
        let mut w = vec![0f32; s.rows() * s.cols()];
        source.read_rows(s.tensor, 0, &mut w).unwrap();
        let rb = qtype.row_bytes(s.cols()).unwrap();
        let mut want = vec![0u8; s.rows() * rb];
        for (row, o) in w.chunks_exact(s.cols()).zip(want.chunks_exact_mut(rb)) {
            qtype.quantize_row(row, o);
        }
        assert!(bytes == want, "{}: bytes differ from {qtype}'s quantizer", s.tensor);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["iq4_nl", "q4_s"]);
}

/// q4_s on the micro fixtures, whose expert rows are 64 and 128 wide (no whole 256-weight
/// super-block): every expert tensor falls back to iq4_nl, the manifest still records q4_s as
/// what was asked for, the expert bytes are exactly an iq4_nl conversion's, and the converted
/// model runs to the same logits as that conversion, bit for bit, and is no measurably worse
/// than q4_0 (ggml's quantizer) against the golden logits, the bound of `tests/model.rs`.
/// Plant: have `QuantType::int4_for` keep q4_s for short rows, or fall back to q4_0, and the
/// type and byte checks fail.
#[test]
fn q4_s_on_micro_falls_back_to_iq4_nl_and_runs_to_the_golden_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut kl: std::collections::HashMap<QuantType, Vec<f64>> = std::collections::HashMap::new();
    for f in [common::micro_hf(), common::micro_hpcai()] {
        let toks = f.tokens();
        let golden = f.golden();
        let mut logits = std::collections::HashMap::new();
        let mut models = std::collections::HashMap::new();
        for e in [QuantType::Q4S, QuantType::Iq4Nl, QuantType::Q4_0] {
            let dst = tmp.path().join(format!("{}-{e}", f.name.replace('/', "-")));
            convert_dir(&f.dir, &dst, &opts(e, QuantType::Q8_0)).unwrap();
            assert!(verify(&dst, &no_progress).unwrap().ok, "{} {e}", f.name);
            let m = ConvertedModel::open(&dst).unwrap();
            assert_eq!(m.manifest.quant.experts, e, "{}: the manifest records the type asked for", f.name);
            let w = grok1::model::load::load_weights(&m, &mut |_| {}).unwrap();
            let model = grok1::model::Model::new(m.config().clone(), w).unwrap();
            let mut cache = grok1::model::KvCache::new(m.config(), toks.all.len());
            logits.insert(e, model.prefill(&toks.all, &mut cache, true).unwrap());
            models.insert(e, m);
        }
        let (q4_s, iq4_nl) = (&models[&QuantType::Q4S], &models[&QuantType::Iq4Nl]);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for c in &q4_s.manifest.experts {
            for t in &c.tensors {
                assert!(t.shape[1] % 256 != 0, "{}: micro's rows were expected to be short", f.name);
                assert_eq!(t.qtype, QuantType::Iq4Nl, "{}: layer {} expert {} {:?}", f.name, c.layer, c.expert, t.proj);
            }
            q4_s.read_expert(c.layer, c.expert, &mut a).unwrap();
            iq4_nl.read_expert(c.layer, c.expert, &mut b).unwrap();
            assert!(a == b, "{}: layer {} expert {}: q4_s's fallback bytes are not iq4_nl's", f.name, c.layer, c.expert);
        }
        assert!(logits[&QuantType::Q4S] == logits[&QuantType::Iq4Nl], "{}: logits differ from iq4_nl's", f.name);
        for e in [QuantType::Q4S, QuantType::Q4_0] {
            kl.entry(e).or_insert_with(Vec::new).extend(common::kl_per_position(&golden, &logits[&e]));
        }
    }
    // Against golden: no measurably worse than q4_0 (ggml's quantizer), the bound of
    // `tests/model.rs`, on both fixtures' positions.
    let (excess, two_se) = common::paired_excess(&kl[&QuantType::Q4S], &kl[&QuantType::Q4_0], 1.0);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "micro: q4_s mean KL {:.3e}, q4_0 {:.3e} over {} positions; excess {excess:+.2e}, 2 standard errors {two_se:.2e}",
        mean(&kl[&QuantType::Q4S]),
        mean(&kl[&QuantType::Q4_0]),
        kl[&QuantType::Q4S].len()
    );
    assert!(excess <= two_se, "q4_s on micro is measurably worse than q4_0");
}

/// Convert `src` with the CLI and return stderr, asserting failure and no manifest.
fn expect_failure(src: &Path, dst: &Path, extra: &[&str]) -> String {
    let out = run(convert_bin().arg("convert").arg(src).arg(dst).args(extra));
    assert!(!out.status.success(), "conversion of {} should fail", src.display());
    assert!(!dst.join(MANIFEST_FILE).exists(), "a failed conversion left a manifest");
    if dst.is_dir() {
        for e in std::fs::read_dir(dst).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.ends_with(".tmp"), "a failed conversion left {n}");
        }
    }
    stderr(&out)
}

/// A copy of micro/hf with its tensors edited by `edit`.
fn edited(tmp: &Path, name: &str, edit: impl FnOnce(&mut Tensors)) -> std::path::PathBuf {
    let dir = tmp.join(name);
    copy_dir(&micro_hf(), &dir);
    let p = dir.join("model.safetensors");
    let mut t = read_safetensors(&p);
    edit(&mut t);
    write_safetensors(&p, &t);
    dir
}

#[test]
fn each_bad_input_gets_its_own_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dst = |n: &str| t.join(format!("out-{n}"));

    // Config: missing, malformed, unknown architecture.
    let d = t.join("noconfig");
    copy_dir(&micro_hf(), &d);
    std::fs::remove_file(d.join("config.json")).unwrap();
    let e = expect_failure(&d, &dst("noconfig"), &[]);
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");

    let d = t.join("badconfig");
    copy_dir(&micro_hf(), &d);
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = expect_failure(&d, &dst("badconfig"), &[]);
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");

    let d = t.join("arch");
    copy_dir(&micro_hf(), &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap().replace("GrokForCausalLM", "LlamaForCausalLM");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = expect_failure(&d, &dst("arch"), &[]);
    assert!(e.contains("unknown architecture"), "{e}");

    // Tensors: missing, extra, misshapen, unsupported dtype, non-finite.
    let d = edited(t, "missing", |ts| {
        ts.remove("transformer.decoder_layer.1.moe.3.linear_v.weight");
    });
    let e = expect_failure(&d, &dst("missing"), &[]);
    assert!(e.contains("missing") && e.contains("blk.1.expert.3.up"), "{e}");

    let d = edited(t, "extra", |ts| {
        let v = ts["transformer.decoder_layer.0.router.weight"].clone();
        ts.insert("transformer.decoder_layer.0.moe.9.linear.weight".into(), v.clone());
        ts.insert("transformer.decoder_layer.0.mystery.weight".into(), v);
    });
    let e = expect_failure(&d, &dst("extra"), &[]);
    assert!(e.contains("mystery") || e.contains("moe.9"), "{e}");

    let d = edited(t, "shape", |ts| {
        let (dt, _, b) = ts["transformer.decoder_layer.0.multi_head_attention.key.weight"].clone();
        ts.insert("transformer.decoder_layer.0.multi_head_attention.key.weight".into(), (dt, vec![64, 32], b));
    });
    let e = expect_failure(&d, &dst("shape"), &[]);
    assert!(e.contains("blk.0.attn_k") && e.contains("[64, 32]") && e.contains("[32, 64]"), "{e}");

    let d = edited(t, "dtype", |ts| {
        let (_, s, b) = ts["transformer.rms_norm.weight"].clone();
        ts.insert("transformer.rms_norm.weight".into(), (Dtype::I16, s, b));
    });
    let e = expect_failure(&d, &dst("dtype"), &[]);
    assert!(e.contains("transformer.rms_norm.weight") && e.contains("I16"), "{e}");

    let d = edited(t, "nan", |ts| {
        let e = ts.get_mut("transformer.decoder_layer.1.moe.2.linear_1.weight").unwrap();
        e.2[2 * (128 + 77)..2 * (128 + 77) + 2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    });
    let e = expect_failure(&d, &dst("nan"), &[]);
    assert!(e.contains("blk.1.expert.2.down") && e.contains("non-finite") && e.contains("row 1"), "{e}");

    // Truncated data and a corrupt header.
    let d = t.join("trunc");
    copy_dir(&micro_hf(), &d);
    let p = d.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 1000).unwrap();
    let e = expect_failure(&d, &dst("trunc"), &[]);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");

    let d = t.join("header");
    copy_dir(&micro_hf(), &d);
    let p = d.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b[8] = b'x';
    std::fs::write(&p, b).unwrap();
    let e = expect_failure(&d, &dst("header"), &[]);
    assert!(e.contains("model.safetensors") && e.contains("corrupt"), "{e}");

    // A sharded index that names a missing shard.
    if let Some(tiny) = shared_fixture("tiny/hf") {
        let d = t.join("shards");
        copy_dir(&tiny, &d);
        std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
        let e = expect_failure(&d, &dst("shards"), &[]);
        assert!(e.contains("model-00002-of-00003.safetensors") && e.contains("missing"), "{e}");
    }

    // Destination: not empty, unwritable.
    let full = t.join("nonempty");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("something"), b"x").unwrap();
    let e = expect_failure(&micro_hf(), &full, &[]);
    assert!(e.contains("not empty"), "{e}");

    // Tests run as root, for whom a read-only directory is writable; what fails for anyone is a
    // destination under a regular file (no directory can be made there) or a destination that
    // is itself a regular file. Either error names the path, and the file is left as it was.
    // (Plant: `.at("destination")` for `.at(dst)` on prepare_destination's create_dir_all in
    // src/convert.rs; the first assertion fails.)
    let file_as_parent = t.join("plainfile");
    std::fs::write(&file_as_parent, b"x").unwrap();
    let under = file_as_parent.join("out");
    let e = expect_failure(&micro_hf(), &under, &[]);
    assert!(e.contains(&under.display().to_string()), "the error does not name {}: {e}", under.display());
    assert_eq!(std::fs::read(&file_as_parent).unwrap(), b"x");
    let e = expect_failure(&micro_hf(), &file_as_parent, &[]);
    assert!(e.contains(&file_as_parent.display().to_string()), "the error does not name {}: {e}", file_as_parent.display());
    assert_eq!(std::fs::read(&file_as_parent).unwrap(), b"x", "a failed conversion changed the file");
    let left: Vec<_> = std::fs::read_dir(&t).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().starts_with("plainfile") && n != "plainfile"), "left {left:?}");
}

#[test]
fn a_full_disk_is_a_clean_error() {
    // A 256 KiB tmpfs: the model does not fit. Needs mount privileges; skip without them.
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let dst = mnt.join("out");
    let e = expect_failure(&micro_hf(), &dst, &["--experts", "bf16"]);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert!(e.contains("disk full") || e.contains("No space left"), "{e}");
}
