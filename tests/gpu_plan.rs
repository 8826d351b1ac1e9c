//! The parts of the GPU tier that need no GPU: budget parsing and planning, the device layout of
//! every block type, and the kernel list. Run in every build.

use grok1::config::GrokConfig;
use grok1::format::manifest::Manifest;
use grok1::gpu::layout::{has_scale_array, repack};
use grok1::gpu::plan::{
    default_budget, default_ranking, parse_bytes, plan, scratch_bytes, tensor_device_bytes, ModelBytes,
};
use grok1::gpu::source;
use grok1::quant::QuantType;
use std::collections::BTreeSet;

#[test]
fn byte_counts_parse() {
    assert_eq!(parse_bytes("0").unwrap(), 0);
    assert_eq!(parse_bytes("4096").unwrap(), 4096);
    assert_eq!(parse_bytes("20G").unwrap(), 20 << 30);
    assert_eq!(parse_bytes("20GiB").unwrap(), 20 << 30);
    assert_eq!(parse_bytes("24GB").unwrap(), 24_000_000_000);
    assert_eq!(parse_bytes("1.5g").unwrap(), 3 << 29);
    assert_eq!(parse_bytes(" 512 MiB ").unwrap(), 512 << 20);
    assert_eq!(parse_bytes("2K").unwrap(), 2048);
    assert_eq!(parse_bytes("3kb").unwrap(), 3000);
    assert_eq!(parse_bytes("1T").unwrap(), 1 << 40);
    for bad in ["", "G", "-1G", "1..2G", "12XB", "1e3", "nan", "99999999999999999999T"] {
        let e = parse_bytes(bad).unwrap_err().to_string();
        assert!(e.contains("not a byte count"), "{bad}: {e}");
    }
}

#[test]
fn default_budget_keeps_a_margin() {
    // 80 GB card with 79 GB free: 5% of the card (4 GB) is kept.
    assert_eq!(default_budget(79_000_000_000, 80_000_000_000), 75_000_000_000);
    // Small card: at least 1 GiB is kept.
    assert_eq!(default_budget(8 << 30, 8 << 30), 7 << 30);
    // Less free than the margin: nothing.
    assert_eq!(default_budget(512 << 20, 16 << 30), 0);
}

/// A manifest with the given config and types, with every tensor present (placements are
/// irrelevant to the plan, so they all point at offset 0 of one shard per kind).
fn manifest(c: &GrokConfig, dense_q: QuantType, expert_q: QuantType) -> Manifest {
    use grok1::checkpoint::{Proj, Tensor};
    use grok1::format::manifest::*;
    let shards = vec![
        ShardEntry {
            file: "dense-00000.bin".into(),
            kind: ShardKind::Dense,
            bytes: u64::MAX / 4,
            sha256: String::new(),
        },
        ShardEntry {
            file: "experts-00000.bin".into(),
            kind: ShardKind::Experts,
            bytes: u64::MAX / 4,
            sha256: String::new(),
        },
    ];
    let dense = Tensor::dense(c)
        .into_iter()
        .map(|t| {
            let shape = t.shape(c);
            let q = if shape.len() == 1 || matches!(t, Tensor::Router(_)) { QuantType::F32 } else { dense_q };
            let rows: usize = shape[..shape.len() - 1].iter().product();
            let bytes = (rows * q.row_bytes(*shape.last().unwrap()).unwrap()) as u64;
            DenseEntry {
                name: t.to_string(),
                qtype: q,
                shape,
                shard: 0,
                offset: 0,
                bytes,
                sha256: String::new(),
                xxh3: None,
            }
        })
        .collect();
    let mut experts = Vec::new();
    for layer in 0..c.n_layers {
        for expert in 0..c.n_experts {
            let tensors: Vec<ChunkTensor> = Proj::ALL
                .iter()
                .map(|&proj| {
                    let shape = Tensor::Expert { layer, expert, proj }.shape(c);
                    let bytes = (shape[0] * expert_q.row_bytes(shape[1]).unwrap()) as u64;
                    ChunkTensor {
                        proj: proj.into(),
                        qtype: expert_q,
                        shape,
                        offset: 0,
                        bytes,
                        sha256: String::new(),
                    }
                })
                .collect();
            let raw: u64 = tensors.iter().map(|t| t.bytes).sum();
            experts.push(ExpertChunk {
                layer,
                expert,
                shard: 1,
                offset: 0,
                bytes: raw,
                raw_bytes: raw,
                compression: Compression::None,
                sha256: String::new(),
                xxh3: None,
                tensors,
            });
        }
    }
    Manifest {
        format: grok1::format::FORMAT_NAME.into(),
        version: grok1::format::FORMAT_VERSION,
        config: c.clone(),
        quant: QuantChoice { dense: dense_q, experts: expert_q, compression: Compression::None },
        source: "test".into(),
        chunk_align: 4096,
        shards,
        dense,
        experts,
        tokenizer: None,
        calibration: None,
        expert_mix: None,
    }
}

