//! q3_s and q2_s: round trips, determinism, edge cases, bits per weight from the constants,
//! importance weighting, and the measured error on synthetic weights.

use grok1::quant::measure::{sample, Dist, Rng};
use grok1::quant::{q2_s, q3_s};
use half::f16;
use proptest::prelude::*;

/// One low-bit type through its free functions.
#[derive(Clone, Copy, Debug)]
struct Lowbit {
    name: &'static str,
    block_bytes: usize,
    quantize: fn(&[f32], Option<&[f32]>, &mut [u8]),
    dequantize: fn(&[u8], &mut [f32]),
}

const Q3_S: Lowbit = Lowbit {
    name: "q3_s",
    block_bytes: q3_s::BLOCK_BYTES,
    quantize: q3_s::quantize_row,
    dequantize: q3_s::dequantize_row,
};
const Q2_S: Lowbit = Lowbit {
    name: "q2_s",
    block_bytes: q2_s::BLOCK_BYTES,
    quantize: q2_s::quantize_row,
    dequantize: q2_s::dequantize_row,
};
const TYPES: [Lowbit; 2] = [Q3_S, Q2_S];
const QK: usize = 256;

impl Lowbit {
    fn quantize(self, x: &[f32], imp: Option<&[f32]>) -> Vec<u8> {
        let mut out = vec![0u8; x.len() / QK * self.block_bytes];
        (self.quantize)(x, imp, &mut out);
        out
    }
    fn dequantize(self, b: &[u8]) -> Vec<f32> {
        let mut y = vec![0f32; b.len() / self.block_bytes * QK];
        (self.dequantize)(b, &mut y);
        y
    }
    fn round_trip(self, x: &[f32], imp: Option<&[f32]>) -> Vec<f32> {
        self.dequantize(&self.quantize(x, imp))
    }
}

/// The synthetic checkpoints' expert weights: Gaussian, one weight in 1024 from a component six
/// times wider.
fn mixture(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| {
            let z = r.gaussian();
            (if r.uniform() < 1.0 / 1024.0 { 6.0 * z } else { z }) as f32
        })
        .collect()
}

fn weighted_sq_err(x: &[f32], y: &[f32], w: Option<&[f32]>) -> f64 {
    x.iter()
        .zip(y)
        .enumerate()
        .map(|(i, (a, b))| w.map_or(1.0, |w| w[i] as f64) * (*a as f64 - *b as f64).powi(2))
        .sum()
}

fn relative_rmse(x: &[f32], y: &[f32]) -> f64 {
    (weighted_sq_err(x, y, None) / x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()).sqrt()
}

#[test]
fn bits_per_weight_from_the_constants() {
    let bpw = |bytes: usize| bytes as f64 * 8.0 / QK as f64;
    assert_eq!(q3_s::BLOCK_BYTES, 105);
    assert_eq!(q2_s::BLOCK_BYTES, 82);
    assert!(bpw(q3_s::BLOCK_BYTES) <= 3.3, "q3_s: {} bits per weight", bpw(q3_s::BLOCK_BYTES));
    assert!(bpw(q2_s::BLOCK_BYTES) <= 2.6, "q2_s: {} bits per weight", bpw(q2_s::BLOCK_BYTES));
    // Every field counted: d, the scales (and q3_s's grid bits), the indices.
    assert_eq!(q3_s::BLOCK_BYTES * 8, 16 + 8 * 5 + 16 + 3 * QK);
    assert_eq!(q2_s::BLOCK_BYTES * 8, 16 + 32 * 4 + 2 * QK);
}

/// Measured on 262,144 weights each (rows of 4096); `formats/blocks.md` quotes these. The
/// bounds sit 1% above the measurement.
#[test]
fn error_on_synthetic_weights() {
    let cases = [
        ("mixture", mixture(64 * 4096, 77), 0.1465, 0.2550),
        ("gaussian", sample(Dist::Gaussian, 64 * 4096, 78), 0.1439, 0.2496),
        ("student-t(5)", sample(Dist::StudentT(5), 64 * 4096, 79), 0.1561, 0.2694),
    ];
    for (name, x, q3, q2) in cases {
        let e3 = relative_rmse(&x, &Q3_S.round_trip(&x, None));
        let e2 = relative_rmse(&x, &Q2_S.round_trip(&x, None));
        eprintln!("{name}: q3_s {e3:.4}  q2_s {e2:.4}");
        assert!(e3 < q3 * 1.01, "q3_s on {name}: relative RMSE {e3:.4}, measured {q3}");
        assert!(e2 < q2 * 1.01, "q2_s on {name}: relative RMSE {e2:.4}, measured {q2}");
    }
}

