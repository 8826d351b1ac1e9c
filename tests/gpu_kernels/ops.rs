//! Element-wise ops, the KV cache and attention on the GPU against `model::ops` and
//! `model::attention::attend`.

use super::{max_diff, random};
use grok1::config::GrokConfig;
use grok1::gpu::{AttnShape, DeviceKvCache};
use grok1::model::attention::{attend, AttnParams, AttnScratch};
use grok1::model::ops;

#[test]
fn rms_norm_matches_with_and_without_the_residual_add() {
    let gpu = crate::gpu_or_skip!();
    for d in [1usize, 7, 64, 1000, 6144] {
        let n = 3;
        let x = random(n * d, d as u64, 2.0);
        let scale = random(d, d as u64 + 1, 1.5);
        let acc0 = random(n * d, d as u64 + 2, 1.0);
        let (mut want, mut want_acc) = (vec![0f32; n * d], acc0.clone());
        let mut tmp = vec![0f32; d];
        ops::rms_norm_rows(&x, &scale, 1e-5, &mut want);
        ops::add_rms_norm_rows(&mut want_acc, &x, &scale, 1e-5, &mut tmp);
        let (xd, sd) = (gpu.upload(&x).unwrap(), gpu.upload(&scale).unwrap());
        let mut out = gpu.zeros::<f32>(n * d).unwrap();
        gpu.rms_norm_rows(&xd.as_view(), &sd.as_view(), &mut out.as_view_mut(), d, 1e-5, false).unwrap();
        let got = gpu.download(&out).unwrap();
        let (e, i) = max_diff(&got, &want);
        assert!(e <= 2e-6 * want[i].abs().max(1.0), "d={d}: {} vs {} at {i}", got[i], want[i]);
        let mut acc = gpu.upload(&acc0).unwrap();
        gpu.rms_norm_rows(&xd.as_view(), &sd.as_view(), &mut acc.as_view_mut(), d, 1e-5, true).unwrap();
        let got = gpu.download(&acc).unwrap();
        let (e, i) = max_diff(&got, &want_acc);
        assert!(e <= 2e-6 * want_acc[i].abs().max(1.0), "d={d} accumulate: {} vs {}", got[i], want_acc[i]);
    }
}

#[test]
fn rope_matches_at_short_and_long_positions() {
    let gpu = crate::gpu_or_skip!();
    for (hd, heads, pos0) in [(6usize, 3usize, 0usize), (16, 5, 17), (128, 4, 0), (128, 3, 8190)] {
        let n = 5;
        let x = random(n * heads * hd, (hd + pos0) as u64, 3.0);
        let mut want = x.clone();
        let (mut c, mut s) = (vec![0f32; hd / 2], vec![0f32; hd / 2]);
        for t in 0..n {
            ops::rope_phases(pos0 + t, hd, 1e4, &mut c, &mut s);
            ops::rope_in_place(&mut want[t * heads * hd..][..heads * hd], hd, &c, &s);
        }
        let mut xd = gpu.upload(&x).unwrap();
        gpu.rope(&mut xd.as_view_mut(), n, heads, hd, pos0, 1e4).unwrap();
        let got = gpu.download(&xd).unwrap();
        let (e, i) = max_diff(&got, &want);
        assert!(e <= 4e-6, "hd={hd} pos0={pos0}: {} vs {} at {i}", got[i], want[i]);
    }
}

#[test]
fn softmax_matches_including_masked_entries() {
    let gpu = crate::gpu_or_skip!();
    for len in [1usize, 5, 300, 4097] {
        let n = 4;
        let mut x = random(n * len, len as u64, 20.0);
        for (i, v) in x.iter_mut().enumerate() {
            if i % 7 == 3 {
                *v = -1e30;
            }
        }
        let mut want = x.clone();
        for r in want.chunks_exact_mut(len) {
            ops::softmax(r);
        }
        let mut xd = gpu.upload(&x).unwrap();
        gpu.softmax_rows(&mut xd.as_view_mut(), len).unwrap();
        let got = gpu.download(&xd).unwrap();
        let (e, i) = max_diff(&got, &want);
        assert!(e <= 1e-6, "len={len}: {} vs {} at {i}", got[i], want[i]);
    }
}