#[test]
fn grok1_sizes_on_the_device() {
    let c = GrokConfig::default();
    let m = manifest(&c, QuantType::Q8_0, QuantType::Iq4Nl);
    m.check_consistent().unwrap();
    let b = ModelBytes::from_manifest(&m);
    // An iq4_nl expert: 3 matrices of 6144 x 32768 at 18 bytes per 32 weights, each split into
    // quants (16/18) and scales (2/18), all multiples of 256 bytes.
    assert_eq!(b.experts[0], 3 * 6144 * 32768 / 32 * 18);
    assert!(b.experts.iter().all(|&e| e == b.experts[0]));
    // Dense q8_0: attention 64 x (2 x 6144^2 + 2 x 1024 x 6144) and the embedding, at 34 bytes
    // per 32, plus f32 norms and routers (each vector rounded up to 256 bytes).
    let attn: u64 = 64 * (2 * 6144 * 6144 + 2 * 1024 * 6144) + 131072 * 6144;
    let vectors: u64 = (64 * 4 + 1) * 6144 * 4 + 64 * 8 * 6144 * 4;
    assert_eq!(b.dense_bytes(), attn / 32 * 34 + vectors);
    // f32 K and V of 64 layers, 8 heads of 128.
    assert_eq!(b.kv_bytes_per_token, 64 * 2 * 8 * 128 * 4);
}

#[test]
fn device_bytes_round_each_buffer() {
    // 3 x 32 q8_0 weights: 96 quant bytes and 6 scale bytes, two 256-byte buffers.
    assert_eq!(tensor_device_bytes(QuantType::Q8_0, &[1, 96], 102), 512);
    assert_eq!(tensor_device_bytes(QuantType::Bf16, &[3, 5], 30), 256);
    assert_eq!(tensor_device_bytes(QuantType::Q4K, &[2, 256], 288), 512);
    assert_eq!(tensor_device_bytes(QuantType::Q4S, &[2, 256], 288), 512);
}

fn small() -> GrokConfig {
    GrokConfig {
        vocab_size: 1000,
        d_model: 256,
        ffn_size: 512,
        n_layers: 4,
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        n_experts: 8,
        n_experts_per_token: 2,
        ..GrokConfig::default()
    }
}

