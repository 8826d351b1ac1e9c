//! The forward pass against golden float64 logits of the reference implementation, the KV cache
//! against the full-sequence pass, quantized weights by measured error, and focused checks of the
//! pad mask, the GQA head mapping and RoPE against direct computations.

mod common;

use common::*;
use grok1::model::attention::{attend, AttnParams, AttnScratch};
use grok1::model::ops::{rope_in_place, rope_phases};
use grok1::model::{KvCache, Model};
use grok1::quant::QuantType;
use grok1::sampling::argmax;

/// The fixtures' weights are bf16 values, so bf16 matrices hold them exactly and the only
/// differences left are f32 arithmetic against float64: about 1e-5 is expected.
const LOSSLESS_TOL: f64 = 1e-4;

fn bf16_model(f: &Fixture) -> Model {
    f.model(QuantType::Bf16, QuantType::Bf16)
}

/// Logits of every position of `all`, prefilling `all[..split[0]]`, then the chunks between the
/// split points, then decoding the rest one token at a time.
fn logits_by_chunks(model: &Model, all: &[u32], splits: &[usize]) -> Vec<f32> {
    let mut cache = KvCache::new(model.config(), all.len());
    let mut out = Vec::new();
    let mut at = 0;
    for &end in splits {
        out.extend(model.prefill(&all[at..end], &mut cache, true).unwrap());
        at = end;
    }
    let mut logits = vec![0f32; model.config().vocab_size];
    for &t in &all[at..] {
        model.decode_into(t, &mut cache, &mut logits).unwrap();
        out.extend_from_slice(&logits);
    }
    assert_eq!(cache.len(), all.len());
    out
}

#[test]
fn bf16_matches_golden_logits_one_prefill() {
    for f in all_fixtures() {
        let model = bf16_model(&f);
        let toks = f.tokens();
        let mut cache = KvCache::new(model.config(), toks.all.len());
        let logits = model.prefill(&toks.all, &mut cache, true).unwrap();
        let a = compare(&f.golden(), &logits);
        eprintln!("{}: one prefill of {} tokens: {a:?}", f.name, toks.all.len());
        assert!(a.max_abs < LOSSLESS_TOL, "{}: {a:?}", f.name);
        assert_eq!(a.top1, 1.0);

        // Asking for the last row only gives exactly that row.
        cache.clear();
        let last = model.prefill(&toks.all, &mut cache, false).unwrap();
        let v = model.config().vocab_size;
        assert_eq!(last, logits[logits.len() - v..]);
    }
}

#[test]
fn bf16_matches_golden_logits_prefill_then_decode() {
    for f in all_fixtures() {
        let model = bf16_model(&f);
        let toks = f.tokens();
        let golden = f.golden();
        let n = toks.all.len();
        let p = toks.prompt.len();
        let schedules: [(&str, Vec<usize>); 3] = [
            ("prompt + decode", vec![p]),
            ("decode only", vec![1]),
            ("mixed chunks + decode", vec![3, 4, 9, p, p + 2]),
        ];
        for (what, splits) in schedules {
            let logits = logits_by_chunks(&model, &toks.all, &splits);
            let a = compare(&golden, &logits);
            eprintln!("{}: {what} {splits:?} of {n}: {a:?}", f.name);
            assert!(a.max_abs < LOSSLESS_TOL, "{} {what}: {a:?}", f.name);
        }
    }
}

#[test]
fn greedy_generation_reproduces_the_continuation() {
    for f in all_fixtures().into_iter().filter(|f| f.own_continuation) {
        let model = bf16_model(&f);
        let toks = f.tokens();
        let mut cache = KvCache::new(model.config(), toks.all.len());
        let mut next = argmax(&model.prefill(&toks.prompt, &mut cache, false).unwrap());
        let mut got = vec![next];
        while got.len() < toks.continuation.len() {
            next = argmax(&model.decode(next, &mut cache).unwrap());
            got.push(next);
        }
        assert_eq!(got, toks.continuation, "{}", f.name);
    }
}

fn quantized_logits(f: &Fixture, dense: QuantType, experts: QuantType) -> Vec<f32> {
    let model = f.model(dense, experts);
    let toks = f.tokens();
    let mut cache = KvCache::new(model.config(), toks.all.len());
    model.prefill(&toks.all, &mut cache, true).unwrap()
}

