//! Tokenizer throughput: encode (with and without the word cache) and decode, on English prose,
//! source code and multilingual text, for Grok-1's model when `../shared/grok1/tokenizer.model`
//! exists and for a synthetic 131072-piece model always.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use grok1::tokenizer::{synth, Tokenizer};

#[rustfmt::skip]
const PROSE: &[&str] = &[
    "The", "answer", "to", "life,", "the", "universe", "and", "everything", "is", "of", "course", "forty-two.", "A",
    "mixture", "of", "experts", "routes", "each", "token", "to", "two", "of", "eight", "feed-forward", "networks;",
    "attention", "uses", "rotary", "position", "embeddings", "and", "grouped", "queries.", "We", "measured",
    "throughput", "in", "tokens", "per", "second", "on", "one", "workstation", "with", "plenty", "of", "memory",
    "bandwidth.", "However,", "nobody", "expected", "it", "to", "work", "the", "first", "time.",
];
const CODE: &str =
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|i| i * 2).collect();\n\tprintln!(\"{:?}\", v);\n}\n\
    def add(a, b):\n    return a + b  # 42\n";
#[rustfmt::skip]
const MULTI: &[&str] = &[
    "Привет мир, как дела?", "Καλημέρα κόσμε", "你好，世界。这是一个大模型。", "こんにちは世界", "안녕하세요 세계", "مرحبا بالعالم",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "naïve café résumé", "😀 🚀 👨‍👩‍👧 🇯🇵",
];

/// About `bytes` of text, as lines, built deterministically.
fn corpus(kind: &str, bytes: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut total = 0;
    let mut k = 0usize;
    while total < bytes {
        let line = match kind {
            "prose" => (0..24).map(|i| PROSE[(k * 7 + i * 13) % PROSE.len()]).collect::<Vec<_>>().join(" "),
            "code" => CODE.replace('\n', if k % 2 == 0 { "\r" } else { " " }),
            _ => (0..6).map(|i| MULTI[(k * 3 + i * 7) % MULTI.len()]).collect::<Vec<_>>().join(" "),
        };
        total += line.len() + 1;
        lines.push(line);
        k += 1;
    }
    lines
}

fn bench_model(c: &mut Criterion, name: &str, tok: &mut Tokenizer) {
    let mut group = c.benchmark_group(format!("tokenizer/{name}"));
    for kind in ["prose", "code", "multilingual"] {
        let lines = corpus(kind, 256 * 1024);
        let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        for cache in [true, false] {
            tok.set_word_cache(cache);
            let label = if cache { "encode" } else { "encode_no_word_cache" };
            let t = &*tok;
            group.bench_function(format!("{label}/{kind}"), |b| {
                b.iter(|| lines.iter().map(|l| t.encode(black_box(l), false, false).len()).sum::<usize>())
            });
        }
        tok.set_word_cache(true);
        let ids: Vec<Vec<u32>> = lines.iter().map(|l| tok.encode(l, false, false)).collect();
        let t = &*tok;
        group.bench_function(format!("decode/{kind}"), |b| {
            b.iter(|| ids.iter().map(|x| t.decode(black_box(x)).len()).sum::<usize>())
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/grok1/tokenizer.model");
    match Tokenizer::from_file(&path) {
        Ok(mut tok) => bench_model(c, "grok1", &mut tok),
        Err(_) => eprintln!("skipping the Grok-1 benchmarks: ../shared/grok1/tokenizer.model not found"),
    }
    let mut synthetic = Tokenizer::from_bytes(&synth::build_model(131072)).expect("synthetic model");
    bench_model(c, "synthetic131072", &mut synthetic);
    let model = std::fs::read(&path).ok();
    if let Some(bytes) = model {
        c.bench_function("tokenizer/grok1/load", |b| b.iter(|| Tokenizer::from_bytes(black_box(&bytes)).unwrap()));
    }
}

criterion_group!(tokenizer, benches);
criterion_main!(tokenizer);
