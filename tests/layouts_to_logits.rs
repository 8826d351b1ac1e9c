//! Every checkpoint layout (safetensors, the release's ckpt-0 pickles, PyTorch .bin in both
//! namings) converts losslessly and runs to the golden logits of its safetensors twin; ckpt-0's
//! int8 weights survive a q8_0 conversion without re-rounding.

mod common;

use common::{compare, micro_hf, micro_hpcai, tiny_hf, Fixture};
use grok1::convert::{convert, ConvertOptions};
use grok1::format::ConvertedModel;
use grok1::model::{KvCache, Model};
use grok1::quant::QuantType;
use std::path::{Path, PathBuf};

fn convert_dir(src: &Path, dst: &Path, experts: QuantType, dense: QuantType) -> grok1::convert::ConvertSummary {
    let s = grok1::checkpoint::open(src, None).unwrap();
    let o = ConvertOptions { experts, dense, threads: 2, ..ConvertOptions::default() };
    convert(s.as_ref(), dst, &o, &mut |_| {}).unwrap()
}

fn logits_of(dir: &Path, tokens: &[u32]) -> Vec<f32> {
    let m = ConvertedModel::open(dir).unwrap();
    let w = grok1::model::load::load_weights(&m, &mut |_| {}).unwrap();
    let model = Model::new(m.config().clone(), w).unwrap();
    let mut cache = KvCache::new(m.config(), tokens.len());
    model.prefill(tokens, &mut cache, true).unwrap()
}

fn check(name: &str, src: PathBuf, twin: &Fixture) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    convert_dir(&src, &dst, QuantType::Bf16, QuantType::Bf16);
    let a = compare(&twin.golden(), &logits_of(&dst, &twin.tokens().all));
    println!("{name}: max abs {:.2e} against {}'s golden logits", a.max_abs, twin.name);
    assert!(a.max_abs < 1e-4, "{name}: {}", a.max_abs);
}

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

#[test]
fn ckpt0_runs_to_the_golden_logits() {
    check("micro/ckpt0", Path::new(DATA).join("micro/ckpt0"), &micro_hf());
    if let Some(t) = tiny_hf() {
        check("tiny/ckpt0", t.dir.parent().unwrap().join("ckpt0"), &t);
    }
}

#[test]
fn torch_bin_runs_to_the_golden_logits() {
    check("bin/keyfan", Path::new(DATA).join("bin/keyfan"), &micro_hf());
    check("bin/hpcai", Path::new(DATA).join("bin/hpcai"), &micro_hpcai());
}

#[test]
fn ckpt0_int8_values_are_kept_by_q8() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("q8");
    let src = Path::new(DATA).join("micro/ckpt0");
    let summary = convert_dir(&src, &dst, QuantType::Q8_0, QuantType::Q8_0);
    // Every quantized tensor of the release (experts and attention) keeps its int8 values; the
    // embedding is f32 in the release, so its blocks are quantized here.
    let c = grok1::checkpoint::open(&src, None).unwrap();
    let cfg = c.config().clone();
    let emb_blocks = (cfg.vocab_size * cfg.d_model / 32) as u64;
    assert_eq!(summary.int8_blocks_kept, summary.q8_blocks - emb_blocks);
    // And dequantize to exactly int8 * scale.
    let m = ConvertedModel::open(&dst).unwrap();
    let t = grok1::checkpoint::Tensor::AttnO(1);
    let v = m.dense(&t.to_string()).unwrap();
    let (rows, cols) = (v.shape[0], v.shape[1]);
    let g = c.int8_groups(t).unwrap();
    let mut q = vec![0i8; rows * cols];
    let mut s = vec![0f32; rows * g];
    assert!(c.read_rows_int8(t, 0, &mut q, &mut s).unwrap());
    let rb = QuantType::Q8_0.row_bytes(cols).unwrap();
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        QuantType::Q8_0.dequantize_row(&v.bytes[r * rb..][..rb], &mut row);
        for k in 0..cols {
            assert_eq!(row[k], q[r * cols + k] as f32 * s[r * g + k / (cols / g)]);
        }
    }
}
