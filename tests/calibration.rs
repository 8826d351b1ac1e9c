//! Calibration and per-expert precision to a size target: the calibration file and llama.cpp's
//! imatrix files, the MoE observer, and `--target-size` end to end on a synthetic model with
//! skewed routing (lands within 1% under the target; lower KL than a random assignment of the
//! same types; runs from RAM and under a RAM budget alike).

mod common;

use common::compare;
use grok1::calib::{file, imatrix, Calibration, Origin, Recorder};
use grok1::checkpoint::{Proj, SafetensorsSource, TensorSource};
use grok1::convert::{convert, ConvertOptions};
use grok1::format::ConvertedModel;
use grok1::model::{KvCache, Model, Weights};
use grok1::npy::NpyArray;
use grok1::quant::QuantType;
use grok1::synth::{Preset, SynthOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn micro() -> Preset {
    Preset::by_name("micro").unwrap()
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            3 + ((x >> 33) % (vocab as u64 - 3)) as u32
        })
        .collect()
}

/// A calibration with distinct values everywhere.
fn sample_calibration() -> Calibration {
    let mut cal = Calibration::empty(&micro().config, Origin::Recorded);
    cal.tokens = 100;
    cal.dataset = "text.txt".into();
    for (i, s) in cal.experts.iter_mut().enumerate() {
        s.routed = i as u64 + 1;
        s.prob_sum = 0.5 * i as f64;
        s.input_rows = i as u64 + 1;
        s.hidden_rows = i as u64 + 1;
        for (j, x) in s.input_sq.iter_mut().chain(s.hidden_sq.iter_mut()).enumerate() {
            *x = (i * 1000 + j) as f32 * 0.25;
        }
    }
    cal
}

#[test]
fn calibration_file_round_trips_and_every_damage_is_named() {
    let cal = sample_calibration();
    let bytes = file::encode(&cal);
    let p = Path::new("calib.bin");
    assert_eq!(file::decode(&bytes, p).unwrap(), cal);
    // Size as formats/calibration.md gives it: 76 header bytes + name + records + 32.
    let c = &micro().config;
    assert_eq!(bytes.len(), 76 + 8 + c.n_layers * c.n_experts * (32 + 4 * (c.d_model + c.ffn_size)) + 32);

    let err = |b: &[u8]| file::decode(b, p).unwrap_err().to_string();
    let mut flipped = bytes.clone();
    flipped[200] ^= 1;
    assert!(err(&flipped).contains("checksum"), "{}", err(&flipped));
    assert!(err(&bytes[..bytes.len() - 1]).contains("checksum"));
    assert!(err(&bytes[..50]).contains("truncated"));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(err(&v2).contains("version 2"), "{}", err(&v2));
    assert!(err(b"NOTACALIBRATION").contains("magic"));
    for e in [err(&flipped), err(&v2)] {
        assert!(e.contains("calib.bin"), "the error names the file: {e}");
    }

    // A calibration for other shapes or another config is refused by name.
    let mut other = micro().config.clone();
    other.ffn_size *= 2;
    assert!(cal.check_fits(&other, p).unwrap_err().to_string().contains("ffn"));
    let mut eps = micro().config.clone();
    eps.rms_norm_eps = 1e-6;
    assert!(cal.check_fits(&eps, p).unwrap_err().to_string().contains("config sha256"));
}