/// The formulas of `formats/blocks.md`, written out again, on random bytes: pins the layouts.
#[test]
fn layouts_are_as_specified() {
    let mut rng = Rng::new(3);
    for _ in 0..64 {
        let mut b3: Vec<u8> = (0..q3_s::BLOCK_BYTES).map(|_| rng.next_u64() as u8).collect();
        let mut b2: Vec<u8> = (0..q2_s::BLOCK_BYTES).map(|_| rng.next_u64() as u8).collect();
        b3[1] &= 0x3b; // a finite f16 d (exponent below all ones)
        b2[1] &= 0x3b;
        let y3 = Q3_S.dequantize(&b3);
        let y2 = Q2_S.dequantize(&b2);
        let d3 = f16::from_le_bytes([b3[0], b3[1]]).to_f32() / 2048.0;
        let d2 = f16::from_le_bytes([b2[0], b2[1]]).to_f32() / 1024.0;
        for i in 0..QK {
            let k = i / 32;
            let u = ((b3[2 + k / 2] >> (4 * (k % 2))) & 15) | (((b3[6] >> k) & 1) << 4);
            let s = u as i32 - 16;
            let sel = ((b3[7] as u32 | (b3[8] as u32) << 8) >> (i / 16)) & 1;
            let n = ((b3[9 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3)
                | (((b3[73 + i % 32] >> (i / 32)) & 1) << 2);
            let want = (d3 * s as f32) * q3_s::GRID[8 * sel as usize + n as usize] as f32;
            assert_eq!(y3[i].to_bits(), want.to_bits(), "q3_s weight {i}");

            let s = ((b2[2 + i / 16] >> (4 * ((i / 8) % 2))) & 15) as i32 - 8;
            let n = (b2[18 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3;
            let want = (d2 * s as f32) * q2_s::GRID[n as usize] as f32;
            assert_eq!(y2[i].to_bits(), want.to_bits(), "q2_s weight {i}");
        }
    }
}

#[test]
fn zero_and_constant_blocks() {
    for t in TYPES {
        let x = vec![0f32; 2 * QK];
        assert!(t.round_trip(&x, None).iter().all(|&v| v == 0.0), "{}: zeros", t.name);
        for c in [0.375f32, -2.5, 1e-5, -3e4] {
            let x = vec![c; QK];
            let y = t.round_trip(&x, None);
            // A constant lands on one grid level times an integer scale times an f16 d: within
            // a few per cent (the level nearest the scale's rounding).
            let worst = y.iter().map(|v| ((v - c) / c).abs()).fold(0f32, f32::max);
            assert!(worst < 0.03, "{} constant {c}: worst relative error {worst}", t.name);
        }
    }
}

/// One weight far out: it is kept (it dominates the squared error); the other sub-blocks of
/// its super-block share its `d`, so theirs lose precision or vanish (5-bit and 4-bit scales
/// span 15:1 and 7:1 under it), and the row's other super-blocks are untouched.
#[test]
fn one_huge_outlier_is_kept() {
    let x = mixture(4 * QK, 5);
    for t in TYPES {
        for big in [20.0f32, 1000.0] {
            let mut xo = x.clone();
            xo[QK + 77] = big;
            let (bo, b) = (t.quantize(&xo, None), t.quantize(&x, None));
            let y = t.dequantize(&bo);
            // Within a few per cent for q3_s. q2_s's grid has no zero level (its smallest is 15
            // of 127), so the outlier's seven neighbours, which must take a nonzero level,
            // pull its sub-block's scale: 10% off at 20 sigma and at 1000.
            let tol = if t.name == "q2_s" { 0.15 } else { 0.05 };
            assert!((y[QK + 77] - big).abs() < tol * big, "{}: outlier {big} became {}", t.name, y[QK + 77]);
            for blk in [0, 2, 3] {
                let r = blk * t.block_bytes..(blk + 1) * t.block_bytes;
                assert_eq!(bo[r.clone()], b[r], "{}: outlier in block 1 changed block {blk}", t.name);
            }
            let rest = |i: usize| i != QK + 77;
            let err: f64 = (QK..2 * QK).filter(|&i| rest(i)).map(|i| ((xo[i] - y[i]) as f64).powi(2)).sum();
            let energy: f64 = (QK..2 * QK).filter(|&i| rest(i)).map(|i| (xo[i] as f64).powi(2)).sum();
            eprintln!("{} outlier {big}: the rest of its super-block keeps {:.3} of its error", t.name, err / energy);
            if big == 20.0 {
                // 20 sigma, as real checkpoints have: the rest keeps most of its precision.
                assert!(err < energy * 0.25, "{}: rest error {:.3} of its energy", t.name, err / energy);
            }
            // Far out (1000 sigma) q3_s stores the rest as zeros. q2_s's outlier sub-block
            // cannot: its seven other weights take the level nearest zero at the outlier's
            // scale, far worse than zeros for them (measured: 378 times their energy), though the
            // super-block as a whole stays well below the error of zeros (10% of its energy).
            // Real checkpoints' weights stay within about 20 sigma.
            let all_err: f64 = (QK..2 * QK).map(|i| ((xo[i] - y[i]) as f64).powi(2)).sum();
            let all_energy = energy + (big as f64).powi(2);
            let bound = if t.name == "q2_s" { 0.12 } else { 0.01 };
            assert!(big == 20.0 || all_err < all_energy * bound, "{}: super-block error {:.4} of its energy", t.name, all_err / all_energy);
        }
    }
}

#[test]
fn error_is_the_same_at_tiny_weight_scales() {
    let x = mixture(16 * 4096, 9);
    for t in TYPES {
        let base = relative_rmse(&x, &t.round_trip(&x, None));
        for scale in [1e-2f32, 1e-4, 1e-5] {
            let xs: Vec<f32> = x.iter().map(|v| v * scale).collect();
            let e = relative_rmse(&xs, &t.round_trip(&xs, None));
            assert!(e < base * 1.02, "{} at scale {scale}: relative RMSE {e:.4} (at 1: {base:.4})", t.name);
        }
    }
}

#[test]
fn non_finite_weights_give_finite_blocks() {
    for t in TYPES {
        let mut x = sample(Dist::Gaussian, 2 * QK, 3);
        x[3] = f32::NAN;
        x[100] = f32::INFINITY;
        x[300] = f32::NEG_INFINITY;
        assert!(t.round_trip(&x, None).iter().all(|v| v.is_finite()), "{}", t.name);
        // The super-blocks without non-finite weights are unaffected... none here; a clean row:
        let clean = sample(Dist::Gaussian, 2 * QK, 4);
        let mut dirty = clean.clone();
        dirty[QK + 5] = f32::NAN;
        let (a, b) = (t.quantize(&clean, None), t.quantize(&dirty, None));
        assert_eq!(a[..t.block_bytes], b[..t.block_bytes], "{}: a NaN in block 1 changed block 0", t.name);
    }
}

#[test]
fn quantizers_are_deterministic() {
    let x = mixture(8 * QK, 21);
    let imp: Vec<f32> = sample(Dist::Laplace, 8 * QK, 22).iter().map(|v| v * v).collect();
    for t in TYPES {
        for w in [None, Some(&imp[..])] {
            assert_eq!(t.quantize(&x, w), t.quantize(&x, w), "{}", t.name);
        }
    }
}

/// Importance weighting lowers the weighted error, which is what it is for; uniform importance
/// is the unweighted quantizer exactly.
#[test]
fn importance_lowers_the_weighted_error() {
    let cols = 4096;
    let x = mixture(16 * cols, 31);
    // Per-column importance as calibration gives it: mostly near 1, a few columns far larger.
    let mut rng = Rng::new(32);
    let col: Vec<f32> = (0..cols)
        .map(|_| {
            let g = rng.gaussian() as f32;
            if rng.uniform() < 0.02 { 50.0 * (1.0 + g * g) } else { 0.5 + 0.25 * g * g }
        })
        .collect();
    let imp: Vec<f32> = (0..x.len()).map(|i| col[i % cols]).collect();
    for t in TYPES {
        let plain = weighted_sq_err(&x, &t.round_trip(&x, None), Some(&imp));
        let weighted = weighted_sq_err(&x, &t.round_trip(&x, Some(&imp)), Some(&imp));
        eprintln!("{}: weighted error with importance {:.3}x without", t.name, weighted / plain);
        assert!(weighted < plain * 0.9, "{}: weighted error {weighted:.1}, unweighted quantizer {plain:.1}", t.name);
        let ones = vec![1f32; x.len()];
        assert_eq!(t.quantize(&x, Some(&ones)), t.quantize(&x, None), "{}: importance of ones", t.name);
    }
}

/// Weights already on a block's grid come back close: the search need not find the exact
/// representation (its candidates are a few scales), but it lands near it.
#[test]
fn requantizing_decoded_blocks_is_close() {
    let x = mixture(16 * QK, 41);
    for t in TYPES {
        let y = t.round_trip(&x, None);
        let z = t.round_trip(&y, None);
        let e = relative_rmse(&y, &z);
        eprintln!("{}: requantized relative RMSE {e:.4}", t.name);
        assert!(e < 0.05, "{}: requantizing its own output moved it by {e:.4}", t.name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any finite row at any scale gives finite weights, never worse than storing zeros.
    #[test]
    fn finite_and_no_worse_than_zeros(e in -30.0f32..30.0, v in prop::collection::vec(-1.0f32..1.0, QK), outlier in 0usize..QK) {
        let scale = 2f32.powf(e);
        let mut x: Vec<f32> = v.iter().map(|a| a * scale).collect();
        x[outlier] *= 8.0;
        for t in TYPES {
            let y = t.round_trip(&x, None);
            prop_assert!(y.iter().all(|v| v.is_finite()), "{}", t.name);
            let err = weighted_sq_err(&x, &y, None);
            let energy: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
            prop_assert!(err <= energy, "{}: error {err} above the energy {energy}", t.name);
        }
    }
}

/// Quantizer throughput on one thread (`cargo test --release --test quant_lowbit throughput
/// -- --ignored --nocapture`): rows of 4096, 4 M weights each; CPU time of this thread.
#[test]
#[ignore]
fn throughput() {
    let x = mixture(1024 * 4096, 51);
    let imp: Vec<f32> = (0..x.len()).map(|i| 1.0 + (i % 4096) as f32 / 4096.0).collect();
    for t in TYPES {
        for w in [None, Some(&imp[..])] {
            let mut out = vec![0u8; x.len() / QK * t.block_bytes];
            let start = cpu_time();
            for (r, o) in x.chunks(4096).zip(out.chunks_mut(4096 / QK * t.block_bytes)) {
                (t.quantize)(r, w.map(|w| &w[..4096]), o);
            }
            let secs = cpu_time() - start;
            eprintln!("{} quantize{}: {:.1} M weights/s", t.name, if w.is_some() { " with importance" } else { "" }, x.len() as f64 / secs / 1e6);
        }
        let b = t.quantize(&x, None);
        let mut y = vec![0f32; x.len()];
        let start = cpu_time();
        (t.dequantize)(&b, &mut y);
        eprintln!("{} dequantize: {:.0} M weights/s", t.name, x.len() as f64 / (cpu_time() - start) / 1e6);
    }
}

/// This thread's CPU time in seconds.
fn cpu_time() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Which default weighting without calibration: uniform (ours) or ggml's `x^2`-based ones.
/// Plain relative RMSE on the synthetic expert weights, the error the KL of random models
/// follows. Measured (16 rows of 4096): q3_s 0.1460 uniform, 0.1571 with x^2, 0.1476 with
/// sqrt(s2 + x^2); q2_s 0.2531, 0.2772, 0.2564 (s2 the row's mean squared weight).
#[test]
fn uniform_default_weighting_beats_magnitude_weighting() {
    let cols = 4096;
    let x = mixture(16 * cols, 61);
    for t in TYPES {
        let mut errs = Vec::new();
        for weighting in 0..3 {
            let mut y = vec![0f32; x.len()];
            for (r, yr) in x.chunks(cols).zip(y.chunks_mut(cols)) {
                let s2 = r.iter().map(|v| v * v).sum::<f32>() / cols as f32;
                let w: Vec<f32> = r.iter().map(|v| [1.0, v * v, (s2 + v * v).sqrt()][weighting]).collect();
                yr.copy_from_slice(&t.round_trip(r, Some(&w)));
            }
            errs.push(relative_rmse(&x, &y));
        }
        eprintln!("{}: relative RMSE uniform {:.4}, x^2 {:.4}, sqrt(s2 + x^2) {:.4}", t.name, errs[0], errs[1], errs[2]);
        assert!(errs[0] < errs[1] && errs[0] < errs[2], "{}: {errs:?}", t.name);
    }
}
