//! Synthetic checkpoints: they open as real ones, are byte-deterministic on any thread count,
//! hold weights with the intended statistics, and make a model whose activations, attention and
//! routing behave like a model's.

#[path = "synth/forward.rs"]
mod forward;

use grok1::checkpoint::{self, Naming, Proj, Tensor, TensorSource};
use grok1::synth::{self, Preset, SynthDtype, SynthOptions};
use grok1::{Error, GrokConfig};
use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

fn preset(name: &str) -> Preset {
    Preset::by_name(name).unwrap()
}

fn write(p: &Preset, dir: &Path, opts: &SynthOptions) -> synth::SynthSummary {
    synth::write(p, dir, opts, &|_| {}).unwrap()
}

/// sha256 of every file in `dir`, by name.
fn hashes(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), hex::encode(Sha256::digest(&bytes)))
        })
        .collect()
}

/// Equal, floats to the last bit or one: serde_json's default parser is not correctly rounded.
fn assert_same_config(a: &GrokConfig, b: &GrokConfig) {
    let floats = |c: &GrokConfig| {
        [c.rms_norm_eps, c.rope_theta, c.attn_output_multiplier, c.embedding_multiplier]
            .into_iter()
            .chain([c.output_multiplier, c.attn_logit_cap])
            .collect::<Vec<f64>>()
    };
    for (x, y) in floats(a).into_iter().zip(floats(b)) {
        assert!((x - y).abs() <= 2.0 * f64::EPSILON * y.abs(), "{x} vs {y}");
    }
    let ints = |c: &GrokConfig| GrokConfig {
        rms_norm_eps: 0.0,
        rope_theta: 0.0,
        attn_output_multiplier: 0.0,
        embedding_multiplier: 0.0,
        output_multiplier: 0.0,
        attn_logit_cap: 0.0,
        ..c.clone()
    };
    assert_eq!(ints(a), ints(b));
}

fn rows(src: &dyn TensorSource, t: Tensor) -> Vec<f32> {
    let n: usize = src.tensor(t).unwrap().shape.iter().product();
    let mut v = vec![0f32; n];
    src.read_rows(t, 0, &mut v).unwrap();
    v
}

#[test]
fn tiny_opens_in_both_namings_single_file_and_sharded() {
    let p = preset("tiny");
    let mut reference: Option<Vec<f32>> = None;
    for naming in [Naming::Keyfan, Naming::Hpcai] {
        for shard_bytes in [2u64 << 30, 4 << 20] {
            let dir = tempfile::tempdir().unwrap();
            let opts = SynthOptions { seed: 7, naming, shard_bytes, ..Default::default() };
            let s = write(&p, dir.path(), &opts);
            let src = checkpoint::open(dir.path(), None).unwrap();
            assert_same_config(src.config(), &p.config);
            assert!(src.describe().contains(&format!("{naming:?}")), "{}", src.describe());
            assert_eq!(src.tensors().len(), Tensor::all(&p.config).len());
            assert!(src.tensors().iter().all(|t| t.dtype == "bf16"));
            assert_eq!(src.input_bytes(), 2 * p.params());
            assert_eq!(s.data_bytes, 2 * p.params());
            if shard_bytes < s.data_bytes {
                assert!(s.files.len() >= 13, "{:?}", s.files);
                assert!(dir.path().join("model.safetensors.index.json").is_file());
                for f in &s.files {
                    let len = std::fs::metadata(dir.path().join(f)).unwrap().len();
                    assert!(len <= shard_bytes + 64 * 1024, "{f}: {len} bytes");
                }
            } else {
                assert_eq!(s.files, ["model.safetensors"]);
                assert!(!dir.path().join("model.safetensors.index.json").exists());
            }
            // The stream is keyed by canonical name: namings and shardings hold the same weights.
            let w = rows(&*src, Tensor::Expert { layer: 3, expert: 5, proj: Proj::Down });
            match &reference {
                None => reference = Some(w),
                Some(r) => assert!(r == &w, "{naming:?}, shard {shard_bytes}: weights differ"),
            }
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert!(left.is_empty(), "temporary files left: {left:?}");
        }
    }
}