/// The expert types measured against float64 logits. q4_0 is the yardstick: its bytes are
/// ggml's reference Q4_0 quantizer's, byte for byte (`tests/ggml_crosscheck.rs`), so its KL on
/// these weights is ggml's Q4_0 KL, a number set outside this project.
const EXPERT_TYPES: [QuantType; 5] = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Iq4Nl, QuantType::Q4K, QuantType::Q4S];

/// q8_0's mean KL may be at most this fraction of q4_0's. Both types scale each block of 32 by
/// its largest |weight|; q8_0 rounds to steps of max/127, q4_0 to steps of max/8, so q8_0's
/// rounding error is 8/127 (about 1/16) of q4_0's. KL grows as the square of the logit error
/// where no expert choice flips (1/256) and about linearly where flips dominate (a flip's rate
/// grows with the error's size: 1/16). A quarter leaves room for what both share at the same
/// size whatever the expert type: the int8 rounding of activations and q8_0 dense weights.
const Q8_0_OF_Q4_0: f64 = 0.25;

/// The bounds, on per-position KLs measured at the same positions for every type of
/// `EXPERT_TYPES`: iq4_nl, q4_k and q4_s (4.5 bits a weight, as q4_0) may lose no more than
/// q4_0, q8_0 no more than `Q8_0_OF_Q4_0` of it. On a few hundred positions the mean KL is
/// noisy (one routing flip costs a position 1e-3), so each bound is a paired test: the mean over
/// positions of KL_type - bound x KL_q4_0 must not exceed twice its standard error, that is,
/// the type is not measurably worse than its bound at about 98% confidence. More positions make
/// the test sharper; no measured value of ours enters it. Types in `printed_only` are printed,
/// not bounded. Returns the failures.
fn check_against_q4_0(what: &str, kl: &[(QuantType, Vec<f64>)], printed_only: &[QuantType]) -> Vec<String> {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let q4_0 = &kl.iter().find(|(t, _)| *t == QuantType::Q4_0).unwrap().1;
    let mut failures = Vec::new();
    for (q, v) in kl {
        let factor = match q {
            QuantType::Q4_0 => continue,
            QuantType::Q8_0 => Q8_0_OF_Q4_0,
            _ => 1.0,
        };
        let (m, two_se) = paired_excess(v, q4_0, factor);
        let line = format!(
            "{what}: experts {q:<7} mean KL {:.3e} = {:.3}x q4_0's {:.3e}; KL - {factor} x q4_0's: {m:+.2e} (2 standard errors {two_se:.2e})",
            mean(v),
            mean(v) / mean(q4_0),
            mean(q4_0),
        );
        eprintln!("{line}");
        if printed_only.contains(q) {
            eprintln!("{what}: experts {q} not bounded here (see the test's comment)");
        } else if !(m <= two_se) {
            failures.push(line);
        }
    }
    failures
}

