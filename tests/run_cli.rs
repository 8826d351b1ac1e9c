//! The runner end to end through the converted format and the CLI: `grok1-convert convert` with
//! lossless settings, then `grok1-run logits` (prefill, cached decode, and mixed) matches the
//! golden logits, and `grok1-run generate` reproduces the greedy continuation.

mod common;

use common::{all_fixtures, compare, Fixture};
use std::path::Path;
use std::process::Command;

fn convert(f: &Fixture, dst: &Path, experts: &str, dense: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_grok1-convert"))
        .arg("convert")
        .arg(&f.dir)
        .arg(dst)
        .args(["--experts", experts, "--dense", dense])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn run(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_grok1-run")).args(args).output().unwrap();
    assert!(out.status.success(), "grok1-run {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn ids(v: &[u32]) -> String {
    v.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn converted_fixtures_match_the_golden_logits_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    for f in all_fixtures() {
        let dst = tmp.path().join(f.name.replace('/', "-"));
        convert(&f, &dst, "bf16", "bf16");
        let model = dst.to_str().unwrap();
        let tokens = f.tokens();
        let golden = f.golden();
        let all = ids(&tokens.all);
        for decode_from in [tokens.all.len(), tokens.prompt.len(), 1, 5] {
            let out = tmp.path().join("logits.npy");
            let k = decode_from.to_string();
            run(&["logits", "--model", model, "--tokens", &all, "--out", out.to_str().unwrap(), "--decode-from", &k]);
            let ours = grok1::npy::read(&out).unwrap();
            assert_eq!(ours.shape, golden.shape);
            let ours: Vec<f32> = ours.data.iter().map(|&x| x as f32).collect();
            let a = compare(&golden, &ours);
            println!("{} decode-from {decode_from}: max abs {:.2e}", f.name, a.max_abs);
            assert!(a.max_abs < 1e-4, "{} decode-from {decode_from}: max abs {}", f.name, a.max_abs);
        }
        if f.own_continuation {
            let n = tokens.continuation.len().to_string();
            let out = run(&["generate", "--model", model, "--tokens", &ids(&tokens.prompt), "-n", &n]);
            let text = String::from_utf8_lossy(&out.stdout);
            let generated: Vec<u32> = text
                .split("->")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .map(|t| t.parse().unwrap())
                .collect();
            assert_eq!(generated, tokens.continuation, "{}", f.name);
            assert!(String::from_utf8_lossy(&out.stderr).contains("tok/s"));
        }
    }
}

#[test]
fn bad_requests_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let f = common::micro_hf();
    let dst = tmp.path().join("m");
    convert(&f, &dst, "q8", "bf16");
    let model = dst.to_str().unwrap();
    let fail = |args: &[&str], needle: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_grok1-run")).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(needle), "{args:?}: {e}");
    };
    fail(&["generate", "--model", model, "--tokens", "1,2,9999"], "outside the vocabulary");
    fail(&["generate", "--model", model, "--prompt", "hello"], "no tokenizer.model");
    fail(&["generate", "--model", "/nonexistent/model", "--tokens", "1"], "manifest.json");
    // A damaged shard that still has the right length loads (verify finds it), but a truncated one
    // is refused at open, naming the file.
    let shard = dst.join("experts-00000.bin");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len - 1).unwrap();
    fail(&["generate", "--model", model, "--tokens", "1,2"], "experts-00000.bin");
}
