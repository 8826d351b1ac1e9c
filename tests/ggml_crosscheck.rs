//! Our block types against ggml itself (the vendored copy in ggml-sys-bleedingedge, April 2024).
//! Needs `--features ggml` (cmake, clang and libclang: `.ci/install-ggml-deps.sh`).
//!
//! - ggml's `dequantize_row_*` gives exactly our values on our blocks, and on blocks of random
//!   bytes (every scale, min and nibble pattern), for q8_0, q4_0, iq4_nl and q4_K.
//! - ggml's reference quantizers for q8_0 and q4_0 give exactly our bytes.
//! - ggml's `vec_dot` agrees with our scalar dequantize-then-dot within a bound derived from f32
//!   rounding.
//! - Where the quantizers differ by design (iq4_nl, q4_K) ours has the lower error.

#![cfg(feature = "ggml")]

use ggml_sys_bleedingedge as ggml;
use grok1::quant::measure::{sample, Dist, Rng};
use grok1::quant::{QuantType, QK, QK_K};
use std::os::raw::c_void;
use std::sync::Once;

/// ggml builds its f16 tables in `ggml_init`; the conversion macros may use them.
fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| unsafe {
        let ctx = ggml::ggml_init(ggml::ggml_init_params {
            mem_size: 1 << 16,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        });
        assert!(!ctx.is_null());
        ggml::ggml_free(ctx);
    });
}

fn ggml_type(t: QuantType) -> ggml::ggml_type {
    match t {
        QuantType::Q8_0 => ggml::ggml_type_GGML_TYPE_Q8_0,
        QuantType::Q4_0 => ggml::ggml_type_GGML_TYPE_Q4_0,
        QuantType::Iq4Nl => ggml::ggml_type_GGML_TYPE_IQ4_NL,
        QuantType::Q4K => ggml::ggml_type_GGML_TYPE_Q4_K,
        QuantType::F32 | QuantType::Bf16 => unreachable!("not a block type"),
        QuantType::Q4S | QuantType::Q3S | QuantType::Q2S => unreachable!("{t} is ours: ggml has no such type"),
    }
}

/// The block types ggml shares with us (q4_s is ours alone).
const BLOCK_TYPES: [QuantType; 4] =
    [QuantType::Q8_0, QuantType::Q4_0, QuantType::Iq4Nl, QuantType::Q4K];

fn traits(t: ggml::ggml_type) -> ggml::ggml_type_traits_t {
    init();
    unsafe { ggml::ggml_internal_get_type_traits(t) }
}

fn ggml_dequantize(t: QuantType, bytes: &[u8], n: usize) -> Vec<f32> {
    let tr = traits(ggml_type(t));
    let mut out = vec![0f32; n];
    unsafe { tr.to_float.unwrap()(bytes.as_ptr() as *const c_void, out.as_mut_ptr(), n as i64) };
    out
}

fn ours_quantize(t: QuantType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; t.row_bytes(x.len()).unwrap()];
    t.quantize_row(x, &mut out);
    out
}

fn ours_dequantize(t: QuantType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    t.dequantize_row(bytes, &mut out);
    out
}

/// ggml's row quantizer as llama.cpp's tools use it (`ggml_quantize_chunk`, no importance
/// matrix); for q8_0 and q4_0 this is the reference quantizer.
fn ggml_quantize(t: QuantType, x: &[f32], cols: usize) -> Vec<u8> {
    init();
    let mut out = vec![0u8; t.row_bytes(cols).unwrap() * (x.len() / cols)];
    let written = unsafe {
        ggml::ggml_quantize_chunk(
            ggml_type(t),
            x.as_ptr(),
            out.as_mut_ptr() as *mut c_void,
            0,
            (x.len() / cols) as i64,
            cols as i64,
            std::ptr::null(),
        )
    };
    assert_eq!(written, out.len());
    out
}