#[test]
fn plan_places_dense_first_then_experts_by_rank() {
    let c = small();
    let b = ModelBytes::from_manifest(&manifest(&c, QuantType::Bf16, QuantType::Q8_0));
    let e = b.experts[0];
    let (kv_tokens, batch) = (128, 32);
    let base = b.kv_bytes_per_token * kv_tokens as u64 + scratch_bytes(&c, batch) + b.dense_bytes();
    let ranking = vec![(3, 7), (0, 0), (3, 7), (1, 2), (2, 5)];

    // Room for exactly two experts and a bit.
    let p = plan(&b, &c, base + 2 * e + e / 2, &ranking, kv_tokens, batch).unwrap();
    assert!(p.uses_gpu());
    assert_eq!(p.experts, vec![(3, 7), (0, 0)]);
    assert!(p.holds(3, 7) && p.holds(0, 0) && !p.holds(1, 2));
    assert_eq!(p.used(), base + 2 * e);
    assert!(p.used() <= p.budget);

    // Unlimited: every ranked expert once, none unranked.
    let p = plan(&b, &c, u64::MAX / 2, &ranking, kv_tokens, batch).unwrap();
    assert_eq!(p.experts, vec![(3, 7), (0, 0), (1, 2), (2, 5)]);
    assert_eq!(p.expert_bytes, 4 * e);

    // The default ranking spreads experts over the layers.
    let all = default_ranking(c.n_layers, c.n_experts);
    assert_eq!(all.len(), 32);
    assert_eq!(&all[..5], &[(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]);
    let p = plan(&b, &c, base + 6 * e, &all, kv_tokens, batch).unwrap();
    assert_eq!(p.experts.len(), 6);
    assert!((p.expert_share() - 6.0 / 32.0).abs() < 1e-12);
    let p = plan(&b, &c, u64::MAX / 2, &all, kv_tokens, batch).unwrap();
    assert_eq!(p.experts.len(), 32);
}

#[test]
fn plan_refuses_a_budget_without_room_for_dense() {
    let c = small();
    let b = ModelBytes::from_manifest(&manifest(&c, QuantType::Q8_0, QuantType::Q8_0));
    let p = plan(&b, &c, b.dense_bytes(), &default_ranking(4, 8), 64, 16).unwrap();
    assert!(!p.uses_gpu());
    assert_eq!(p.used(), 0);
    assert!(p.experts.is_empty() && !p.holds(0, 0));
    let why = p.refused.unwrap();
    assert!(why.contains("dense weights") && why.contains("KV cache for 64 tokens"), "{why}");
    let p = plan(&b, &c, 0, &[], 64, 16).unwrap();
    assert!(!p.uses_gpu());
}

#[test]
fn plan_rejects_rankings_outside_the_model() {
    let c = small();
    let b = ModelBytes::from_manifest(&manifest(&c, QuantType::Q8_0, QuantType::Q8_0));
    for bad in [(4, 0), (0, 8)] {
        let e = plan(&b, &c, u64::MAX / 2, &[(0, 0), bad], 64, 16).unwrap_err().to_string();
        assert!(e.contains(&format!("(layer {}, expert {})", bad.0, bad.1)), "{e}");
    }
}

/// Deterministic pseudo-random weights with a few large ones.
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
            if i % 97 == 0 {
                8.0 * u
            } else {
                u
            }
        })
        .collect()
}

#[test]
fn device_layout_reads_back_every_block_type() {
    for q in QuantType::ALL {
        if grok1::gpu::layout::unsupported(q).is_some() {
            continue; // no device kernel: such matrices stay on the CPU
        }
        let shapes: &[(usize, usize)] = match q {
            QuantType::Q4K | QuantType::Q4S => &[(1, 256), (3, 768)],
            QuantType::F32 | QuantType::Bf16 => &[(1, 1), (3, 7), (5, 33)],
            _ => &[(1, 32), (3, 96), (7, 288)],
        };
        for &(rows, cols) in shapes {
            let rb = q.row_bytes(cols).unwrap();
            let w = weights(rows * cols, (rows * 131 + cols) as u64);
            let mut bytes = vec![0u8; rows * rb];
            for (r, o) in w.chunks_exact(cols).zip(bytes.chunks_exact_mut(rb)) {
                q.quantize_row(r, o);
            }
            let l = repack(q, rows, cols, &bytes).unwrap();
            assert_eq!(l.nbytes(), bytes.len(), "{q}");
            assert_eq!(l.d.is_empty(), !has_scale_array(q));
            let (mut want, mut got) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                q.dequantize_row(&bytes[r * rb..(r + 1) * rb], &mut want);
                l.dequantize_row(r, &mut got);
                assert_eq!(want, got, "{q} [{rows}, {cols}] row {r}");
            }
            // The quants of a row are one run starting at a 16-byte boundary.
            if has_scale_array(q) {
                assert_eq!(l.w.len() % rows, 0);
                assert_eq!((l.w.len() / rows) % 16, 0, "{q}");
            }
        }
    }
}