#[test]
fn gelu_and_geglu_match() {
    let gpu = crate::gpu_or_skip!();
    let n = 100_003;
    let g = random(n, 5, 6.0);
    let u = random(n, 6, 2.0);
    let want_gelu: Vec<f32> = g.iter().map(|&v| ops::gelu_tanh(v)).collect();
    let want_geglu: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| ops::gelu_tanh(a) * b).collect();
    let mut gd = gpu.upload(&g).unwrap();
    gpu.gelu_tanh(&mut gd.as_view_mut()).unwrap();
    let got = gpu.download(&gd).unwrap();
    let (e, i) = max_diff(&got, &want_gelu);
    assert!(e <= 2e-6 * want_gelu[i].abs().max(1.0), "gelu({}): {} vs {}", g[i], got[i], want_gelu[i]);
    let mut gd = gpu.upload(&g).unwrap();
    let ud = gpu.upload(&u).unwrap();
    gpu.geglu(&mut gd.as_view_mut(), &ud.as_view()).unwrap();
    let got = gpu.download(&gd).unwrap();
    let (e, i) = max_diff(&got, &want_geglu);
    assert!(e <= 2e-6 * want_geglu[i].abs().max(1.0), "geglu: {} vs {}", got[i], want_geglu[i]);
}

#[test]
fn gather_and_scatter_add_route_rows() {
    let gpu = crate::gpu_or_skip!();
    let (n_tok, d) = (9usize, 101usize);
    let src = random(n_tok * d, 8, 1.0);
    let idx: Vec<i32> = vec![7, 0, 4, 8];
    let gates = vec![0.25f32, 0.5, 0.125, 1.0];
    let (sd, id, gd) = (gpu.upload(&src).unwrap(), gpu.upload(&idx).unwrap(), gpu.upload(&gates).unwrap());
    let mut rows = gpu.zeros::<f32>(idx.len() * d).unwrap();
    gpu.gather_rows(&sd.as_view(), &id.as_view(), &mut rows.as_view_mut(), d).unwrap();
    let got = gpu.download(&rows).unwrap();
    for (i, &t) in idx.iter().enumerate() {
        assert_eq!(&got[i * d..][..d], &src[t as usize * d..][..d]);
    }
    let acc0 = random(n_tok * d, 9, 1.0);
    let mut acc = gpu.upload(&acc0).unwrap();
    gpu.scatter_add_rows(&rows.as_view(), &id.as_view(), &gd.as_view(), &mut acc.as_view_mut(), d).unwrap();
    let got = gpu.download(&acc).unwrap();
    let mut want = acc0.clone();
    for (i, &t) in idx.iter().enumerate() {
        ops::axpy(gates[i], &src[t as usize * d..][..d], &mut want[t as usize * d..][..d]);
    }
    let (e, _) = max_diff(&got, &want);
    assert!(e <= 1e-6, "scatter_add: {e}");
}

fn config(n_q: usize, n_kv: usize, hd: usize) -> GrokConfig {
    GrokConfig {
        n_layers: 2,
        n_q_heads: n_q,
        n_kv_heads: n_kv,
        head_dim: hd,
        d_model: n_q * hd,
        ..GrokConfig::default()
    }
}