/// A legacy llama.cpp imatrix in the exact layout `llama-imatrix --output-format dat` writes.
fn imatrix_bytes(entries: &[(&str, i32, Vec<f32>)], trailer: Option<(i32, &str)>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(entries.len() as i32).to_le_bytes());
    for (name, ncall, values) in entries {
        b.extend_from_slice(&(name.len() as i32).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&ncall.to_le_bytes());
        b.extend_from_slice(&(values.len() as i32).to_le_bytes());
        for v in values {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    if let Some((chunks, dataset)) = trailer {
        b.extend_from_slice(&chunks.to_le_bytes());
        b.extend_from_slice(&(dataset.len() as i32).to_le_bytes());
        b.extend_from_slice(dataset.as_bytes());
    }
    b
}

#[test]
fn llama_cpp_imatrix_entries_map_onto_our_experts() {
    let c = micro().config;
    let (d, f, n) = (c.d_model, c.ffn_size, c.n_experts);
    // Stored values are the mean times ncall: mean of column j of expert e = e * 100 + j.
    let ncall = 4;
    let stacked = |cols: usize| -> Vec<f32> {
        (0..n * cols).map(|i| ((i / cols) * 100 + i % cols) as f32 * ncall as f32).collect()
    };
    let bytes = imatrix_bytes(
        &[
            ("blk.0.attn_q.weight", ncall, vec![1.0; d]),
            ("blk.0.ffn_down_exps.weight", ncall, stacked(f)),
            ("blk.0.ffn_gate_exps.weight", ncall, stacked(d)),
            ("blk.0.ffn_up_exps.weight", ncall, stacked(d)),
            // The older one-entry-per-expert names.
            ("blk.1.ffn_gate.3.weight", 2, (0..d).map(|j| 2.0 * j as f32).collect()),
        ],
        Some((7, "calibration_data.txt")),
    );
    let p = Path::new("grok.imatrix");
    let cal = imatrix::decode(&bytes, p, &c).unwrap();
    assert_eq!(cal.origin, Origin::Imatrix);
    assert!(!cal.has_routing());
    assert_eq!(cal.dataset, "calibration_data.txt (7 chunks)");
    for e in 0..n {
        let gate = cal.importance(0, e, Proj::Gate).unwrap();
        let down = cal.importance(0, e, Proj::Down).unwrap();
        assert_eq!(gate[5], (e * 100 + 5) as f32);
        assert_eq!(down[f - 1], (e * 100 + f - 1) as f32);
        assert_eq!(cal.importance(0, e, Proj::Up).unwrap(), gate);
    }
    assert_eq!(cal.importance(1, 3, Proj::Gate).unwrap()[9], 9.0);
    assert!(cal.importance(1, 2, Proj::Gate).is_none(), "no data: weighed evenly");
    // Routing unknown: uniform frequencies.
    assert!(cal.routing_frequencies().iter().all(|&x| x == 1.0 / n as f64));
    // Without the trailer (the oldest files) it reads too.
    let bare = imatrix_bytes(&[("blk.0.ffn_down_exps.weight", 1, stacked(f))], None);
    assert!(imatrix::decode(&bare, p, &c).is_ok());

    let err = |b: &[u8]| imatrix::decode(b, p, &c).unwrap_err().to_string();
    let short = imatrix_bytes(&[("blk.0.ffn_gate_exps.weight", 1, vec![1.0; d])], None);
    let e = err(&short);
    assert!(e.contains("blk.0.ffn_gate_exps.weight") && e.contains(&format!("expected {}", n * d)), "{e}");
    let e = err(&imatrix_bytes(&[("blk.9.ffn_gate_exps.weight", 1, stacked(d))], None));
    assert!(e.contains("layer 9"), "{e}");
    let e = err(&imatrix_bytes(&[("blk.0.attn_k.weight", 1, vec![1.0; d])], None));
    assert!(e.contains("no expert entries"), "{e}");
    assert!(err(b"GGUF\x03\0\0\0").contains("GGUF"));
    assert!(err(&bytes[..bytes.len() - 30]).contains("truncated"));
    assert!(err(&short).contains("grok.imatrix"), "the error names the file");

    // `calib::load` tells the two formats apart by their first bytes.
    let tmp = tempfile::tempdir().unwrap();
    let ip = tmp.path().join("x.dat");
    std::fs::write(&ip, &bytes).unwrap();
    assert_eq!(grok1::calib::load(&ip, &c).unwrap().origin, Origin::Imatrix);
    let op = tmp.path().join("x.bin");
    file::save(&sample_calibration(), &op).unwrap();
    assert_eq!(grok1::calib::load(&op, &c).unwrap().origin, Origin::Recorded);
}

#[test]
fn the_observer_records_routing_and_columns_without_changing_the_logits() {
    let p = micro();
    let tmp = tempfile::tempdir().unwrap();
    grok1::synth::write(&p, tmp.path(), &SynthOptions::default(), &|_| {}).unwrap();
    let src = SafetensorsSource::open(tmp.path()).unwrap();
    let c = src.config().clone();
    let m = Model::new(c.clone(), Weights::from_source(&src, QuantType::Bf16, QuantType::Bf16).unwrap()).unwrap();
    let toks = tokens(40, c.vocab_size, 9);
    let plain = m.prefill(&toks, &mut KvCache::new(&c, toks.len()), false).unwrap();
    let rec = Arc::new(Recorder::new(&c));
    let seen = m.prefill_observed(&toks, &mut KvCache::new(&c, toks.len()), rec.clone()).unwrap();
    assert_eq!(plain, seen);
    let cal = rec.finish(toks.len() as u64, "t");
    for l in 0..c.n_layers {
        let layer: Vec<_> = (0..c.n_experts).map(|e| cal.expert(l, e)).collect();
        assert_eq!(layer.iter().map(|s| s.routed).sum::<u64>(), (toks.len() * c.n_experts_per_token) as u64);
        let probs: f64 = layer.iter().map(|s| s.prob_sum).sum();
        assert!((probs - toks.len() as f64).abs() < 1e-3, "router probabilities sum to one per token: {probs}");
        for s in &layer {
            assert_eq!(s.input_rows, s.routed);
            assert_eq!(s.hidden_rows, s.routed);
            if s.routed > 0 {
                // The pre-MoE norm output has mean square about the norm scale squared (~1).
                let ms = s.input_sq.iter().map(|&x| x as f64).sum::<f64>() / c.d_model as f64;
                assert!(ms > 0.3 && ms < 3.0, "layer {l}: mean square input {ms}");
                assert!(s.hidden_sq.iter().all(|&x| x >= 0.0) && s.hidden_sq.iter().any(|&x| x > 0.0));
            }
        }
    }
}

#[test]
fn plan_predicts_the_mix_of_a_size_target() {
    let c = grok1::GrokConfig::default();
    let cands = [QuantType::Q8_0, QuantType::Q4S];
    let target = 250_000_000_000;
    let (mix, mean) = grok1::target_size::predict_mix(&c, QuantType::Q8_0, target, &cands).unwrap();
    let n: usize = mix.iter().map(|m| m.1).sum();
    assert_eq!(n, c.n_layers * c.n_experts);
    let dense = grok1::residency::plan::dense_bytes(&c, QuantType::Q8_0).unwrap();
    let total = dense + mean * n as u64;
    assert!(total <= target && total as f64 > 0.99 * target as f64, "{total} for {target}");
    assert!(mix[0].1 > 0 && mix[1].1 > 0, "{mix:?}");
    // Below all-q4_s it says so.
    let e = grok1::target_size::predict_mix(&c, QuantType::Q8_0, 110_000_000_000, &cands).unwrap_err().to_string();
    assert!(e.contains("at least"), "{e}");
    // The plan runs on the mix's mean expert.
    let mut input = grok1::residency::PlanInput::new(c.clone(), QuantType::Q4S, QuantType::Q8_0, grok1::residency::Hardware::new(128 << 30, 0));
    input.expert_mean_bytes = Some(mean);
    assert_eq!(grok1::residency::plan(&input).unwrap().expert_bytes, mean);
}

#[test]
fn skewed_routing_is_off_by_default_and_skews_when_asked() {
    let p = micro();
    assert_eq!(p.init.routing_skew, 0.0);
    assert!(p.router_row_gains(0).is_none());
    let mut s = micro();
    s.init.routing_skew = 4.0;
    let g = s.router_row_gains(1).unwrap();
    // Layer 1: expert 7 has rank 0 (gain 1), expert 0 rank 1.
    assert_eq!(g[7], 1.0);
    assert!(g[0] < 1.0 && g[6] < g[0]);
    // Only the routers change, by their gains.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    grok1::synth::write(&p, a.path(), &SynthOptions::default(), &|_| {}).unwrap();
    grok1::synth::write(&s, b.path(), &SynthOptions::default(), &|_| {}).unwrap();
    let (sa, sb) = (SafetensorsSource::open(a.path()).unwrap(), SafetensorsSource::open(b.path()).unwrap());
    let d = p.config.d_model;
    for t in grok1::checkpoint::Tensor::all(&p.config) {
        let n = t.shape(&p.config).iter().product::<usize>();
        let rows = n / t.shape(&p.config).last().unwrap();
        let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
        sa.read_rows(t, 0, &mut x).unwrap();
        sb.read_rows(t, 0, &mut y).unwrap();
        match t {
            grok1::checkpoint::Tensor::Router(l) => {
                let g = s.router_row_gains(l).unwrap();
                for r in 0..rows {
                    for j in 0..d {
                        let want = half::bf16::from_f32(x[r * d + j] * g[r]).to_f32();
                        assert_eq!(y[r * d + j], want, "{t} row {r}");
                    }
                }
            }
            _ => assert_eq!(x, y, "{t}"),
        }
    }
}

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(out.status.success(), "{bin} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn dir_logits(dir: &Path, toks: &[u32]) -> Vec<f32> {
    let files = ConvertedModel::open(dir).unwrap();
    let w = grok1::model::load::load_weights(&files, &mut |_| {}).unwrap();
    let c = files.config().clone();
    let m = Model::new(c.clone(), w).unwrap();
    m.prefill(toks, &mut KvCache::new(&c, toks.len()), true).unwrap()
}

fn shard_bytes(dir: &Path) -> u64 {
    ConvertedModel::open(dir).unwrap().manifest.shards.iter().map(|s| s.bytes).sum()
}

/// English-like text for the synthetic tokenizer.
fn text() -> String {
    let words = ["the", "model", "reads", "a", "long", "text", "and", "every", "expert", "sees", "some", "rows", "of", "it", "while", "others", "wait"];
    let mut x = 1u64;
    let mut s = String::new();
    for i in 0..6000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s.push_str(words[(x >> 40) as usize % words.len()]);
        s.push_str(if i % 11 == 10 { ". " } else { " " });
    }
    s
}

