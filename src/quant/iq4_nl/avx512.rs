//! AVX-512 versions of the loops in `avx2`, with the nearest-grid lookup done in registers
//! instead of by gather: a branch-free binary search over the 15 cell boundaries (four compares,
//! each against a boundary picked by a 16-entry permute), then a permute into the grid. The cell
//! of `t` is `trunc(t)`, and `CELL_INDEX[c]` counts the boundaries `BOUNDS[k] <= c`; the
//! boundaries are integers, so for `t >= 0` that is the count of `BOUNDS[k] <= t`, which the
//! search finds (`lookup_matches_table` checks every cell). The f32 arithmetic is the scalar
//! loops', lane for lane and in the same order.

use super::{CELL_OFFSET, IQ4_NL_GRID, NC, NCELLS};
use std::arch::x86_64::*;

/// The grid positions (in cells, 2u + CELL_OFFSET) where the nearest grid point moves up one:
/// the midpoint of grid points k and k + 1 is at u = (G[k] + G[k+1]) / 2, cell G[k] + G[k+1] +
/// 320 (cell c covers u in [c/2 - 160, c/2 - 159.5), and every midpoint is a multiple of 0.5).
pub(super) const BOUNDS: [f32; 15] = {
    let mut b = [0f32; 15];
    let mut k = 0;
    while k < 15 {
        b[k] = (IQ4_NL_GRID[k] as i32 + IQ4_NL_GRID[k + 1] as i32 + CELL_OFFSET as i32) as f32;
        k += 1;
    }
    b
};

/// `BOUNDS[i + shift]` for i in 0..16 (clamped at the last): the boundary each search step
/// compares with, picked by the index found so far.
const fn shifted(shift: usize) -> [f32; 16] {
    let mut t = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        let k = if i + shift < 15 { i + shift } else { 14 };
        t[i] = BOUNDS[k];
        i += 1;
    }
    t
}
const STEP4: [f32; 16] = shifted(3);
const STEP2: [f32; 16] = shifted(1);
const STEP1: [f32; 16] = shifted(0);
const GRID_F32: [f32; 16] = {
    let mut g = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        g[i] = IQ4_NL_GRID[i] as f32;
        i += 1;
    }
    g
};

/// `CELL_VALUE[trunc(t)]` for each lane, `t` in [0, NCELLS) and not NaN.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn lookup(t: __m512) -> __m512 {
    _mm512_permutexvar_ps(lookup_index(t), _mm512_loadu_ps(GRID_F32.as_ptr()))
}

/// `CELL_INDEX[trunc(t)]` for each lane, `t` in [0, NCELLS) and not NaN.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn lookup_index(t: __m512) -> __m512i {
    let ge = |a: __m512, b: __m512| _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, b);
    let mut i = _mm512_maskz_mov_epi32(ge(t, _mm512_set1_ps(BOUNDS[7])), _mm512_set1_epi32(8));
    let thr = _mm512_permutexvar_ps(i, _mm512_loadu_ps(STEP4.as_ptr()));
    i = _mm512_mask_add_epi32(i, ge(t, thr), i, _mm512_set1_epi32(4));
    let thr = _mm512_permutexvar_ps(i, _mm512_loadu_ps(STEP2.as_ptr()));
    i = _mm512_mask_add_epi32(i, ge(t, thr), i, _mm512_set1_epi32(2));
    let thr = _mm512_permutexvar_ps(i, _mm512_loadu_ps(STEP1.as_ptr()));
    _mm512_mask_add_epi32(i, ge(t, thr), i, _mm512_set1_epi32(1))
}

