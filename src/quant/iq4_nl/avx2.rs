//! AVX2 versions of iq4_nl's two inner loops, which are most of the int4 quantizers' time: the
//! candidate sums of the scale search and `evaluate`. The nearest-grid lookup is one gather from
//! the cell table. Each does, lane for lane, the f32 operations of the scalar loop it replaces in
//! the same order (a separate multiply and add, never a fused one), so both give the same bits;
//! the digest test and `builds_agree_bit_for_bit` check it.

use super::{CELL_OFFSET, CELL_VALUE, NC, NCELLS};
use std::arch::x86_64::*;

// The candidate loop holds 12 candidates as 8 + 4 lanes.
const _: () = assert!(NC == 12);

/// `sum(g * v)` and `sum(g * g)` over the weights, in weight order, for each candidate `k`,
/// where g is the grid value of cell `v * ids2[k] + CELL_OFFSET`. Every such cell must be in the
/// table (the caller's bound).
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn candidate_sums<const N: usize>(
    x: &[f32; N],
    ids2: &[f32; NC],
) -> ([f32; NC], [f32; NC]) {
    let table = CELL_VALUE.as_ptr();
    let (s8, s4) = (
        _mm256_loadu_ps(ids2.as_ptr()),
        _mm_loadu_ps(ids2.as_ptr().add(8)),
    );
    let (off8, off4) = (_mm256_set1_ps(CELL_OFFSET), _mm_set1_ps(CELL_OFFSET));
    let (mut gx8, mut gg8) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut gx4, mut gg4) = (_mm_setzero_ps(), _mm_setzero_ps());
    for &v in x {
        let v8 = _mm256_set1_ps(v);
        let v4 = _mm256_castps256_ps128(v8);
        let c8 = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v8, s8), off8));
        let c4 = _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(v4, s4), off4));
        let g8 = _mm256_i32gather_ps::<4>(table, c8);
        let g4 = _mm_i32gather_ps::<4>(table, c4);
        gx8 = _mm256_add_ps(gx8, _mm256_mul_ps(g8, v8));
        gg8 = _mm256_add_ps(gg8, _mm256_mul_ps(g8, g8));
        gx4 = _mm_add_ps(gx4, _mm_mul_ps(g4, v4));
        gg4 = _mm_add_ps(gg4, _mm_mul_ps(g4, g4));
    }
    let (mut sgx, mut sgg) = ([0f32; NC], [0f32; NC]);
    _mm256_storeu_ps(sgx.as_mut_ptr(), gx8);
    _mm_storeu_ps(sgx.as_mut_ptr().add(8), gx4);
    _mm256_storeu_ps(sgg.as_mut_ptr(), gg8);
    _mm_storeu_ps(sgg.as_mut_ptr().add(8), gg4);
    (sgx, sgg)
}

/// `evaluate` at `M` scales in one pass: eight lanes over the weights, summed by `hsum`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn evaluate_m<const N: usize, const M: usize>(
    x: &[f32; N],
    d: [f32; M],
) -> [(f32, f32, f32); M] {
    let table = CELL_VALUE.as_ptr();
    let (two, off) = (_mm256_set1_ps(2.0), _mm256_set1_ps(CELL_OFFSET));
    let (zero, top) = (_mm256_setzero_ps(), _mm256_set1_ps((NCELLS - 1) as f32));
    let mut id = [zero; M];
    let mut vd = [zero; M];
    for m in 0..M {
        id[m] = _mm256_set1_ps(1.0 / d[m]);
        vd[m] = _mm256_set1_ps(d[m]);
    }
    let (mut e, mut gx, mut gg) = ([zero; M], [zero; M], [zero; M]);
    for c in 0..N / 8 {
        let v = _mm256_loadu_ps(x.as_ptr().add(8 * c));
        for m in 0..M {
            let t = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(v, id[m]), two), off);
            // max(t, 0) is 0 for a NaN t, like f32::max; after it t is in [0, NCELLS - 1], so
            // the scalar code's integer clamp never changes the cell.
            let t = _mm256_min_ps(_mm256_max_ps(t, zero), top);
            let g = _mm256_i32gather_ps::<4>(table, _mm256_cvttps_epi32(t));
            let r = _mm256_sub_ps(v, _mm256_mul_ps(vd[m], g));
            e[m] = _mm256_add_ps(e[m], _mm256_mul_ps(r, r));
            gx[m] = _mm256_add_ps(gx[m], _mm256_mul_ps(g, v));
            gg[m] = _mm256_add_ps(gg[m], _mm256_mul_ps(g, g));
        }
    }
    reduce(e, gx, gg)
}

/// The `hsum`s of `M` scales' three eight-lane sums.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn reduce<const M: usize>(
    e: [__m256; M],
    gx: [__m256; M],
    gg: [__m256; M],
) -> [(f32, f32, f32); M] {
    let zero = _mm256_setzero_ps();
    let mut out = [(0f32, 0f32, 0f32); M];
    let mut m = 0;
    while m < M {
        // Two scales' sums per reduction (the second all zeros when M is odd).
        let n = if m + 1 < M { m + 1 } else { m };
        let keep = if m + 1 < M { -1 } else { 0 };
        let mask = _mm256_castsi256_ps(_mm256_set1_epi32(keep));
        let h = hsum8(
            e[m],
            gx[m],
            gg[m],
            _mm256_and_ps(mask, e[n]),
            _mm256_and_ps(mask, gx[n]),
            _mm256_and_ps(mask, gg[n]),
            zero,
            zero,
        );
        let mut s = [0f32; 8];
        _mm256_storeu_ps(s.as_mut_ptr(), h);
        out[m] = (s[0], s[1], s[2]);
        if m + 1 < M {
            out[m + 1] = (s[3], s[4], s[5]);
        }
        m += 2;
    }
    out
}

/// `hsum` of each of eight vectors, lane i of the result the sum of the i-th, in registers.
/// `hadd(p, q)` is [p0+p1, p2+p3, q0+q1, q2+q3 | p4+p5, p6+p7, q4+q5, q6+q7]; a second round
/// gives each vector's ((v0+v1)+(v2+v3)) in the low half and ((v4+v5)+(v6+v7)) in the high half,
/// and adding the halves gives hsum's order.
#[target_feature(enable = "avx2")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn hsum8(
    a: __m256,
    b: __m256,
    c: __m256,
    d: __m256,
    e: __m256,
    f: __m256,
    g: __m256,
    h: __m256,
) -> __m256 {
    let abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    let efgh = _mm256_hadd_ps(_mm256_hadd_ps(e, f), _mm256_hadd_ps(g, h));
    let lo = _mm256_permute2f128_ps::<0x20>(abcd, efgh);
    let hi = _mm256_permute2f128_ps::<0x31>(abcd, efgh);
    _mm256_add_ps(lo, hi)
}

/// `evaluate`.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn evaluate<const N: usize>(x: &[f32; N], d: f32) -> (f32, f32, f32) {
    evaluate_m(x, [d])[0]
}

/// `evaluate2`.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn evaluate2<const N: usize>(
    x: &[f32; N],
    d0: f32,
    d1: f32,
) -> [(f32, f32, f32); 2] {
    evaluate_m(x, [d0, d1])
}