/// Quantized weights against the golden float64 logits of the reference implementation, on
/// every fixture (24 + 24 + 48 positions, pooled per dense and expert type). Where an expert row
/// is not a whole number of 256-weight super-blocks (micro's 64- and 128-wide rows), q4_k and
/// q4_s fall back to iq4_nl, as the converter does; that is what runs, so that is what counts.
///
/// The bounds are set by q4_0 (ggml's quantizer, see `EXPERT_TYPES`) through the paired test of
/// `check_against_q4_0`, not by our own output: q4_k and q4_s no worse than q4_0, q8_0 no worse
/// than `Q8_0_OF_Q4_0` of it. iq4_nl is printed, not bounded, here: on these fixtures' weights
/// (drawn on the release's int8 grid) it is measurably worse than q4_0 by KL (1.14x with bf16
/// dense weights, 1.29x and 2.4 standard errors with q8_0), although its weight RMSE is 0.865x
/// q4_0's on the same weights (`tests/quant.rs`); on Gaussian weights it is 0.80x q4_0's KL and
/// bounded below (`quantized_experts_against_float64_on_many_positions`). Until that is
/// understood a bound here would be one fitted to our own output.
///
/// Max |d| and top-1 agreement are printed, not bounded: these random-weight models have nearly
/// flat logits (top-2 margins down to 1e-3), so one routing flip moves max |d| past the distance
/// between unrelated rows and top-1 is near chance for any 4-bit type. The unrelated-row KL
/// (each golden row against the next position's) is printed as the scale a structural error
/// would reach. Plant a fault (in `src/quant/q4_s.rs`'s `quantize_row_generic`, hand
/// `quantize_block` every third weight times 1.3) and q4_s fails here (1.49x q4_0's KL) and
/// below (1.40x). A fault that leaves q4_s no worse than q4_0 passes: that is the bound. (A
/// uniform scale of an expert's weights is no fault to plant: the norm after the MoE removes it.)
#[test]
fn quantized_weights_measured_against_golden() {
    eprintln!(
        "{:<16} {:<6} {:<7} {:>10} {:>11} {:>11} {:>6}",
        "fixture", "dense", "experts", "max|d|", "median KL", "mean KL", "top1"
    );
    // Per dense type, per expert type: the KL at every golden position of every fixture.
    let mut pooled: [Vec<Vec<f64>>; 2] = [vec![Vec::new(); EXPERT_TYPES.len()], vec![Vec::new(); EXPERT_TYPES.len()]];
    for f in all_fixtures() {
        let golden = f.golden();
        let t_n = golden.shape[0];
        let next_row: Vec<f32> =
            (0..t_n).flat_map(|t| golden.row((t + 1) % t_n).iter().map(|&x| x as f32)).collect();
        let unrelated = compare(&golden, &next_row);
        eprintln!(
            "{:<16} {:<14} {:>10.3e} {:>11.3e} {:>11.3e} {:>6.3}",
            f.name, "(unrelated)", unrelated.max_abs, unrelated.median_kl, unrelated.mean_kl, unrelated.top1
        );
        for (d, dense) in [QuantType::Bf16, QuantType::Q8_0].into_iter().enumerate() {
            for (e, experts) in EXPERT_TYPES.into_iter().enumerate() {
                let logits = quantized_logits(&f, dense, experts);
                let a = compare(&golden, &logits);
                eprintln!(
                    "{:<16} {:<6} {:<7} {:>10.3e} {:>11.3e} {:>11.3e} {:>6.3}",
                    f.name, dense.name(), experts.name(), a.max_abs, a.median_kl, a.mean_kl, a.top1
                );
                pooled[d][e].extend(kl_per_position(&golden, &logits));
            }
        }
    }
    let mut failures = Vec::new();
    for (d, dense) in [QuantType::Bf16, QuantType::Q8_0].into_iter().enumerate() {
        let kl: Vec<(QuantType, Vec<f64>)> = EXPERT_TYPES.iter().zip(&pooled[d]).map(|(&q, p)| (q, p.clone())).collect();
        let what = format!("dense {dense}, {} golden positions", pooled[d][0].len());
        failures.extend(check_against_q4_0(&what, &kl, &[QuantType::Iq4Nl]));
    }
    assert!(failures.is_empty(), "outside the bounds:\n{}", failures.join("\n"));
}

/// `n` pseudo-random token ids in `3..vocab` (past the pad, BOS and EOS ids).
fn synth_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 12345u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            3 + ((x >> 33) % (vocab as u64 - 3)) as u32
        })
        .collect()
}

/// The golden fixtures hold 96 positions in all; this is the same measurement on 256, cheaply:
/// the synthetic `tiny` preset (d_model 256, 4 layers, ffn 1024: whole super-blocks, so q4_k and
/// q4_s run as themselves), its golden logits from the naive float64 forward pass over its bf16
/// weights (`common::naive_forward`, written from the specification, shares no code with the
/// runner's forward). Dense weights bf16; bounds as above, set by q4_0.
#[test]
fn quantized_experts_against_float64_on_many_positions() {
    let start = std::time::Instant::now();
    let preset = grok1::synth::Preset::by_name("tiny").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = grok1::synth::SynthOptions { seed: 5, ..Default::default() };
    grok1::synth::write(&preset, tmp.path(), &opts, &|_| {}).unwrap();
    let src = grok1::checkpoint::SafetensorsSource::open(tmp.path()).unwrap();
    let c = preset.config.clone();
    let tokens = synth_tokens(256, c.vocab_size);
    let lossless = grok1::model::Weights::from_source(&src, QuantType::Bf16, QuantType::Bf16).unwrap();
    let naive = naive_forward(&c, &lossless, &tokens, true);
    let golden = grok1::npy::NpyArray { shape: vec![tokens.len(), c.vocab_size], data: naive.concat() };
    drop(lossless);
    let mut kl = Vec::new();
    for experts in EXPERT_TYPES {
        let w = grok1::model::Weights::from_source(&src, QuantType::Bf16, experts).unwrap();
        let model = Model::new(c.clone(), w).unwrap();
        let mut cache = KvCache::new(&c, tokens.len());
        let logits = model.prefill(&tokens, &mut cache, true).unwrap();
        eprintln!("synth tiny, experts {experts:<7}: {:?}", compare(&golden, &logits));
        kl.push((experts, kl_per_position(&golden, &logits)));
    }
    let failures = check_against_q4_0("synth tiny seed 5, 256 positions", &kl, &[]);
    eprintln!("({:.1} s)", start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "outside the bounds:\n{}", failures.join("\n"));
}

