//! Uploading a converted model: the micro fixture converted in two type mixes, its dense tensors
//! and an expert on the GPU, each matrix's product against the CPU's `Matrix`.

use super::random;
use grok1::checkpoint;
use grok1::convert::{convert, ConvertOptions};
use grok1::format::ConvertedModel;
use grok1::gpu::plan::ModelBytes;
use grok1::gpu::{DenseWeights, DeviceExpert, DeviceMatrix};
use grok1::kernels::Matrix;
use grok1::quant::QuantType;
use std::path::{Path, PathBuf};

/// The GPU's product against the CPU's f32 reference for the same stored bytes: the matrix's
/// rows as the CPU dequantizes them, dotted with `x` in f64. The GPU keeps activations in f32,
/// so this is like with like (the CPU's own `matvec` quantizes `x` to int8, an error of its own
/// about 1/254 of the largest |x| per block that would hide a wrong upload). The bound is
/// `gpu_kernels/matrices.rs`'s: f32 accumulation error, a small fraction of sum |w x|. Plant a
/// fault (swap two rows in `DenseWeights::upload`, or upload one tensor's bytes for another) and
/// the row it moved fails.
fn check(gpu: &grok1::gpu::Gpu, what: &str, d: &DeviceMatrix, c: &Matrix) {
    assert_eq!((d.rows, d.cols, d.qtype), (c.rows, c.cols, c.qtype), "{what}");
    let x = random(c.cols, c.rows as u64, 1.0);
    let got = d.matvec_host(gpu, &x).unwrap();
    assert_eq!(got.len(), c.rows, "{what}");
    let mut row = vec![0f32; c.cols];
    for (r, g) in got.iter().enumerate() {
        c.row_f32(r, &mut row);
        let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mag: f64 = row.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
        assert!(
            (*g as f64 - want).abs() <= 1e-5 * mag + 1e-6,
            "{what} row {r}: GPU {g} vs CPU f32 reference {want} (sum |w x| {mag})"
        );
    }
}

#[test]
fn a_converted_model_uploads_and_multiplies_like_the_cpu() {
    let gpu = crate::gpu_or_skip!();
    // Built here, the executable may run from a copy of the repository elsewhere (the GPU check
    // script runs it from the copy's root).
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/micro/hf");
    let src = if built.exists() { built } else { PathBuf::from("tests/data/micro/hf") };
    let tmp = tempfile::tempdir().unwrap();
    for (dense, experts) in [(QuantType::Bf16, QuantType::Iq4Nl), (QuantType::Q8_0, QuantType::Q4_0)] {
        let dst = tmp.path().join(format!("{dense}-{experts}"));
        let s = checkpoint::open(&src, None).unwrap();
        let o = ConvertOptions { dense, experts, threads: 2, ..ConvertOptions::default() };
        convert(s.as_ref(), &dst, &o, &mut |_| {}).unwrap();
        let m = ConvertedModel::open(&dst).unwrap();
        let cpu = grok1::model::load::load_weights(&m, &mut |_| {}).unwrap();

        let mut stored = 0u64;
        let (w, stats) = DenseWeights::upload(&gpu, &m, &mut |b| stored += b).unwrap();
        let raw: u64 = m.manifest.dense.iter().map(|d| d.bytes).sum();
        assert_eq!(stats.tensors, m.manifest.dense.len());
        assert_eq!(stats.bytes, raw, "device bytes equal the stored dense bytes");
        assert_eq!(stored, raw);
        assert_eq!(w.nbytes(), raw);
        // The plan's count is the same bytes, rounded per buffer.
        let planned = ModelBytes::from_manifest(&m.manifest).dense_bytes();
        assert!(planned >= raw && planned < raw + 2 * 256 * stats.tensors as u64);
        eprintln!(
            "{dense}/{experts}: {} dense tensors, {} bytes in {:.3} s",
            stats.tensors, stats.bytes, stats.seconds
        );

        check(&gpu, "token_embd", &w.embedding, &cpu.embedding);
        for (l, (g, c)) in w.layers.iter().zip(&cpu.layers).enumerate() {
            check(&gpu, &format!("blk.{l}.attn_q"), &g.q, &c.q);
            check(&gpu, &format!("blk.{l}.attn_k"), &g.k, &c.k);
            check(&gpu, &format!("blk.{l}.attn_v"), &g.v, &c.v);
            check(&gpu, &format!("blk.{l}.attn_o"), &g.o, &c.o);
            let norm = gpu.download(&g.ffn_out_norm).unwrap();
            assert_eq!(norm, c.ffn_out_norm, "blk.{l}.ffn_out_norm");
            let router = Matrix::from_bytes(
                QuantType::F32,
                c.router.len() / norm.len(),
                norm.len(),
                &c.router.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
            )
            .unwrap();
            check(&gpu, &format!("blk.{l}.ffn_router"), &g.router, &router);
        }

        let mut raw = Vec::new();
        m.read_expert(1, 3, &mut raw).unwrap();
        let e = DeviceExpert::upload(&gpu, m.expert_chunk(1, 3), &raw).unwrap();
        let ce = cpu.expert(1, 3);
        check(&gpu, "expert 1.3 gate", &e.gate, &ce.gate);
        check(&gpu, "expert 1.3 up", &e.up, &ce.up);
        check(&gpu, "expert 1.3 down", &e.down, &ce.down);
        assert_eq!(e.nbytes(), ce.nbytes() as u64);
    }
}