fn test_rows() -> Vec<(String, Vec<f32>)> {
    let n = 64 * QK_K;
    let mut rows = vec![
        ("gaussian".to_string(), sample(Dist::Gaussian, n, 1)),
        ("student-t(3)".to_string(), sample(Dist::StudentT(3), n, 2)),
        (
            "laplace * 1e-3".to_string(),
            sample(Dist::Laplace, n, 3).iter().map(|v| v * 1e-3).collect(),
        ),
    ];
    // Zero and constant blocks, and a row of mixed magnitudes.
    let mut special = vec![0f32; n];
    special[QK_K..2 * QK_K].fill(0.375);
    special[2 * QK_K..3 * QK_K].fill(-2.5);
    let mut rng = Rng::new(4);
    for (i, v) in special[3 * QK_K..].iter_mut().enumerate() {
        *v = rng.gaussian() as f32 * 10f32.powi((i / 64 % 9) as i32 - 4);
    }
    rows.push(("zero, constant, mixed magnitudes".to_string(), special));
    rows
}

#[test]
fn block_geometry_matches_ggml() {
    for t in BLOCK_TYPES {
        let tr = traits(ggml_type(t));
        assert_eq!(tr.blck_size as usize, t.block_len(), "{t}: block length");
        assert_eq!(tr.type_size, t.block_bytes(), "{t}: block bytes");
    }
}

#[test]
fn ggml_dequantizes_our_blocks_to_our_values() {
    for t in BLOCK_TYPES {
        for (name, x) in test_rows() {
            let bytes = ours_quantize(t, &x);
            let ours = ours_dequantize(t, &bytes, x.len());
            let theirs = ggml_dequantize(t, &bytes, x.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{t} on {name}: weight {i}: ours {a}, ggml {b}"
                );
            }
        }
    }
}

#[test]
fn ggml_dequantizes_random_blocks_to_our_values() {
    // Random bytes exercise every nibble, scale and min pattern; the f16 scales are forced
    // finite (an infinite or NaN scale decodes to inf/NaN in both, but NaN bits may differ).
    let mut rng = Rng::new(5);
    for t in BLOCK_TYPES {
        let nblocks = 512;
        let mut bytes: Vec<u8> =
            (0..nblocks * t.block_bytes()).map(|_| rng.next_u64() as u8).collect();
        let nscales = if t == QuantType::Q4K { 2 } else { 1 };
        for b in bytes.chunks_exact_mut(t.block_bytes()) {
            for s in 0..nscales {
                b[2 * s + 1] &= 0xfb; // an exponent of all ones needs bit 2 of the high byte
            }
        }
        let n = nblocks * t.block_len();
        let ours = ours_dequantize(t, &bytes, n);
        let theirs = ggml_dequantize(t, &bytes, n);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{t}: weight {i}: ours {a}, ggml {b}");
        }
    }
}

#[test]
fn ggml_reference_quantizers_give_our_bytes() {
    for t in [QuantType::Q8_0, QuantType::Q4_0] {
        let tr = traits(ggml_type(t));
        let mut rows = test_rows();
        // Exact ties for q8_0's rounding: weights at (k + 0.5) * d, d = amax / 127 exactly.
        let mut ties = vec![0f32; 8 * QK];
        for (i, v) in ties.iter_mut().enumerate() {
            let k = (i % QK) as f32 - 16.0;
            *v = if i % QK == 0 { 127.0 } else { k + 0.5 } * 0.125;
        }
        rows.push(("ties".to_string(), ties));
        for (name, x) in rows {
            let ours = ours_quantize(t, &x);
            let mut theirs = vec![0u8; ours.len()];
            unsafe {
                tr.from_float_reference.unwrap()(
                    x.as_ptr(),
                    theirs.as_mut_ptr() as *mut c_void,
                    x.len() as i64,
                )
            };
            if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
                let blk = i / t.block_bytes();
                panic!(
                    "{t} on {name}: byte {i} (block {blk}) differs: ours {:?}, ggml {:?}",
                    &ours[blk * t.block_bytes()..(blk + 1) * t.block_bytes()],
                    &theirs[blk * t.block_bytes()..(blk + 1) * t.block_bytes()]
                );
            }
            assert_eq!(ggml_quantize(t, &x, QK_K), ours, "{t} on {name}: ggml_quantize_chunk");
        }
    }
}