#[test]
fn target_size_lands_under_the_target_and_beats_a_random_assignment() {
    let convert_bin = env!("CARGO_BIN_EXE_grok1-convert");
    let run_bin = env!("CARGO_BIN_EXE_grok1-run");
    // tiny's widths with 16 layers: 128 experts, so one expert's step between q8_0 and q4_s
    // (0.39 MB) is under 1% of the model.
    // CAL_PRESET, CAL_LAYERS, CAL_TOKENS and CAL_SKEW rerun the measurement on other shapes.
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or(d.into());
    let mut p = Preset::by_name(&env("CAL_PRESET", "tiny")).unwrap();
    p.config.n_layers = env("CAL_LAYERS", "16").parse().unwrap();
    p.init.routing_skew = env("CAL_SKEW", "6").parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ckpt");
    let tok = grok1::tokenizer::synth::try_build_model(p.config.vocab_size).unwrap();
    grok1::synth::write(&p, &ck, &SynthOptions { seed: 5, tokenizer_model: Some(tok), ..Default::default() }, &|_| {}).unwrap();
    let path = |s: &str| tmp.path().join(s).to_str().unwrap().to_string();

    // Calibrate on a q8 conversion.
    run(convert_bin, &["convert", ck.to_str().unwrap(), &path("q8"), "--experts", "q8"]);
    std::fs::write(path("text.txt"), text()).unwrap();
    run(run_bin, &["calibrate", "--model", &path("q8"), "--file", &path("text.txt"), "--out", &path("calib.bin"), "--ctx", "256", "--max-tokens", "2048"]);
    let cal = grok1::calib::load(Path::new(&path("calib.bin")), &p.config).unwrap();
    assert_eq!(cal.tokens, 2048);
    let freqs = cal.routing_frequencies();
    let top = freqs.iter().cloned().fold(0.0, f64::max);
    assert!(top > 0.2, "skewed routing: the favourite expert takes {top:.3} of a layer");

    // The target: 6 bits per expert weight on average, plus the dense part.
    let c = &p.config;
    let expert_weights = (3 * c.d_model * c.ffn_size * c.n_layers * c.n_experts) as u64;
    let q8_dense = ConvertedModel::open(Path::new(&path("q8"))).unwrap().stored_bytes().0;
    let target = q8_dense + expert_weights * 6 / 8;
    let t = target.to_string();
    let out = run(convert_bin, &["convert", ck.to_str().unwrap(), &path("mix"), "--calibration", &path("calib.bin"), "--target-size", &t]);
    assert!(out.contains("q8_0") && out.contains("q4_s"), "{out}");
    let bytes = shard_bytes(Path::new(&path("mix")));
    println!("target {target}, written {bytes} ({:.3}% under)", 100.0 * (target - bytes.min(target)) as f64 / target as f64);
    assert!(bytes <= target, "{bytes} over the target {target}");
    assert!(bytes as f64 >= 0.99 * target as f64, "{bytes} more than 1% under {target}");

    // inspect shows the mix and the calibration.
    let shown = run(convert_bin, &["inspect", &path("mix")]);
    assert!(shown.contains("expert mix") && shown.contains("calibration: calib.bin"), "{shown}");
    let files = ConvertedModel::open(Path::new(&path("mix"))).unwrap();
    let mf = &files.manifest;
    assert_eq!(mf.calibration.as_ref().unwrap().kind, "grok1");
    assert_eq!(mf.calibration.as_ref().unwrap().sha256, grok1::format::writer::sha256_hex(&std::fs::read(path("calib.bin")).unwrap()));
    let types: Vec<QuantType> = mf.experts.iter().map(|x| x.tensors[0].qtype).collect();
    for x in &mf.experts {
        assert!(x.tensors.iter().all(|t| t.qtype == x.tensors[0].qtype), "an expert's projections share a type");
    }
    let n_q8 = types.iter().filter(|&&q| q == QuantType::Q8_0).count();
    assert!(n_q8 > 0 && n_q8 < types.len());
    // The most-routed expert of each layer got the precise type.
    for l in 0..c.n_layers {
        let fav = (0..c.n_experts).max_by(|&a, &b| freqs[l * c.n_experts + a].total_cmp(&freqs[l * c.n_experts + b])).unwrap();
        assert_eq!(types[l * c.n_experts + fav], QuantType::Q8_0, "layer {l}'s favourite expert {fav}");
    }
    run(convert_bin, &["verify", &path("mix")]);

    // The runner reads the mix from RAM and through the store under a budget, identically.
    let toks = tokens(24, c.vocab_size, 3);
    let ids: Vec<String> = toks.iter().map(|t| t.to_string()).collect();
    let ids = ids.join(",");
    run(run_bin, &["logits", "--model", &path("mix"), "--tokens", &ids, "--out", &path("a.npy")]);
    run(run_bin, &["logits", "--model", &path("mix"), "--tokens", &ids, "--out", &path("b.npy"), "--ram-budget", "4MiB"]);
    assert_eq!(grok1::npy::read(Path::new(&path("a.npy"))).unwrap().data, grok1::npy::read(Path::new(&path("b.npy"))).unwrap().data);

    // KL against the lossless model: the chosen mix, and random assignments of the same types.
    let src = SafetensorsSource::open(&ck).unwrap();
    let kl_toks = tokens(env("CAL_TOKENS", "256").parse().unwrap(), c.vocab_size, 12345);
    let lossless = {
        let m = Model::new(c.clone(), Weights::from_source(&src, QuantType::Bf16, QuantType::Bf16).unwrap()).unwrap();
        m.prefill(&kl_toks, &mut KvCache::new(c, kl_toks.len()), true).unwrap()
    };
    let golden = NpyArray { shape: vec![kl_toks.len(), c.vocab_size], data: lossless.iter().map(|&x| x as f64).collect() };
    let chosen = compare(&golden, &dir_logits(Path::new(&path("mix")), &kl_toks)).mean_kl;
    // The routing on the measured tokens, to compare with the calibration text's.
    let eval_freqs = {
        let m = Model::new(c.clone(), Weights::from_source(&src, QuantType::Bf16, QuantType::Bf16).unwrap()).unwrap();
        let rec = Arc::new(Recorder::new(c));
        m.prefill_observed(&kl_toks, &mut KvCache::new(c, kl_toks.len()), rec.clone()).unwrap();
        rec.finish(kl_toks.len() as u64, "eval").routing_frequencies()
    };
    // Share of the routing (on the measured tokens) that lands on q8_0 experts.
    let q8_share = |types: &[QuantType]| -> f64 {
        types.iter().zip(&eval_freqs).filter(|(t, _)| **t == QuantType::Q8_0).map(|(_, f)| f).sum::<f64>() / c.n_layers as f64
    };
    println!("q8_0 share of the routing on the measured tokens: chosen {:.3}", q8_share(&types));
    let mut x = 99u64;
    let mut randoms = Vec::new();
    for r in 0..3 {
        let mut shuffled = types.clone();
        for i in (1..shuffled.len()).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (x >> 33) as usize % (i + 1));
        }
        let dst = tmp.path().join(format!("random{r}"));
        let mix = mf.expert_mix.clone().unwrap();
        let o = ConvertOptions { threads: 2, expert_types: Some((shuffled, mix)), ..ConvertOptions::default() };
        convert(&src, &dst, &o, &mut |_| {}).unwrap();
        assert_eq!(shard_bytes(&dst), bytes, "the same types, the same size");
        println!("random {r}: q8_0 share of the routing {:.3}", q8_share(o.expert_types.as_ref().unwrap().0.as_slice()));
        randoms.push(compare(&golden, &dir_logits(&dst, &kl_toks)).mean_kl);
    }
    // For the record: the same target without the calibration (uniform frequencies, errors on
    // each expert's own weights), and every expert q4_s (the smallest size on offer).
    run(convert_bin, &["convert", ck.to_str().unwrap(), &path("nocal"), "--target-size", &t]);
    let nocal = compare(&golden, &dir_logits(Path::new(&path("nocal")), &kl_toks)).mean_kl;
    run(convert_bin, &["convert", ck.to_str().unwrap(), &path("q4"), "--experts", "q4"]);
    let q4 = compare(&golden, &dir_logits(Path::new(&path("q4")), &kl_toks)).mean_kl;
    println!(
        "mean KL ({} positions): chosen {chosen:.3e}, random assignments {}, without calibration {nocal:.3e}, all q4_s {q4:.3e}",
        kl_toks.len(),
        randoms.iter().map(|r| format!("{r:.3e}")).collect::<Vec<_>>().join(" ")
    );
    // Measured (tiny widths, 16 layers, skew 6, 256 positions): chosen 1.40e-2, random
    // 1.81-1.84e-2, without calibration 1.68e-2, all q4_s 1.88e-2. The routing frequencies are
    // what the calibration adds. Not general yet: with small's widths (CAL_PRESET=small
    // CAL_LAYERS=12 CAL_TOKENS=1024) the chosen mix puts 62% of the measured tokens' routing on
    // q8_0 against 33-42% for the random ones, yet its KL is 1.63e-2 against 1.52-1.61e-2 (all
    // q4_s 1.82e-2): there the KL does not follow routed error, and the objective needs work.
    assert!(chosen < nocal, "with calibration {chosen:.3e}, without {nocal:.3e}");
    for r in &randoms {
        assert!(chosen < *r, "chosen {chosen:.3e} vs random {r:.3e}");
    }
}