/// Quantized matrices go through the same forward pass: against a naive float64 forward over the
/// very same (dequantized) weights, only activation rounding remains: the integer kernels
/// quantize activations to int8 per 32-block (as ggml does), which moves logits by about 1e-3
/// typically, more where a near-tied routing decision flips. A structural error (orientation,
/// nibble order, scales) would move them as much as unrelated logits do (median KL ~4e-3 here).
#[test]
fn quantized_model_equals_naive_forward_on_its_own_weights() {
    let f = micro_hf();
    let model = f.model(QuantType::Q8_0, QuantType::Iq4Nl);
    let toks = f.tokens();
    let naive = naive_forward(model.config(), model.weights(), &toks.all, true);
    let v = naive[0].len();
    let as_golden = grok1::npy::NpyArray { shape: vec![naive.len(), v], data: naive.concat() };
    for splits in [vec![toks.all.len()], vec![5, toks.prompt.len()]] {
        let ours = logits_by_chunks(&model, &toks.all, &splits);
        let a = compare(&as_golden, &ours);
        eprintln!("{splits:?}: {a:?}");
        assert!(a.median_kl < 1e-5 && a.mean_kl < 2e-4, "{splits:?}: {a:?}");
        assert!(a.top1 >= 0.9, "{splits:?}: {a:?}");
        let d = max_abs_diff(&naive, &ours);
        assert!(d < 0.2, "{splits:?}: max |d| {d:e}");
    }
}

/// The same on the tiny fixture, whose expert rows are whole super-blocks, for q4_s experts (the
/// integer kernel with per-half-block sub-scales) and iq4_nl for comparison. Its routers have
/// more near-ties, so activation rounding flips more of them: measured median / mean KL
/// 1.0e-5 / 4.5e-5 (q4_s) and 2.7e-5 / 1.8e-4 (iq4_nl), top-1 0.96 and 0.90, max |d| 0.14 and
/// 0.23. Unrelated logits are at 1.6e-2 / 1.4e-2 (top-1 0.23, max |d| 0.82), and the weights'
/// own 4-bit error against the golden logits at about 5e-4 / 1.2e-3; the bounds sit well below.
#[test]
fn q4_s_model_equals_naive_forward_on_its_own_weights() {
    let Some(f) = tiny_hf() else { return };
    let toks = f.tokens();
    for experts in [QuantType::Iq4Nl, QuantType::Q4S] {
        let model = f.model(QuantType::Q8_0, experts);
        let naive = naive_forward(model.config(), model.weights(), &toks.all, true);
        let v = naive[0].len();
        let as_golden = grok1::npy::NpyArray { shape: vec![naive.len(), v], data: naive.concat() };
        let ours = logits_by_chunks(&model, &toks.all, &[toks.prompt.len()]);
        let a = compare(&as_golden, &ours);
        let d = max_abs_diff(&naive, &ours);
        eprintln!("{} experts {experts}: {a:?}", f.name);
        assert!(a.median_kl < 1e-4 && a.mean_kl < 5e-4, "{experts}: {a:?}");
        assert!(a.top1 >= 0.85, "{experts}: {a:?}");
        assert!(d < 0.4, "{experts}: max |d| {d:e}");
    }
}

fn max_abs_diff(naive: &[Vec<f64>], ours: &[f32]) -> f64 {
    let v = naive[0].len();
    naive
        .iter()
        .enumerate()
        .flat_map(|(t, row)| row.iter().zip(&ours[t * v..][..v]).map(|(a, &b)| (a - b as f64).abs()))
        .fold(0.0, f64::max)
}

// ------------------------------------------------------------------------- focused checks --