/// Prefill a prompt with pad tokens (the first one too, so query 0 sees no key), then decode
/// single tokens; after every call the GPU's output matches the CPU's `attend` over the same
/// cache contents.
#[test]
fn attention_matches_the_cpu_through_prefill_and_decode() {
    let gpu = crate::gpu_or_skip!();
    for (n_q, n_kv, hd) in [(4usize, 2usize, 16usize), (6, 2, 128), (48, 8, 128), (3, 3, 6)] {
        let c = config(n_q, n_kv, hd);
        let shape = AttnShape::from_config(&c);
        let p = AttnParams::from_config(&c);
        let cap = 64;
        let (qd, kvd) = (n_q * hd, n_kv * hd);
        let mut dev = DeviceKvCache::new(&gpu, &c, cap).unwrap();
        let mut k_cpu = vec![0f32; n_kv * cap * hd];
        let mut v_cpu = vec![0f32; n_kv * cap * hd];
        let mut valid = Vec::new();
        let mut scratch = AttnScratch::default();
        let layer = 1;
        let steps: Vec<Vec<u32>> = vec![
            vec![
                0, 5, 9, 0, 0, 12, 7, 3, 0, 44, 2, 8, 1, 13, 0, 6, 17, 21, 5, 9, 11, 3, 3, 4, 0, 99, 5, 6, 7,
                8, 9, 10, 11, 12, 13, 14, 15,
            ],
            vec![3],
            vec![0],
            vec![8, 9],
        ];
        let mut p0 = 0;
        for (si, toks) in steps.iter().enumerate() {
            let t = toks.len();
            let seed = (si * 1000 + hd * 10 + n_q) as u64;
            // Large enough that some logits reach the soft-cap.
            let q = random(t * qd, seed, 2.0);
            let k = random(t * kvd, seed + 1, 2.0);
            let v = random(t * kvd, seed + 2, 1.0);
            valid.extend(toks.iter().map(|&x| x != 0));
            for tt in 0..t {
                for g in 0..n_kv {
                    let dst = (g * cap + p0 + tt) * hd;
                    k_cpu[dst..dst + hd].copy_from_slice(&k[tt * kvd + g * hd..][..hd]);
                    v_cpu[dst..dst + hd].copy_from_slice(&v[tt * kvd + g * hd..][..hd]);
                }
            }
            let mut want = vec![0f32; t * qd];
            attend(&p, &q, p0, &k_cpu, &v_cpu, cap, &valid, &mut want, &mut scratch);

            dev.append_tokens(&gpu, toks).unwrap();
            let (kd, vd, qdv) = (gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap(), gpu.upload(&q).unwrap());
            dev.write(&gpu, layer, p0, &kd.as_view(), &vd.as_view()).unwrap();
            let mut out = gpu.zeros::<f32>(t * qd).unwrap();
            dev.attend(&gpu, &shape, layer, &qdv.as_view(), p0, &mut out.as_view_mut()).unwrap();
            let got = gpu.download(&out).unwrap();
            let (e, i) = max_diff(&got, &want);
            assert!(e <= 2e-5, "heads {n_q}/{n_kv} x {hd}, step {si}: {} vs {} at {i}", got[i], want[i]);
            p0 += t;
        }
        // Past what was appended is an error.
        let q = gpu.upload(&random(qd, 1, 1.0)).unwrap();
        let mut out = gpu.zeros::<f32>(qd).unwrap();
        assert!(dev.attend(&gpu, &shape, layer, &q.as_view(), p0, &mut out.as_view_mut()).is_err());
    }
}

#[test]
fn empty_inputs_queue_nothing() {
    let gpu = crate::gpu_or_skip!();
    let mut x = gpu.zeros::<f32>(8).unwrap();
    let s = gpu.zeros::<f32>(8).unwrap();
    let mut out = gpu.zeros::<f32>(8).unwrap();
    gpu.gelu_tanh(&mut x.slice_mut(0..0)).unwrap();
    gpu.softmax_rows(&mut x.slice_mut(0..0), 8).unwrap();
    gpu.rms_norm_rows(&x.slice(0..0), &s.as_view(), &mut out.as_view_mut(), 8, 1e-5, false).unwrap();
    gpu.rope(&mut x.slice_mut(0..0), 0, 2, 4, 0, 1e4).unwrap();
    gpu.synchronize().unwrap();
    assert!(gpu.download(&out).unwrap().iter().all(|&v| v == 0.0));
}