#[test]
fn index_and_headers_describe_the_files() {
    let p = preset("micro");
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions { shard_bytes: 200_000, write_lm_head: true, ..Default::default() };
    let s = write(&p, dir.path(), &opts);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let lm_head_bytes = 2 * 256 * 64;
    assert_eq!(index["metadata"]["total_size"], 2 * p.params() + lm_head_bytes);
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), Tensor::all(&p.config).len() + 1);
    assert_eq!(map["lm_head.weight"], *s.files.last().unwrap());
    let mut on_disk = 0;
    for f in &s.files {
        let bytes = std::fs::read(dir.path().join(f)).unwrap();
        on_disk += bytes.len() as u64;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        for (name, _) in meta.tensors() {
            assert_eq!(map[&name], *f, "{name}");
        }
    }
    assert_eq!(on_disk, s.file_bytes);
    // The tied head is a copy of the embedding and readers skip it.
    let src = checkpoint::open(dir.path(), None).unwrap();
    let bytes = std::fs::read(dir.path().join(s.files.last().unwrap())).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let head: Vec<f32> = st
        .tensor("lm_head.weight")
        .unwrap()
        .data()
        .chunks_exact(2)
        .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
        .collect();
    assert!(head == rows(&*src, Tensor::Embedding));
}

#[test]
fn same_seed_same_bytes_on_any_thread_count() {
    let p = preset("tiny");
    let opts = SynthOptions { seed: 42, shard_bytes: 16 << 20, ..Default::default() };
    let run = |threads: usize| {
        let dir = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| write(&p, dir.path(), &opts));
        (hashes(dir.path()), dir)
    };
    let (one, _d1) = run(1);
    let (two, _d2) = run(2);
    let (three, _d3) = run(3);
    assert!(one.len() >= 6, "{one:?}");
    assert_eq!(one, two);
    assert_eq!(one, three);

    let dir = tempfile::tempdir().unwrap();
    write(&p, dir.path(), &SynthOptions { seed: 43, ..opts.clone() });
    let other = hashes(dir.path());
    for (name, h) in &one {
        if name.ends_with(".safetensors") {
            assert_ne!(Some(h), other.get(name), "{name} unchanged by the seed");
        }
    }
}

#[test]
fn f32_checkpoint_rounds_to_the_bf16_one() {
    let p = preset("micro");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(&p, a.path(), &SynthOptions { seed: 3, ..Default::default() });
    write(&p, b.path(), &SynthOptions { seed: 3, dtype: SynthDtype::F32, ..Default::default() });
    let (bf, f) = (checkpoint::open(a.path(), None).unwrap(), checkpoint::open(b.path(), None).unwrap());
    assert!(f.tensors().iter().all(|t| t.dtype == "f32"));
    let mut inexact = 0;
    for t in Tensor::all(&p.config) {
        let (x, y) = (rows(&*bf, t), rows(&*f, t));
        for (u, v) in x.iter().zip(&y) {
            assert_eq!(u.to_bits(), half::bf16::from_f32(*v).to_f32().to_bits(), "{t}");
            inexact += (u != v) as usize;
        }
    }
    assert!(inexact > 100_000, "the f32 file should hold more precision than bf16: {inexact}");
}

/// Mean, standard deviation, kurtosis and largest |x| / std.
fn moments(x: &[f32]) -> (f64, f64, f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|v| *v as f64).sum::<f64>() / n;
    let var = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
    let m4 = x.iter().map(|v| (*v as f64 - mean).powi(4)).sum::<f64>() / n;
    let max = x.iter().map(|v| (*v as f64 - mean).abs()).fold(0.0, f64::max);
    (mean, var.sqrt(), m4 / (var * var), max / var.sqrt())
}

