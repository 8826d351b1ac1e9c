//! Quantization at the model level: KL divergence of the next-token distribution, top-1
//! agreement and max logit error of quantized experts against the lossless model, on synthetic
//! models with many positions (the fixtures' 24-48 positions are too few to rank quantizers).

mod common;

use common::{compare, Agreement};
use grok1::checkpoint::SafetensorsSource;
use grok1::model::{KvCache, Model, Weights};
use grok1::npy::NpyArray;
use grok1::quant::QuantType;
use grok1::synth::{InitScales, Preset, SynthOptions};
use std::collections::HashMap;
use std::time::Instant;

fn logits(src: &SafetensorsSource, dense: QuantType, experts: QuantType, tokens: &[u32]) -> Vec<f32> {
    let c = grok1::checkpoint::TensorSource::config(src).clone();
    let w = Weights::from_source(src, dense, experts).unwrap();
    let m = Model::new(c.clone(), w).unwrap();
    let mut cache = KvCache::new(&c, tokens.len());
    m.prefill(tokens, &mut cache, true).unwrap()
}

/// `n` pseudo-random token ids in `3..vocab` (past the pad, BOS and EOS ids).
/// The environment's `name` as a number, or `default`: KL_PRESET, KL_TOKENS and KL_SEED rerun
/// these measurements on other models.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 12345u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            3 + ((x >> 33) % (vocab as u64 - 3)) as u32
        })
        .collect()
}

/// Writes `preset`'s random bf16 model from `seed`, runs `n` positions through it with bf16
/// dense weights and each expert type of `types`, and compares each with the all-bf16 model
/// (lossless: the weights are bf16 values). Prints one line per type and the mean KL relative
/// to q4_0's (which `types` must include).
fn expert_kl(preset: &Preset, seed: u64, n: usize, types: &[QuantType]) -> HashMap<QuantType, Agreement> {
    let start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    grok1::synth::write(preset, tmp.path(), &SynthOptions { seed, ..Default::default() }, &|_| {}).unwrap();
    let src = SafetensorsSource::open(tmp.path()).unwrap();
    let tokens = tokens(n, preset.config.vocab_size);
    let reference = logits(&src, QuantType::Bf16, QuantType::Bf16, &tokens);
    let golden = NpyArray { shape: vec![n, preset.config.vocab_size], data: reference.iter().map(|&x| x as f64).collect() };
    let mut kl = HashMap::new();
    for &q in types {
        let a = compare(&golden, &logits(&src, QuantType::Bf16, q, &tokens));
        println!(
            "experts {q:<7} mean KL {:.3e}  median KL {:.3e}  top-1 {:.3}  max |d| {:.3}",
            a.mean_kl, a.median_kl, a.top1, a.max_abs
        );
        kl.insert(q, a);
    }
    let q4_0 = kl[&QuantType::Q4_0].mean_kl;
    let ratios: Vec<String> =
        types.iter().filter(|&&q| q != QuantType::Q4_0).map(|q| format!("{q} {:.3}", kl[q].mean_kl / q4_0)).collect();
    println!("mean KL relative to q4_0: {}", ratios.join(", "));
    println!("({} positions, seed {seed}, {:.1} s)", n, start.elapsed().as_secs_f64());
    kl
}

