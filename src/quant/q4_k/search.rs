//! The q4_K quantizer: choosing `d`, `dmin`, the 6-bit scales and mins, and the nibbles of one
//! super-block so that the squared error is small.
//!
//! 1. Each 32-weight sub-block gets a least-squares affine fit `x ~ a * q + b` (q in 0..=15,
//!    a >= 0, b <= 0): several clipping starts, each refined by alternating nearest assignment
//!    and least-squares refit.
//! 2. `d`, `dmin` = the largest `a`, `-b` over 63, f16-rounded; for each sub-block the (sc, m)
//!    among the 3 x 3 neighbours of the rounded targets with the least error wins.
//! 3. `d`, `dmin` are refit by least squares over the whole super-block for those integers, and
//!    step 2 repeats around the new values while the error falls.
//!
//! The inner kernel (`Sub::assign`: nearest levels of 32 weights and three sums) runs about 40
//! times per weight, so it has an AVX2 version; the const parameter `AVX2` selects it at compile
//! time. Both versions do the same f32 operations lane for lane in the same order, so they give
//! the same bytes.

use super::{pack_scales, BLOCK_BYTES, QK_K};
use crate::quant::{f16_round, f16_scale, hsum};

const SUB: usize = 32;
const NSUB: usize = QK_K / SUB;

/// Round to nearest (ties to even) for 0 <= t < 2^22 without a libm call, so it vectorizes.
#[inline(always)]
pub(super) fn round_small(t: f32) -> f32 {
    (t + 12_582_912.0) - 12_582_912.0
}

/// The nearest level q in 0..=15 of `v` on the grid `a * q + b`; `ia` is 1/a, or 0 when a = 0.
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp would keep a NaN; max(NaN, 0) is 0, as in the AVX2 code
fn level(v: f32, b: f32, ia: f32) -> f32 {
    round_small(((v - b) * ia).max(0.0).min(15.0))
}

#[inline(always)]
fn inverse(a: f32) -> f32 {
    if a > 0.0 {
        1.0 / a
    } else {
        0.0
    }
}

/// Squared error and least-squares sums of the nearest assignment of a sub-block to a grid
/// `a * q + b`. The error is summed from the residuals: expanding it into the other sums loses it
/// to cancellation when the error is tiny next to sum(x^2), as for weights already on a grid.
#[derive(Clone, Copy)]
struct Sums {
    err: f32,
    q: f32,
    qq: f32,
    qx: f32,
}

/// One sub-block and the sums every error formula needs.
#[derive(Clone, Copy)]
struct Sub {
    x: [f32; SUB],
    sx: f32,
    min: f32,
    max: f32,
}

impl Sub {
    #[inline(always)]
    fn new(x: &[f32]) -> Sub {
        let x: [f32; SUB] = x.try_into().unwrap();
        let mut sx = [0f32; 8];
        let (mut min, mut max) = (f32::MAX, f32::MIN);
        for c in x.chunks_exact(8) {
            for l in 0..8 {
                sx[l] += c[l];
                min = min.min(c[l]);
                max = max.max(c[l]);
            }
        }
        Sub { x, sx: hsum(&sx), min, max }
    }

    /// The sums of the nearest assignments to the grids `a[i] * q + b[i]`. Evaluating several
    /// grids in one pass gives the CPU independent work (one grid alone is latency-bound).
    #[inline(always)]
    fn assign<const AVX2: bool, const N: usize>(&self, a: &[f32; N], b: &[f32; N]) -> [Sums; N] {
        let mut ia = [0f32; N];
        for i in 0..N {
            ia[i] = inverse(a[i]);
        }
        #[cfg(target_arch = "x86_64")]
        if AVX2 {
            // SAFETY: AVX2 is only requested from code that runs after the CPU check.
            return unsafe { assign_avx2(&self.x, a, b, &ia) };
        }
        // Eight lanes, as in the AVX2 version, so both sum in the same order.
        let mut out = [Sums { err: 0.0, q: 0.0, qq: 0.0, qx: 0.0 }; N];
        for i in 0..N {
            let (mut se, mut sq, mut sqq, mut sqx) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
            for c in self.x.chunks_exact(8) {
                for l in 0..8 {
                    let q = level(c[l], b[i], ia[i]);
                    let r = c[l] - (a[i] * q + b[i]);
                    se[l] += r * r;
                    sq[l] += q;
                    sqq[l] += q * q;
                    sqx[l] += q * c[l];
                }
            }
            out[i] = Sums { err: hsum(&se), q: hsum(&sq), qq: hsum(&sqq), qx: hsum(&sqx) };
        }
        out
    }