/// `nearest_indices`, `N` a multiple of 16.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn nearest_indices<const N: usize>(x: &[f32; N], id: f32) -> [u8; N] {
    let (two, off) = (_mm512_set1_ps(2.0), _mm512_set1_ps(CELL_OFFSET));
    let (zero, top) = (_mm512_setzero_ps(), _mm512_set1_ps((NCELLS - 1) as f32));
    let id = _mm512_set1_ps(id);
    let mut out = [0u8; N];
    for c in 0..N / 16 {
        let v = _mm512_loadu_ps(x.as_ptr().add(16 * c));
        let t = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(v, id), two), off);
        let t = _mm512_min_ps(_mm512_max_ps(t, zero), top);
        let i = _mm512_cvtepi32_epi8(lookup_index(t));
        _mm_storeu_si128(out.as_mut_ptr().add(16 * c) as *mut __m128i, i);
    }
    out
}

/// `candidate_sums`: the 12 candidates in lanes 0..12 (lanes 12..16 are computed at cell
/// CELL_OFFSET and dropped).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn candidate_sums<const N: usize>(
    x: &[f32; N],
    ids2: &[f32; NC],
) -> ([f32; NC], [f32; NC]) {
    let mut s = [0f32; 16];
    s[..NC].copy_from_slice(ids2);
    let s = _mm512_loadu_ps(s.as_ptr());
    let off = _mm512_set1_ps(CELL_OFFSET);
    let (mut gx, mut gg) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for &v in x {
        let v = _mm512_set1_ps(v);
        let g = lookup(_mm512_add_ps(_mm512_mul_ps(v, s), off));
        gx = _mm512_add_ps(gx, _mm512_mul_ps(g, v));
        gg = _mm512_add_ps(gg, _mm512_mul_ps(g, g));
    }
    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
    _mm512_storeu_ps(a.as_mut_ptr(), gx);
    _mm512_storeu_ps(b.as_mut_ptr(), gg);
    let (mut sgx, mut sgg) = ([0f32; NC], [0f32; NC]);
    sgx.copy_from_slice(&a[..NC]);
    sgg.copy_from_slice(&b[..NC]);
    (sgx, sgg)
}

/// `evaluate` at `M` scales, `N` a multiple of 16: sixteen weights per vector, whose two halves
/// are added into the eight lanes of the scalar loop in its order (chunk 2i, then 2i + 1).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn evaluate_m<const N: usize, const M: usize>(
    x: &[f32; N],
    d: [f32; M],
) -> [(f32, f32, f32); M] {
    let (two, off) = (_mm512_set1_ps(2.0), _mm512_set1_ps(CELL_OFFSET));
    let (zero, top) = (_mm512_setzero_ps(), _mm512_set1_ps((NCELLS - 1) as f32));
    let mut id = [zero; M];
    let mut vd = [zero; M];
    for m in 0..M {
        id[m] = _mm512_set1_ps(1.0 / d[m]);
        vd[m] = _mm512_set1_ps(d[m]);
    }
    let z8 = _mm256_setzero_ps();
    let (mut e, mut gx, mut gg) = ([z8; M], [z8; M], [z8; M]);
    // Add the two halves of a 16-lane product into 8-lane sums, low half first.
    let add2 = |acc: __m256, p: __m512| {
        let lo = _mm512_castps512_ps256(p);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(p)));
        _mm256_add_ps(_mm256_add_ps(acc, lo), hi)
    };
    for c in 0..N / 16 {
        let v = _mm512_loadu_ps(x.as_ptr().add(16 * c));
        for m in 0..M {
            let t = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(v, id[m]), two), off);
            // max(t, 0) is 0 for a NaN t, like f32::max (the second operand wins).
            let t = _mm512_min_ps(_mm512_max_ps(t, zero), top);
            let g = lookup(t);
            let r = _mm512_sub_ps(v, _mm512_mul_ps(vd[m], g));
            e[m] = add2(e[m], _mm512_mul_ps(r, r));
            gx[m] = add2(gx[m], _mm512_mul_ps(g, v));
            gg[m] = add2(gg[m], _mm512_mul_ps(g, g));
        }
    }
    super::avx2::reduce(e, gx, gg)
}