#[test]
fn repack_rejects_wrong_sizes() {
    let e = repack(QuantType::Q8_0, 2, 33, &[0; 68]).unwrap_err().to_string();
    assert!(e.contains("not a whole number of q8_0 blocks"), "{e}");
    let e = repack(QuantType::Q8_0, 2, 32, &[0; 67]).unwrap_err().to_string();
    assert!(e.contains("needs 68 bytes, got 67"), "{e}");
}

#[test]
fn every_kernel_is_defined_once() {
    let defined: Vec<String> = source::defined_kernels();
    let set: BTreeSet<&str> = defined.iter().map(|s| s.as_str()).collect();
    assert_eq!(set.len(), defined.len(), "a kernel is defined twice: {defined:?}");
    let wanted: BTreeSet<&str> = source::kernel_names().into_iter().collect();
    assert_eq!(set, wanted);
    // The program is the files in order, so later files can use earlier ones.
    let p = source::program();
    let pos: Vec<usize> = source::FILES.iter().map(|(_, t)| p.find(t).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn without_the_feature_the_gpu_is_unavailable() {
    let r = grok1::gpu::available();
    if cfg!(feature = "cuda") {
        // Either a GPU is found or there is a reason; both are fine here.
        if let Err(why) = r {
            assert!(!why.is_empty());
        }
    } else {
        assert_eq!(r.unwrap_err(), "built without the cuda feature");
    }
}

#[test]
fn launch_geometry_covers_every_row_and_token() {
    use grok1::gpu::launch;
    for (rows, n) in [(1usize, 1usize), (3, 2), (64, 64), (65, 67), (32768, 1)] {
        let g = launch::matvec(rows, n);
        assert!(g.block as usize / 32 * g.grid.0 as usize >= rows);
        assert!(g.grid.0 as usize * (g.block as usize / 32) < rows + g.block as usize / 32);
        assert_eq!(g.grid.1 as usize, n);
        let g = launch::matmul(rows, n);
        assert!(g.grid.0 as usize * launch::MM_BM >= rows && g.grid.1 as usize * launch::MM_BN >= n);
        assert_eq!(g.block, 256, "matmul.cu assumes 256 threads: 64 x 64 outputs, 16 per thread");
    }
    // Attention's scores and query fit the default shared memory, with the static scratch.
    let keys = launch::attention_max_keys(128);
    assert!(keys >= 8192, "Grok's context must fit one launch");
    let g = launch::attention(48, 1, 128, keys);
    assert!(g.shared_bytes as usize + 128 <= launch::SHARED_DEFAULT);
}

#[test]
fn stats_report_per_token() {
    use grok1::gpu::stats::GpuStats;
    let mut s = GpuStats::default();
    // Two decode tokens of a 4-layer top-2 model; the GPU holds 3 of each token's 8 experts.
    for _ in 0..2 {
        s.tokens += 1;
        for _ in 0..4 {
            s.add_layer(2, if s.experts_chosen % 4 == 0 { 1 } else { 0 });
        }
        s.add_h2d_floats(4 * 256 + 256);
        s.add_d2h_floats(4 * 256 + 1000);
    }
    s.gpu_seconds = 0.004;
    s.cpu_expert_seconds = 0.010;
    let r = s.report();
    assert_eq!(s.experts_chosen, 16);
    assert!((r.gpu_expert_hit_rate - s.experts_on_gpu as f64 / 16.0).abs() < 1e-12);
    assert_eq!(r.pcie_h2d_bytes_per_token, (4 * (4 * 256 + 256)) as f64);
    assert_eq!(r.pcie_d2h_bytes_per_token, (4 * (4 * 256 + 1000)) as f64);
    assert!((r.gpu_ms_per_token - 2.0).abs() < 1e-9 && (r.cpu_expert_ms_per_token - 5.0).abs() < 1e-9);
    let before = s;
    s.tokens += 1;
    s.add_layer(2, 2);
    let d = (s - before).report();
    assert_eq!((d.gpu_expert_hit_rate, d.gpu_experts_per_token), (1.0, 2.0));
    // The JSON keys the GPU check script's table picks up.
    let j = serde_json::to_string(&d).unwrap();
    assert!(j.contains("\"gpu_expert_hit_rate\"") && j.contains("\"pcie_h2d_bytes_per_token\""), "{j}");
}