    /// The squared errors of the nearest assignments to the grids `a * q + b[i]` (`assign`
    /// without the least-squares sums).
    #[inline(always)]
    fn errors3<const AVX2: bool>(&self, a: f32, b: &[f32; 3]) -> [f32; 3] {
        let ia = inverse(a);
        #[cfg(target_arch = "x86_64")]
        if AVX2 {
            // SAFETY: AVX2 is only requested from code that runs after the CPU check.
            return unsafe { errors3_avx2(&self.x, a, ia, b) };
        }
        let mut out = [0f32; 3];
        for i in 0..3 {
            let mut e = [0f32; 8];
            for c in self.x.chunks_exact(8) {
                for l in 0..8 {
                    let r = c[l] - (a * level(c[l], b[i], ia) + b[i]);
                    e[l] += r * r;
                }
            }
            out[i] = hsum(&e);
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn assign_avx2<const N: usize>(
    x: &[f32; SUB],
    a: &[f32; N],
    b: &[f32; N],
    ia: &[f32; N],
) -> [Sums; N] {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_ps();
    let top = _mm256_set1_ps(15.0);
    let magic = _mm256_set1_ps(12_582_912.0);
    let mut se = [zero; N];
    let mut sq = [zero; N];
    let mut sqq = [zero; N];
    let mut sqx = [zero; N];
    for c in 0..SUB / 8 {
        let v = _mm256_loadu_ps(x.as_ptr().add(8 * c));
        for i in 0..N {
            let vb = _mm256_set1_ps(b[i]);
            let t = _mm256_mul_ps(_mm256_sub_ps(v, vb), _mm256_set1_ps(ia[i]));
            // max(t, 0) returns 0 for a NaN t, like f32::max.
            let t = _mm256_min_ps(_mm256_max_ps(t, zero), top);
            let q = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
            let r = _mm256_sub_ps(v, _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(a[i]), q), vb));
            se[i] = _mm256_add_ps(se[i], _mm256_mul_ps(r, r));
            sq[i] = _mm256_add_ps(sq[i], q);
            sqq[i] = _mm256_add_ps(sqq[i], _mm256_mul_ps(q, q));
            sqx[i] = _mm256_add_ps(sqx[i], _mm256_mul_ps(q, v));
        }
    }
    let mut out = [Sums { err: 0.0, q: 0.0, qq: 0.0, qx: 0.0 }; N];
    for i in 0..N {
        let [err, q, qq, qx] = hsum4(se[i], sq[i], sqq[i], sqx[i]);
        out[i] = Sums { err, q, qq, qx };
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn errors3_avx2(x: &[f32; SUB], a: f32, ia: f32, b: &[f32; 3]) -> [f32; 3] {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_ps();
    let top = _mm256_set1_ps(15.0);
    let magic = _mm256_set1_ps(12_582_912.0);
    let (va, via) = (_mm256_set1_ps(a), _mm256_set1_ps(ia));
    let mut e = [zero; 3];
    for c in 0..SUB / 8 {
        let v = _mm256_loadu_ps(x.as_ptr().add(8 * c));
        for i in 0..3 {
            let vb = _mm256_set1_ps(b[i]);
            let t =
                _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(v, vb), via), zero), top);
            let q = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
            let r = _mm256_sub_ps(v, _mm256_add_ps(_mm256_mul_ps(va, q), vb));
            e[i] = _mm256_add_ps(e[i], _mm256_mul_ps(r, r));
        }
    }
    let [e0, e1, e2, _] = hsum4(e[0], e[1], e[2], zero);
    [e0, e1, e2]
}

/// `hsum` of each of four eight-lane vectors, in the same order, with one reduction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum4(
    a: std::arch::x86_64::__m256,
    b: std::arch::x86_64::__m256,
    c: std::arch::x86_64::__m256,
    d: std::arch::x86_64::__m256,
) -> [f32; 4] {
    use std::arch::x86_64::*;
    // [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7], the same for c, d
    let ab = _mm256_hadd_ps(a, b);
    let cd = _mm256_hadd_ps(c, d);
    // [(a0+a1)+(a2+a3), (b0+b1)+(b2+b3), (c..), (d..) | the same for lanes 4..8]
    let h = _mm256_hadd_ps(ab, cd);
    let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), s);
    out
}

/// Clipping starts for the affine fit: fractions of the sub-block's (min, max) kept.
const STARTS: [(f32, f32); 5] = [(1.0, 1.0), (0.9, 0.9), (0.8, 0.8), (1.0, 0.85), (0.85, 1.0)];
/// Least-squares refits after each start.
const REFITS: usize = 2;
/// Refits of (d, dmin) over the super-block.
const ROUNDS: usize = 2;
/// Super-blocks whose largest weight is below this are stored as zeros (the f16 scales would
/// underflow anyway).
const TINY: f32 = 1e-30;