/// ggml's SIMD q8_0 quantizer (`quantize_row_q8_0`, which quantizes activations for `vec_dot`)
/// is not its reference: it scales by 127 / amax instead of 1 / (amax / 127) and rounds ties to
/// even instead of away from zero. So it can differ from the reference (and from us) by one step,
/// but only for weights within a hair of a rounding tie.
#[test]
fn ggml_simd_q8_0_differs_only_at_ties() {
    let tr = traits(ggml::ggml_type_GGML_TYPE_Q8_0);
    for (name, x) in test_rows() {
        let ours = ours_quantize(QuantType::Q8_0, &x);
        let mut theirs = vec![0u8; ours.len()];
        unsafe {
            tr.from_float.unwrap()(x.as_ptr(), theirs.as_mut_ptr() as *mut c_void, x.len() as i64)
        };
        for (bi, (a, b)) in ours.chunks_exact(34).zip(theirs.chunks_exact(34)).enumerate() {
            assert_eq!(a[..2], b[..2], "{name}: block {bi}: scale");
            let xb = &x[bi * QK..(bi + 1) * QK];
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for j in 0..QK {
                let (qa, qb) = (a[2 + j] as i8, b[2 + j] as i8);
                if qa != qb {
                    let u = xb[j] * 127.0 / amax;
                    let frac = (u - u.trunc()).abs();
                    assert!(
                        (qa as i32 - qb as i32).abs() == 1 && (frac - 0.5).abs() < 1e-4,
                        "{name}: block {bi} weight {j}: x/d = {u}, ours {qa}, ggml {qb}"
                    );
                }
            }
        }
    }
}

/// Our quantizers for iq4_nl and q4_K are our own; they must not do worse than ggml's.
#[test]
fn our_searched_quantizers_beat_ggmls() {
    for t in [QuantType::Iq4Nl, QuantType::Q4K] {
        for (name, x) in test_rows().into_iter().take(3) {
            let err = |bytes: &[u8]| -> f64 {
                let y = ours_dequantize(t, bytes, x.len());
                x.iter().zip(&y).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>()
            };
            let ours = err(&ours_quantize(t, &x));
            let theirs = err(&ggml_quantize(t, &x, QK_K));
            eprintln!("{t} on {name}: RMSE ours / ggml = {:.4}", (ours / theirs).sqrt());
            assert!(ours < theirs, "{t} on {name}: ours {ours}, ggml {theirs}");
        }
    }
}

/// Reads ggml's q8_K activation blocks: f32 d, 256 x i8, 16 x i16 block sums.
fn dequantize_q8_k(bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    for b in bytes.chunks_exact(4 + QK_K + 32) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        out.extend(b[4..4 + QK_K].iter().map(|&q| d * q as i8 as f32));
    }
    out
}