/// Pad keys (token id == pad_token_id) are never attended to; a query that sees no other key
/// (leading pads) averages all values, as the release's -1e30 fill does over the sequence.
#[test]
fn pad_keys_are_masked_like_the_naive_forward() {
    let f = micro_hf();
    let model = bf16_model(&f);
    let c = model.config().clone();
    let pad = c.pad_token_id;
    let tokens = [pad, pad, 5, 17, pad, 200, 42, pad, pad, 99, 3, 128, pad, 7];

    let naive = naive_forward(&c, model.weights(), &tokens, true);
    let ours = logits_by_chunks(&model, &tokens, &[tokens.len()]);
    let d = max_abs_diff(&naive, &ours);
    assert!(d < LOSSLESS_TOL, "one prefill vs naive: max |d| {d:e}");

    // The mask has to matter for this check to mean anything.
    let unmasked = naive_forward(&c, model.weights(), &tokens, false);
    let gap = max_abs_diff(&unmasked, &ours);
    assert!(gap > 1e-2, "attending to pads changes the logits by only {gap:e}");

    // Through the cache. Rows 0 and 1 are leading pads that see no key: one token at a time they
    // average the values present so far instead of the whole sequence's, so they are excluded.
    let split = logits_by_chunks(&model, &tokens, &[3, 6]);
    let v = c.vocab_size;
    let d = max_abs_diff(&naive[2..], &split[2 * v..]);
    assert!(d < LOSSLESS_TOL, "chunks + decode vs naive: max |d| {d:e}");
}

fn noise(rng: &mut grok1::sampling::Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect()
}

/// Naive attention in f64 for one query head, with the KV head given explicitly.
#[allow(clippy::too_many_arguments)]
fn naive_head(p: &AttnParams, q: &[f32], k: &[f32], v: &[f32], stride: usize, g: usize, n_keys: usize) -> Vec<f64> {
    let hd = p.head_dim;
    let logits: Vec<f64> = (0..n_keys)
        .map(|s| {
            let kk = &k[(g * stride + s) * hd..][..hd];
            let x: f64 = q.iter().zip(kk).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * p.multiplier as f64;
            p.logit_cap as f64 * (x / p.logit_cap as f64).tanh()
        })
        .collect();
    let w: Vec<f64> = log_softmax(&logits).iter().map(|x| x.exp()).collect();
    (0..hd).map(|i| (0..n_keys).map(|s| w[s] * v[(g * stride + s) * hd + i] as f64).sum()).collect()
}

/// Query head j reads KV head j / (q_heads / kv_heads): contiguous groups, not j % kv_heads.
#[test]
fn gqa_query_heads_read_their_group_kv_head() {
    let p = AttnParams { n_q_heads: 8, n_kv_heads: 2, head_dim: 8, multiplier: 0.35, logit_cap: 30.0 };
    let (hd, qd, stride) = (p.head_dim, p.n_q_heads * p.head_dim, 12);
    let mut rng = grok1::sampling::Rng::new(3);
    let k = noise(&mut rng, p.n_kv_heads * stride * hd);
    let v = noise(&mut rng, p.n_kv_heads * stride * hd);
    let valid = vec![true; stride];
    let (p0, t_n) = (4, 5);
    let q: Vec<f32> = noise(&mut rng, t_n * qd).iter().map(|x| x * 4.0).collect();
    let mut out = vec![0f32; t_n * qd];
    attend(&p, &q, p0, &k, &v, stride, &valid, &mut out, &mut AttnScratch::default());

    let mut wrong_mapping_gap = 0f64;
    for t in 0..t_n {
        for j in 0..p.n_q_heads {
            let qh = &q[t * qd + j * hd..][..hd];
            let want = naive_head(&p, qh, &k, &v, stride, j / 4, p0 + t + 1);
            let got = &out[t * qd + j * hd..][..hd];
            for i in 0..hd {
                assert!((want[i] - got[i] as f64).abs() < 1e-5, "t {t} head {j} lane {i}");
            }
            let other = naive_head(&p, qh, &k, &v, stride, j % 2, p0 + t + 1);
            for i in 0..hd {
                wrong_mapping_gap = wrong_mapping_gap.max((other[i] - got[i] as f64).abs());
            }
        }
    }
    assert!(wrong_mapping_gap > 1e-2, "the test cannot tell the mappings apart");
    assert_eq!(p.kv_head(5), 1);
    assert_eq!(
        AttnParams::from_config(&grok1::GrokConfig::default()).kv_head(47),
        7,
        "Grok-1: 48 query heads over 8 KV heads, groups of 6"
    );
}

