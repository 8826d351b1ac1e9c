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