#[test]
fn weight_statistics_match_the_preset() {
    let p = preset("tiny");
    let dir = tempfile::tempdir().unwrap();
    write(&p, dir.path(), &SynthOptions { seed: 11, ..Default::default() });
    let src = checkpoint::open(dir.path(), None).unwrap();
    let c = &p.config;
    let fan = |n: usize| 1.0 / (n as f64).sqrt();
    let cases = [
        (Tensor::Expert { layer: 1, expert: 2, proj: Proj::Gate }, 0.0, fan(c.d_model), true),
        (Tensor::Expert { layer: 2, expert: 7, proj: Proj::Down }, 0.0, fan(c.ffn_size), true),
        (Tensor::AttnQ(0), 0.0, p.init.qk_gain * fan(c.d_model), true),
        (Tensor::AttnO(3), 0.0, fan(c.q_dim()), true),
        (Tensor::Embedding, 0.0, p.init.embed_std, true),
        (Tensor::Router(1), 0.0, p.init.router_gain * fan(c.d_model), false),
        (Tensor::FfnNorm(2), 1.0, p.init.norm_std, false),
    ];
    for (t, want_mean, want_std, heavy) in cases {
        let x = rows(&*src, t);
        let n = x.len() as f64;
        let (mean, std, kurt, max) = moments(&x);
        // Sampling error of the mean is std/sqrt(n); of the std about std * sqrt((kurt-1)/4n).
        let mean_tol = 5.0 * want_std / n.sqrt();
        let std_tol = 5.0 * want_std * ((kurt - 1.0) / (4.0 * n)).sqrt() + 0.004 * want_std;
        assert!(
            (mean - want_mean).abs() < mean_tol,
            "{t}: mean {mean}, want {want_mean} +- {mean_tol}"
        );
        assert!((std - want_std).abs() < std_tol, "{t}: std {std}, want {want_std} +- {std_tol}");
        if heavy && n > 100_000.0 {
            // Table kurtosis ~6 (3 for a normal); outliers beyond 8 sigma exist.
            assert!(kurt > 4.5 && kurt < 8.0, "{t}: kurtosis {kurt}");
            assert!(max > 8.0, "{t}: largest weight only {max} sigma");
        } else if !heavy && n > 1000.0 {
            assert!((kurt - 3.0).abs() < 0.5, "{t}: kurtosis {kurt}");
        }
    }
}

#[test]
fn random_model_behaves_like_a_model() {
    let p = preset("tiny");
    let dir = tempfile::tempdir().unwrap();
    write(&p, dir.path(), &SynthOptions { seed: 1, ..Default::default() });
    let src = checkpoint::open(dir.path(), None).unwrap();
    let mut state = 12345u64;
    let tokens: Vec<u32> = (0..64)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            3 + ((state >> 33) % (p.config.vocab_size as u64 - 3)) as u32
        })
        .collect();
    let s = forward::run(&*src, &tokens);
    eprintln!("residual rms per layer {:?}", s.residual_rms);
    eprintln!(
        "attention logit std {:.3}, entropy/ln(keys) {:.3}",
        s.attn_logit_std, s.attn_entropy_ratio
    );
    for (l, share) in s.expert_share.iter().enumerate() {
        eprintln!(
            "layer {l} expert shares {:?}",
            share.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>()
        );
    }
    eprintln!(
        "top-1 router prob {:.3}, logit std {:.3}, distinct argmax {}, echoes input {:.2}",
        s.top1_prob, s.logit_std, s.distinct_argmax, s.copy_rate
    );

    for (l, r) in s.residual_rms.iter().enumerate() {
        assert!(*r > 0.3 && *r < 10.0, "layer {l}: residual rms {r}");
    }
    assert!(
        s.attn_logit_std > 1.0 && s.attn_logit_std < 10.0,
        "attention logit std {}",
        s.attn_logit_std
    );
    assert!(
        s.attn_entropy_ratio > 0.3 && s.attn_entropy_ratio < 0.95,
        "entropy {}",
        s.attn_entropy_ratio
    );
    let e = p.config.n_experts as f64;
    for (l, share) in s.expert_share.iter().enumerate() {
        let max = share.iter().cloned().fold(0.0, f64::max);
        let used = share.iter().filter(|x| **x > 0.0).count();
        assert!(max < 3.0 / e && used == p.config.n_experts, "layer {l}: shares {share:?}");
    }
    assert!(s.top1_prob > 1.5 / e && s.top1_prob < 0.8, "top-1 prob {}", s.top1_prob);
    assert!(s.logit_std > 0.05, "logit std {}", s.logit_std);
    assert!(s.distinct_argmax > tokens.len() / 4, "argmax tokens {}", s.distinct_argmax);
    assert!(s.copy_rate < 0.5, "the model echoes its input at {} of positions", s.copy_rate);
}