/// Rotate-half RoPE: lane i and lane i + hd/2 form a pair rotated by pos * theta^(-2i/hd).
#[test]
fn rope_rotates_lane_pairs_by_absolute_position() {
    let mut rng = grok1::sampling::Rng::new(9);
    for (hd, theta) in [(16usize, 10000.0f64), (128, 10000.0), (32, 500.0)] {
        for pos in [0usize, 1, 7, 1000, 8191] {
            let heads = 3;
            let x = noise(&mut rng, heads * hd);
            let (mut cos, mut sin) = (vec![0f32; hd / 2], vec![0f32; hd / 2]);
            rope_phases(pos, hd, theta, &mut cos, &mut sin);
            let mut y = x.clone();
            rope_in_place(&mut y, hd, &cos, &sin);
            for h in 0..heads {
                for i in 0..hd / 2 {
                    let angle = pos as f64 / theta.powf((2 * i) as f64 / hd as f64);
                    let (a, b) = (x[h * hd + i] as f64, x[h * hd + i + hd / 2] as f64);
                    let (re, im) = (a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin());
                    assert!((y[h * hd + i] as f64 - re).abs() < 2e-6, "hd {hd} pos {pos} lane {i}");
                    assert!((y[h * hd + i + hd / 2] as f64 - im).abs() < 2e-6, "hd {hd} pos {pos} lane {}", i + hd / 2);
                }
            }
        }
    }
    // What attention sees depends on relative position only.
    let hd = 16;
    let (q, k) = (noise(&mut rng, hd), noise(&mut rng, hd));
    let at = |x: &[f32], pos: usize| {
        let (mut c, mut s) = (vec![0f32; hd / 2], vec![0f32; hd / 2]);
        rope_phases(pos, hd, 10000.0, &mut c, &mut s);
        let mut y = x.to_vec();
        rope_in_place(&mut y, hd, &c, &s);
        y
    };
    let score = |pq, pk| at(&q, pq).iter().zip(at(&k, pk)).map(|(a, b)| a * b).sum::<f32>();
    assert!((score(10, 3) - score(107, 100)).abs() < 1e-5);
    assert!((score(10, 3) - score(10, 4)).abs() > 1e-4);
}

#[test]
fn bad_calls_are_errors_and_leave_the_cache_alone() {
    let f = micro_hf();
    let model = bf16_model(&f);
    let c = model.config().clone();
    let mut cache = KvCache::new(&c, 4);
    model.prefill(&[5, 6], &mut cache, false).unwrap();
    let msg = |r: grok1::Result<Vec<f32>>| r.unwrap_err().to_string();
    assert!(msg(model.prefill(&[5, c.vocab_size as u32], &mut cache, true)).contains("outside the vocabulary"));
    assert!(msg(model.prefill(&[1, 2, 3], &mut cache, true)).contains("KV cache full"));
    assert!(msg(model.prefill(&[], &mut cache, true)).contains("zero tokens"));
    let other = grok1::GrokConfig { n_layers: c.n_layers + 1, ..c.clone() };
    assert!(msg(model.decode(5, &mut KvCache::new(&other, 4))).contains("KV cache"));
    let mut short = vec![0f32; 3];
    assert!(model.decode_into(5, &mut cache, &mut short).is_err());
    assert_eq!(cache.tokens(), &[5, 6]);
    model.decode(7, &mut cache).unwrap();
    model.decode(8, &mut cache).unwrap();
    assert!(msg(model.decode(9, &mut cache)).contains("KV cache full"));
    // A truncated cache continues as if the dropped tokens had never been seen.
    cache.truncate(2);
    let again = model.decode(9, &mut cache).unwrap();
    let mut fresh = KvCache::new(&c, 4);
    let want = model.prefill(&[5, 6, 9], &mut fresh, false).unwrap();
    assert_eq!(again, want);
}

#[test]
fn decode_weight_bytes_counts_what_one_token_reads() {
    let f = micro_hf();
    let model = bf16_model(&f);
    let c = model.config();
    let (d, v, ff) = (c.d_model, c.vocab_size, c.ffn_size);
    let bf16 = 2;
    let per_layer = bf16 * (2 * c.q_dim() * d + 2 * c.kv_dim() * d)
        + 4 * (4 * d + c.n_experts * d)
        + c.n_experts_per_token * bf16 * 3 * d * ff;
    let want = bf16 * d + bf16 * v * d + 4 * d + c.n_layers * per_layer;
    assert_eq!(model.decode_weight_bytes(), want);
}