/// Least-squares affine fit `x ~ a * q + b` with `a >= 0`, `b <= 0` (the format stores
/// `-dmin * m` with both non-negative). All starts run in lockstep. Returns (a, b).
#[inline(always)]
fn fit_affine<const AVX2: bool>(sub: &Sub) -> (f32, f32) {
    const NS: usize = STARTS.len();
    let mn = sub.min.min(0.0);
    let mx = sub.max;
    // (Weights reaching the search are finite, so plain comparisons see no NaN.)
    if mx <= mn {
        return (0.0, mn);
    }
    let n = SUB as f32;
    let mut best = (0.0, mn, f32::INFINITY);
    let (mut a, mut b) = ([0f32; NS], [0f32; NS]);
    for i in 0..NS {
        b[i] = mn * STARTS[i].0;
        a[i] = (mx * STARTS[i].1 - b[i]) / 15.0;
    }
    // A start stops (a = 0 from then on, its results ignored) when its refit degenerates.
    let mut live = [true; NS];
    for it in 0..=REFITS {
        let sums = sub.assign::<AVX2, NS>(&a, &b);
        for i in 0..NS {
            live[i] &= a[i] > 0.0;
            if !live[i] {
                a[i] = 0.0;
                continue;
            }
            let s = &sums[i];
            let e = s.err;
            if e < best.2 {
                best = (a[i], b[i], e);
            }
            if it == REFITS {
                continue;
            }
            let det = n * s.qq - s.q * s.q;
            if det <= 0.0 {
                live[i] = false;
                a[i] = 0.0;
                continue;
            }
            a[i] = (n * s.qx - s.q * sub.sx) / det;
            b[i] = (s.qq * sub.sx - s.q * s.qx) / det;
            if b[i] > 0.0 {
                b[i] = 0.0;
                a[i] = s.qx / s.qq;
            }
        }
    }
    (best.0, best.1)
}

struct Scales {
    d: f32,
    dmin: f32,
    sc: [u8; NSUB],
    m: [u8; NSUB],
}

/// For fixed `d`, `dmin`: per sub-block, the (sc, m) among the neighbours of the rounded targets
/// with the least error. Returns the total squared error.
#[inline(always)]
fn pick_scales<const AVX2: bool>(
    subs: &[Sub; NSUB],
    target: &[(f32, f32); NSUB],
    s: &mut Scales,
) -> f32 {
    let mut total = 0f32;
    for (j, sub) in subs.iter().enumerate() {
        let (a_t, b_t) = target[j];
        let s0 = if s.d > 0.0 { round_small((a_t / s.d).clamp(0.0, 63.0)) as i32 } else { 0 };
        let m0 =
            if s.dmin > 0.0 { round_small((-b_t / s.dmin).clamp(0.0, 63.0)) as i32 } else { 0 };
        let mut best = (f32::INFINITY, 0u8, 0u8);
        let m_lo = (m0 - 1).clamp(0, 61);
        let b = [-s.dmin * m_lo as f32, -s.dmin * (m_lo + 1) as f32, -s.dmin * (m_lo + 2) as f32];
        for sc in (s0 - 1).max(0)..=(s0 + 1).min(63) {
            let a = s.d * sc as f32;
            let errs = sub.errors3::<AVX2>(a, &b);
            for (k, &e) in errs.iter().enumerate() {
                if e < best.0 {
                    best = (e, sc as u8, (m_lo + k as i32) as u8);
                }
            }
        }
        total += best.0;
        s.sc[j] = best.1;
        s.m[j] = best.2;
    }
    total
}

/// Least-squares (d, dmin) for the current integers, f16-rounded; None if degenerate.
#[inline(always)]
fn refit_supers<const AVX2: bool>(subs: &[Sub; NSUB], s: &Scales) -> Option<(f32, f32)> {
    // x ~ d * A + dmin * B with A = sc * q, B = -m.
    let (mut aa, mut ab, mut bb, mut ax, mut bx) = (0f32, 0f32, 0f32, 0f32, 0f32);
    for (j, sub) in subs.iter().enumerate() {
        let [sums] = sub.assign::<AVX2, 1>(&[s.d * s.sc[j] as f32], &[-s.dmin * s.m[j] as f32]);
        let scj = s.sc[j] as f32;
        let bj = -(s.m[j] as f32);
        aa += scj * scj * sums.qq;
        ab += scj * bj * sums.q;
        bb += bj * bj * SUB as f32;
        ax += scj * sums.qx;
        bx += bj * sub.sx;
    }
    let det = aa * bb - ab * ab;
    let (d, dmin) = if det > 0.0 {
        ((ax * bb - ab * bx) / det, (aa * bx - ab * ax) / det)
    } else if aa > 0.0 && bb == 0.0 {
        (ax / aa, s.dmin)
    } else {
        return None;
    };
    let (d, dmin) = (f16_round(d), f16_round(dmin));
    (d > 0.0 && dmin >= 0.0 && d.is_finite() && dmin.is_finite()).then_some((d, dmin))
}

