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

#[test]
fn tokenize_and_detokenize_with_the_real_tokenizer() {
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/grok1/tokenizer.model");
    if !tok.exists() {
        eprintln!("skipping: {} not found (the real Grok-1 tokenizer is not in the repository)", tok.display());
        return;
    }
    let t = tok.to_str().unwrap();
    let out = run(&["tokenize", "--tokenizer", t, "Hello, world!"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[11770,130111,1135,130166]");
    let out = run(&["tokenize", "--tokenizer", t, "--pieces", " Hello"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[\"▁▁\",\"Hello\"]");
    let tmp = tempfile::tempdir().unwrap();
    let lines = tmp.path().join("lines.txt");
    std::fs::write(&lines, "12345 3.14159\n\n<|separator|>\r\n").unwrap();
    let out = run(&["tokenize", "--tokenizer", t, "--file", lines.to_str().unwrap()]);
    let got: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(got[0], "[130089,15,16,17,18,19,130089,17,130109,15,18,15,19,23]");
    assert_eq!(got[1], "[]");
    assert_eq!(got.len(), 3);
    let out = run(&["detokenize", "--tokenizer", t, "422,3033,356,1180,333,9072,360,2175,391,359,1805"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'),
        "The answer to life the universe and everything is of course"
    );
}

#[test]
fn a_synthetic_model_generates_from_a_prompt_and_checks_its_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let m = tmp.path().join("m");
    let conv = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_grok1-convert")).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    conv(&["synth", "--preset", "tiny", ck.to_str().unwrap()]);
    conv(&["convert", ck.to_str().unwrap(), m.to_str().unwrap(), "--experts", "q4", "--dense", "q8"]);
    // `q4` is q4_s; every expert row of the tiny preset (256 or 1024 inputs) is whole super-blocks.
    let converted = grok1::format::ConvertedModel::open(&m).unwrap();
    assert_eq!(converted.manifest.quant.experts, grok1::quant::QuantType::Q4S);
    for c in &converted.manifest.experts {
        assert!(c.tensors.iter().all(|t| t.qtype == grok1::quant::QuantType::Q4S), "{:?}", c.tensors);
    }
    let model = m.to_str().unwrap();
    let out = run(&["generate", "--model", model, "--prompt", "The answer is", "-n", "8", "--temperature", "0.7", "--seed", "3"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("The answer is"));
    // Same seed, same text; temperature 0 is deterministic too.
    let again = run(&["generate", "--model", model, "--prompt", "The answer is", "-n", "8", "--temperature", "0.7", "--seed", "3"]);
    assert_eq!(out.stdout, again.stdout);
    let out = run(&["tokenize", "--model", model, "hello world"]);
    let encoded: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    let back = run(&["detokenize", "--model", model, &ids(&encoded)]);
    assert_eq!(String::from_utf8_lossy(&back.stdout).trim_end_matches('\n'), "hello world");
    // A tokenizer that does not match the manifest's sha256 is refused.
    let tf = m.join("tokenizer.model");
    let mut b = std::fs::read(&tf).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&tf, b).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_grok1-run"))
        .args(["generate", "--model", model, "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sha256"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Streaming experts under a memory budget changes nothing numerically: the logits with a budget
/// of one expert per layer (and with no cache at all, through each read path) are bit-identical
/// to the all-in-RAM run.
#[test]
fn expert_budgets_do_not_change_the_logits() {
    let Some(f) = common::tiny_hf().or_else(|| Some(common::micro_hf())) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    convert(&f, &dst, "q8", "q8");
    let model = dst.to_str().unwrap();
    let m = grok1::format::ConvertedModel::open(&dst).unwrap();
    let per_layer = grok1::model::load::expert_bytes(&m);
    let layers = m.config().n_layers;
    let tokens = ids(&f.tokens().all);
    let logits = |extra: &[&str]| -> Vec<u8> {
        let out = tmp.path().join("l.npy");
        let mut args = vec!["logits", "--model", model, "--tokens", &tokens, "--out", out.to_str().unwrap(), "--decode-from", "7"];
        args.extend_from_slice(extra);
        run(&args);
        std::fs::read(&out).unwrap()
    };
    let all_in_ram = logits(&[]);
    let one_per_layer = (per_layer * layers).to_string();
    assert_eq!(logits(&["--ram-budget", &one_per_layer]), all_in_ram, "one expert per layer");
    assert_eq!(logits(&["--ram-budget", &one_per_layer, "--no-prefetch"]), all_in_ram);
    for path in ["direct", "pread", "mmap"] {
        assert_eq!(logits(&["--no-expert-cache", "--read-path", path]), all_in_ram, "{path}");
    }
    let everything = (per_layer * layers * m.config().n_experts).to_string();
    assert_eq!(logits(&["--ram-budget", &everything]), all_in_ram, "budget holding everything");
}