#[test]
fn ggml_vec_dot_agrees_with_scalar_dot() {
    let n = 16 * QK_K;
    let mut rng = Rng::new(9);
    for t in BLOCK_TYPES {
        let tr = traits(ggml_type(t));
        let act_type = tr.vec_dot_type;
        let act_tr = traits(act_type);
        for trial in 0..20 {
            let dist = [Dist::Gaussian, Dist::StudentT(3), Dist::Laplace][trial % 3];
            let w = sample(dist, n, rng.next_u64());
            let a = sample(Dist::Gaussian, n, rng.next_u64());
            let wq = ours_quantize(t, &w);
            // Activations quantized by ggml to the type its dot product takes.
            let act_bytes = n / act_tr.blck_size as usize * act_tr.type_size;
            let mut aq = vec![0u8; act_bytes];
            unsafe {
                act_tr.from_float.unwrap()(a.as_ptr(), aq.as_mut_ptr() as *mut c_void, n as i64)
            };
            let av = if act_type == ggml::ggml_type_GGML_TYPE_Q8_K {
                dequantize_q8_k(&aq, n)
            } else {
                assert_eq!(act_type, ggml::ggml_type_GGML_TYPE_Q8_0);
                ours_dequantize(QuantType::Q8_0, &aq, n)
            };
            let wv = ours_dequantize(t, &wq, n);
            let dot = |from: usize, len: usize| -> f32 {
                let mut s = 0f32;
                let wb = from / t.block_len() * t.block_bytes();
                let ab = from / act_tr.blck_size as usize * act_tr.type_size;
                unsafe {
                    tr.vec_dot.unwrap()(
                        len as i32,
                        &mut s,
                        0,
                        wq[wb..].as_ptr() as *const c_void,
                        0,
                        aq[ab..].as_ptr() as *const c_void,
                        0,
                        1,
                    )
                };
                s
            };
            let exact = |from: usize, len: usize| -> f64 {
                wv[from..from + len]
                    .iter()
                    .zip(&av[from..])
                    .map(|(x, y)| *x as f64 * *y as f64)
                    .sum()
            };
            // ggml forms integer dot products of short runs exactly, scales them by the f32
            // product of the two block scales (exact for two f16s, one rounding for q8_K's f32)
            // and adds the scaled terms in f32, one rounding per addition. Every term and every
            // partial sum is bounded by the sum of the magnitudes of the products it is made of,
            // so with k additions the error is at most (k + 2) eps times that sum. q4_K adds its
            // scale part and its min part separately; they can exceed the weight they make, so
            // its magnitudes are those of the parts. The row as a whole adds at most one term
            // per 32 weights plus a horizontal sum over 8 lanes.
            let check = |from: usize, len: usize, additions: usize, what: &str| {
                let got = dot(from, len);
                let want = exact(from, len);
                let tol = (additions as f64 + 2.0)
                    * f32::EPSILON as f64
                    * term_magnitude(t, &wq, &av, from, len);
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{t} trial {trial} {what}: ggml {got}, scalar {want}, |diff| {:e} > {tol:e}",
                    (got as f64 - want).abs()
                );
            };
            check(0, n, n / QK + 8, "whole row");
            // Chunk by chunk the bound is tight (a few additions), so one wrong block shows.
            // Chunks are 64 weights for the 32-weight types because ggml's iq4_nl dot product
            // always reads blocks in pairs.
            let chunk = t.block_len().max(64);
            for c in 0..n / chunk {
                check(c * chunk, chunk, chunk / QK + 8, &format!("weights {}..", c * chunk));
            }
        }
    }
}

/// Sum over weights `from .. from + len` of |activation| times the magnitude of the parts ggml
/// multiplies it with: |w| for the single-scale types, |d sc q| + |dmin m| for q4_K.
fn term_magnitude(t: QuantType, wq: &[u8], av: &[f32], from: usize, len: usize) -> f64 {
    let mut total = 0f64;
    for i in from..from + len {
        let blk = &wq[i / t.block_len() * t.block_bytes()..][..t.block_bytes()];
        let parts = if t == QuantType::Q4K {
            let j = i % QK_K;
            let (c, hi, l) = (j / 64, (j / 32) % 2, j % 32);
            let (sc, m) = grok1::quant::q4_k::scale_min(2 * c + hi, &blk[4..16]);
            let byte = blk[16 + 32 * c + l];
            let q = if hi == 0 { byte & 15 } else { byte >> 4 };
            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f64().abs();
            let dmin = half::f16::from_le_bytes([blk[2], blk[3]]).to_f64().abs();
            d * sc as f64 * q as f64 + dmin * m as f64
        } else {
            let mut w = vec![0f32; t.block_len()];
            t.dequantize_row(blk, &mut w);
            w[i % t.block_len()].abs() as f64
        };
        total += parts * av[i].abs() as f64;
    }
    total
}