#[test]
fn progress_counts_up_to_the_data_size() {
    let p = preset("tiny");
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions { shard_bytes: 8 << 20, ..Default::default() };
    let total = synth::plan(&p, &opts).unwrap().data_bytes();
    let last = Cell::new(0u64);
    let calls = Cell::new(0usize);
    let s = synth::write(&p, dir.path(), &opts, &|n| {
        assert!(n > last.get(), "progress went from {} to {n}", last.get());
        last.set(n);
        calls.set(calls.get() + 1);
    })
    .unwrap();
    assert_eq!(last.get(), total);
    assert_eq!(s.data_bytes, total);
    assert!(calls.get() >= 10, "{} progress calls", calls.get());
}

#[test]
fn tokenizer_is_written_when_given() {
    let p = preset("micro");
    let dir = tempfile::tempdir().unwrap();
    let tok = b"not really a sentencepiece model".to_vec();
    write(
        &p,
        dir.path(),
        &SynthOptions { tokenizer_model: Some(tok.clone()), ..Default::default() },
    );
    assert_eq!(std::fs::read(dir.path().join("tokenizer.model")).unwrap(), tok);
    let src = checkpoint::open(dir.path(), None).unwrap();
    assert_eq!(src.tokenizer_path(), Some(dir.path().join("tokenizer.model")));
}

#[test]
fn unwritable_destination_is_a_typed_error_naming_the_path() {
    let p = preset("micro");
    let dir = tempfile::tempdir().unwrap();
    // A regular file where a directory should be: fails for every user, root included.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("model");
    match synth::write(&p, &out, &SynthOptions::default(), &|_| {}) {
        Err(Error::Io { path, .. }) => assert_eq!(path, out),
        other => panic!("expected an I/O error naming {}, got {other:?}", out.display()),
    }
}

#[test]
fn refuses_to_mix_with_another_checkpoint() {
    let p = preset("micro");
    let dir = tempfile::tempdir().unwrap();
    write(&p, dir.path(), &SynthOptions { shard_bytes: 200_000, ..Default::default() });
    // Rewriting the same layout is fine; a single file beside the old shards is not.
    write(&p, dir.path(), &SynthOptions { shard_bytes: 200_000, seed: 1, ..Default::default() });
    let e = synth::write(&p, dir.path(), &SynthOptions::default(), &|_| {}).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::BadFile { .. }) && msg.contains("-of-00005.safetensors"), "{msg}");
    assert!(!dir.path().join("model.safetensors").exists());
}

/// `cargo test --release --test synth -- --ignored --nocapture`: writes the 7.1 GB bench preset
/// into the temp directory, reports the rate, and deletes it.
#[test]
#[ignore]
fn bench_preset_write_throughput() {
    let p = preset("bench");
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions::default();
    let cpu0 = cpu_seconds();
    let start = std::time::Instant::now();
    let last = Cell::new(start);
    let s = synth::write(&p, dir.path(), &opts, &|_| last.set(std::time::Instant::now())).unwrap();
    let total = start.elapsed().as_secs_f64();
    let data = (last.get() - start).as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    eprintln!(
        "bench preset: {} files, {} bytes of data ({} in files) in {total:.2} s = {:.2} GB/s \
         including fsync and rename; last byte handed to the OS after {data:.2} s; {} threads",
        s.files.len(),
        s.data_bytes,
        s.file_bytes,
        s.data_bytes as f64 / total / 1e9,
        rayon::current_num_threads()
    );
    // The machine may be shared: CPU time tells what two free cores would do.
    eprintln!(
        "CPU time {cpu:.2} s (user + system, all threads): {:.2} GB per CPU-second",
        s.data_bytes as f64 / cpu / 1e9
    );
    assert_eq!(s.data_bytes, 7_147_491_328);
    let src = checkpoint::open(dir.path(), None).unwrap();
    assert_eq!(src.input_bytes(), 7_147_491_328);
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}