/// Quantize one super-block of finite weights. (Plain loops throughout rather than closures:
/// a closure that is not inlined loses the AVX2 build.)
#[inline(always)]
pub(super) fn quantize_block<const AVX2: bool>(x: &[f32], out: &mut [u8]) {
    let x: &[f32; QK_K] = x.try_into().unwrap();
    let mut amax = 0f32;
    for &v in x {
        amax = amax.max(v.abs());
    }
    if amax < TINY {
        out[..BLOCK_BYTES].fill(0);
        return;
    }
    let mut subs = [Sub { x: [0.0; SUB], sx: 0.0, min: 0.0, max: 0.0 }; NSUB];
    let mut target = [(0f32, 0f32); NSUB];
    for j in 0..NSUB {
        subs[j] = Sub::new(&x[SUB * j..SUB * (j + 1)]);
        target[j] = fit_affine::<AVX2>(&subs[j]);
    }
    let (mut amax_a, mut amax_m) = (0f32, 0f32);
    for t in &target {
        amax_a = amax_a.max(t.0);
        amax_m = amax_m.max(-t.1);
    }
    let mut s = Scales {
        d: f16_round(amax_a / 63.0),
        dmin: f16_round(amax_m / 63.0),
        sc: [0; NSUB],
        m: [0; NSUB],
    };
    let mut err = pick_scales::<AVX2>(&subs, &target, &mut s);
    for _ in 0..ROUNDS {
        let Some((d, dmin)) = refit_supers::<AVX2>(&subs, &s) else {
            break;
        };
        if d == s.d && dmin == s.dmin {
            break;
        }
        let mut centre = [(0f32, 0f32); NSUB];
        for (j, c) in centre.iter_mut().enumerate() {
            *c = (s.d * s.sc[j] as f32, -s.dmin * s.m[j] as f32);
        }
        let mut t = Scales { d, dmin, sc: [0; NSUB], m: [0; NSUB] };
        let e = pick_scales::<AVX2>(&subs, &centre, &mut t);
        if e >= err {
            break;
        }
        (s, err) = (t, e);
    }
    write_block(x, &s, out);
}

#[inline(always)]
fn write_block(x: &[f32; QK_K], s: &Scales, out: &mut [u8]) {
    out[0..2].copy_from_slice(&f16_scale(s.d).to_le_bytes());
    out[2..4].copy_from_slice(&f16_scale(s.dmin).to_le_bytes());
    out[4..16].copy_from_slice(&pack_scales(&s.sc, &s.m));
    let mut q = [0u8; QK_K];
    for j in 0..NSUB {
        let b = -s.dmin * s.m[j] as f32;
        let ia = inverse(s.d * s.sc[j] as f32);
        for i in SUB * j..SUB * (j + 1) {
            q[i] = level(x[i], b, ia) as u8;
        }
    }
    for c in 0..4 {
        for l in 0..32 {
            out[16 + 32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_small_is_ties_to_even() {
        for k in 0..64 {
            let t = k as f32 * 0.25;
            assert_eq!(round_small(t), t.round_ties_even(), "{t}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_assign_matches_scalar_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            // Written to the stream itself: the harness captures `eprintln!` of passing tests.
            use std::io::Write;
            let _ = std::io::stderr()
                .write_all(b"q4_k search: this CPU has no AVX2; its vector assignment was not tested\n");
            return;
        }
        let mut rng = crate::quant::measure::Rng::new(3);
        for i in 0..2000 {
            let mut x = [0f32; SUB];
            for v in x.iter_mut() {
                *v = rng.gaussian() as f32;
            }
            if i % 7 == 0 {
                x[i % SUB] = 1e30;
            }
            let sub = Sub::new(&x);
            let a = (rng.uniform() * 0.5) as f32 * (i % 5 != 0) as u8 as f32;
            let b = -(rng.uniform() * 2.0) as f32;
            let b3 = [b, b * 0.5, b * 1.5];
            let (e, ev) = (sub.errors3::<false>(a, &b3), sub.errors3::<true>(a, &b3));
            assert_eq!(e.map(f32::to_bits), ev.map(f32::to_bits), "case {i}: a {a} b {b}");
            let [s] = sub.assign::<false, 1>(&[a], &[b]);
            let [v] = sub.assign::<true, 1>(&[a], &[b]);
            assert_eq!(
                (s.err.to_bits(), s.q.to_bits(), s.qq.to_bits(), s.qx.to_bits()),
                (v.err.to_bits(), v.q.to_bits(), v.qq.to_bits(), v.qx.to_bits()),
                "case {i}: a {a} b {b}"
            );
        }
    }
}
