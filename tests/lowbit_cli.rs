//! The low-bit expert types end to end: a synthetic checkpoint converted with `--experts q3` and
//! `--experts q2` is verified and inspected, and runs through `grok1-run logits` and `generate`,
//! streamed under a memory budget as well as all in RAM; `plan` predicts both types.

mod common;

use grok1::npy;
use grok1::quant::QuantType;
use std::path::Path;
use std::process::{Command, Output};

fn convert_cli(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_grok1-convert")).args(args).output().unwrap();
    assert!(out.status.success(), "grok1-convert {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_grok1-run")).args(args).output().unwrap();
    assert!(out.status.success(), "grok1-run {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

const TOKENS: &str = "1,5,9,200,17,3,77,41,8,120,64,2";

/// Logits of `TOKENS` (prefill of 7, then cached decode) with `extra` options.
fn logits(model: &Path, out: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--tokens", TOKENS, "--out", out.to_str().unwrap()];
    args.extend_from_slice(&["--decode-from", "7"]);
    args.extend_from_slice(extra);
    run(&args);
    std::fs::read(out).unwrap()
}

#[test]
fn q3_and_q2_experts_convert_run_and_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    convert_cli(&["synth", "--preset", "tiny", ck.to_str().unwrap()]);
    let reference = tmp.path().join("q8");
    convert_cli(&["convert", ck.to_str().unwrap(), reference.to_str().unwrap(), "--experts", "q8", "--dense", "q8"]);
    let want = npy::read(&{
        let p = tmp.path().join("q8.npy");
        logits(&reference, &p, &[]);
        p
    })
    .unwrap();
    let mut kls = Vec::new();
    for (short, qtype) in [("q3", QuantType::Q3S), ("q2", QuantType::Q2S)] {
        let m = tmp.path().join(short);
        convert_cli(&["convert", ck.to_str().unwrap(), m.to_str().unwrap(), "--experts", short, "--dense", "q8"]);
        let converted = grok1::format::ConvertedModel::open(&m).unwrap();
        assert_eq!(converted.manifest.quant.experts, qtype);
        // Every expert row of the tiny preset (256 or 1024 inputs) is whole super-blocks.
        for c in &converted.manifest.experts {
            assert!(c.tensors.iter().all(|t| t.qtype == qtype), "{:?}", c.tensors);
        }
        convert_cli(&["verify", m.to_str().unwrap()]);
        let shown = convert_cli(&["inspect", m.to_str().unwrap()]);
        assert!(String::from_utf8_lossy(&shown.stdout).contains(qtype.name()), "inspect names {qtype}");

        let npy_path = tmp.path().join(format!("{short}.npy"));
        let all_in_ram = logits(&m, &npy_path, &[]);
        let got = npy::read(&npy_path).unwrap();
        assert_eq!(got.shape, want.shape);
        assert!(got.data.iter().all(|v| v.is_finite()), "{qtype}: logits finite");
        let agreement = common::compare(&want, &got.data.iter().map(|&v| v as f32).collect::<Vec<_>>());
        eprintln!("{qtype} experts against q8: {agreement:?}");
        kls.push(agreement.mean_kl);
        // The residency store streams the same bytes into the same kernels: bit-identical.
        let per_layer = grok1::model::load::expert_bytes(&converted);
        let one_per_layer = (per_layer * converted.config().n_layers).to_string();
        assert_eq!(logits(&m, &npy_path, &["--ram-budget", &one_per_layer]), all_in_ram, "{qtype} streamed");
        assert_eq!(logits(&m, &npy_path, &["--no-expert-cache"]), all_in_ram, "{qtype} without a cache");

        let model = m.to_str().unwrap();
        let out = run(&["generate", "--model", model, "--prompt", "The answer is", "-n", "6", "--temperature", "0"]);
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("The answer is"));

        let plan = run(&["plan", "--ram", "128GB", "--experts", short, "--json"]);
        let text = String::from_utf8_lossy(&plan.stdout);
        assert!(text.contains(qtype.name()), "plan --experts {short}: {text}");
    }
    // Fewer bits, more error: q3_s's experts stay closer to q8_0's than q2_s's.
    assert!(kls[0] < kls[1], "mean KL q3_s {} vs q2_s {}", kls[0], kls[1]);
}