#[test]
fn int4_and_int8_experts_against_lossless() {
    let preset = Preset::by_name(&std::env::var("KL_PRESET").unwrap_or("tiny".into())).unwrap();
    let types = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Iq4Nl, QuantType::Q4K, QuantType::Q4S];
    let kl = expert_kl(&preset, env_or("KL_SEED", 3) as u64, env_or("KL_TOKENS", 256), &types);
    let ratio = |q: QuantType| kl[&q].mean_kl / kl[&QuantType::Q4_0].mean_kl;
    // Measured on this model (seed 3, 256 positions): q8_0 0.086x, iq4_nl 0.794x, q4_k 0.792x,
    // q4_s 0.669x of q4_0's mean KL (q4_0: 6.9e-3). On random-weight models the KL is dominated
    // by routing flips, whose rate grows with the RMS weight error rather than its square, so
    // these ratios track the RMSE ratios (0.86, 0.82 and 0.74 on Gaussian weights) more than the
    // squared-error ones. The bounds leave room for noise and catch any regression toward q4_0.
    // Seeds 1-8 give q8_0 0.04-0.11, iq4_nl 0.79-0.94, q4_k 0.77-0.89 and q4_s 0.64-0.75, q4_s
    // below both others on every seed; its bound is the largest of those.
    assert!(ratio(QuantType::Q8_0) < 0.15, "q8_0 KL {:.3}x q4_0's", ratio(QuantType::Q8_0));
    assert!(ratio(QuantType::Iq4Nl) < 0.88, "iq4_nl KL {:.3}x q4_0's", ratio(QuantType::Iq4Nl));
    assert!(ratio(QuantType::Q4K) < 0.88, "q4_k KL {:.3}x q4_0's", ratio(QuantType::Q4K));
    assert!(ratio(QuantType::Q4S) < 0.76, "q4_s KL {:.3}x q4_0's", ratio(QuantType::Q4S));
    assert!(ratio(QuantType::Q4S) < ratio(QuantType::Iq4Nl), "q4_s above iq4_nl");
    assert!(ratio(QuantType::Q4S) < ratio(QuantType::Q4K), "q4_s above q4_k");
    assert!(kl[&QuantType::Q8_0].top1 > kl[&QuantType::Iq4Nl].top1);
}

/// The shape the int4 types were compared on: d_model 768, 2 layers, ffn 2048, 8 experts top-2
/// (12 q / 4 kv heads of 64, vocab 1024). Every expert row is a whole number of 256-weight
/// super-blocks, so q4_s applies throughout.
fn kl_768() -> Preset {
    let mut p = Preset::by_name("tiny").unwrap();
    let c = &mut p.config;
    (c.d_model, c.n_layers, c.ffn_size) = (768, 2, 2048);
    (c.n_q_heads, c.n_kv_heads, c.head_dim) = (12, 4, 64);
    (c.n_experts, c.n_experts_per_token) = (8, 2);
    c.vocab_size = 1024;
    c.attn_output_multiplier = 1.0 / (c.head_dim as f64).sqrt();
    c.embedding_multiplier = (c.d_model as f64).sqrt();
    p.init = InitScales::for_d_model(c.d_model);
    p
}

/// q4_s against q4_0 on the shape the int4 bar is set on (d_model 768, 2 layers, ffn 2048, 8
/// experts top-2), 512 positions: about 15 s in release mode on two cores. Measured with seed 1:
/// q8_0 0.049x, iq4_nl 0.745x, q4_k 0.666x, q4_s 0.566x of q4_0's mean KL (q4_0: 1.48e-3);
/// seeds 1-5 give q4_s 0.54-0.64, q4_k 0.65-0.74, iq4_nl 0.69-0.81 and q8_0 0.02-0.05 (1024
/// positions, seed 1: q4_s 0.586x). Against a float64 forward pass over 1,024 positions, seeds
/// 0 and 11-14, q4_s measured 0.60-0.69x. The bounds are the bar itself: q4_s at most 0.75x
/// q4_0's KL at the same 4.5 bits, q8_0 an order of magnitude below.
#[test]
fn q4_s_experts_on_the_reference_shape() {
    let types = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Iq4Nl, QuantType::Q4K, QuantType::Q4S];
    let kl = expert_kl(&kl_768(), env_or("KL_SEED", 1) as u64, env_or("KL_TOKENS", 512), &types);
    let ratio = |q: QuantType| kl[&q].mean_kl / kl[&QuantType::Q4_0].mean_kl;
    assert!(ratio(QuantType::Q4S) <= 0.75, "q4_s KL {:.3}x q4_0's", ratio(QuantType::Q4S));
    assert!(ratio(QuantType::Q8_0) <= 0.1, "q8_0 KL {:.3}x q4_0's", ratio(QuantType::Q8_0));
    assert!(ratio(QuantType::Q4S) < ratio(QuantType::Iq4Nl), "q4_s above iq4_nl");
    assert!(ratio(QuantType::Q4S) < ratio(QuantType::Q4K), "q4_s above q4_k");
}
