//! AVX-512 kernels (F, BW, VL, VNNI). Integer tiles: one `vpdpbusd` multiplies four weights of
//! each of 16 rows (unsigned, biased by 128) by four activations broadcast from memory; the bias
//! is removed by starting each block's sum at `-128 * sum(x)`. Each weight block is loaded once
//! and applied to up to 8 activation vectors.

// Kernels index several parallel register arrays by the same loop variable.
#![allow(clippy::needless_range_loop)]

use super::pack::{IntKind, TILE};
use super::{FloatJob, IntJob};
use std::arch::x86_64::*;
use std::ops::Range;

/// How far ahead of the weight stream to prefetch, in bytes.
/// How far ahead of the weight stream to prefetch, in bytes. Measured on a 2-core EPYC (Zen 4)
/// streaming 1.1 GB of distinct matrices: without it q8_0 reaches ~60% of the bandwidth it does
/// with it; 512 to 4096 bytes all do about equally well. The float kernels read several rows at
/// once and do better with the hardware prefetchers alone.
const PF_INT: usize = 2048;
/// Activation vectors sharing one pass over a tile.
const MAXT: usize = 8;

pub(crate) unsafe fn int_tiles(j: &IntJob, tiles: Range<usize>) {
    let nib = j.t.kind == IntKind::Nib;
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.acts.n {
            let m = (j.acts.n - t0).min(MAXT);
            if nib {
                tile_n::<true>(j, ti, t0, m)
            } else {
                tile_n::<false>(j, ti, t0, m)
            }
            t0 += m;
        }
    }
}

unsafe fn tile_n<const NIB: bool>(j: &IntJob, ti: usize, t0: usize, m: usize) {
    match m {
        1 => tile::<NIB, 1>(j, ti, t0),
        2 => tile::<NIB, 2>(j, ti, t0),
        3 => tile::<NIB, 3>(j, ti, t0),
        4 => tile::<NIB, 4>(j, ti, t0),
        5 => tile::<NIB, 5>(j, ti, t0),
        6 => tile::<NIB, 6>(j, ti, t0),
        7 => tile::<NIB, 7>(j, ti, t0),
        _ => tile::<NIB, 8>(j, ti, t0),
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_q8(q: *const u8) -> [__m512i; 8] {
    let mut w = [_mm512_setzero_si512(); 8];
    for (g, v) in w.iter_mut().enumerate() {
        *v = _mm512_load_si512(q.add(64 * g) as *const _);
    }
    w
}

/// Nibbles through the (biased) table: low nibbles are weights 0..16, high ones 16..32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_nib(q: *const u8, tbl: __m512i, low: __m512i) -> [__m512i; 8] {
    let mut w = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        let v = _mm512_load_si512(q.add(64 * k) as *const _);
        w[k] = _mm512_shuffle_epi8(tbl, _mm512_and_si512(v, low));
        w[k + 4] = _mm512_shuffle_epi8(tbl, _mm512_and_si512(_mm512_srli_epi16::<4>(v), low));
    }
    w
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const NIB: bool, const T: usize>(j: &IntJob, ti: usize, t0: usize) {
    let t = j.t;
    // Compile-time sizes, so the prefetch loop unrolls.
    let (qb, pb) = if NIB { (256, 576) } else { (512, 1088) };
    debug_assert_eq!((qb, pb), (t.qbytes(), t.pair_bytes()));
    let base = j.data.add(ti * t.tile_bytes());
    let utab = t.unsigned_table();
    let tbl = _mm512_broadcast_i32x4(_mm_loadu_si128(utab.as_ptr() as *const __m128i));
    let low = _mm512_set1_epi8(0x0f);
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let xc: [*const i32; T] = std::array::from_fn(|k| acts.c_ptr(t0 + k));
    let mut acc = [_mm512_setzero_ps(); T];
    for p in 0..t.nbp / 2 {
        let pair = base.add(p * pb);
        let ahead = pair.wrapping_add(PF_INT);
        let mut l = 0;
        while l < pb {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
            l += 64;
        }
        for h in 0..2 {
            let b = 2 * p + h;
            let w = if NIB { decode_nib(pair.add(h * qb), tbl, low) } else { decode_q8(pair.add(h * qb)) };
            let dw = _mm512_cvtph_ps(_mm256_load_si256(pair.add(2 * qb + h * 32) as *const __m256i));
            for k in 0..T {
                let x = xq[k].add(b * 8);
                // Two chains of four, so consecutive vpdpbusd do not wait on each other.
                let mut s0 = _mm512_set1_epi32(*xc[k].add(b));
                let mut s1 = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, w[g], _mm512_set1_epi32(*x.add(g)));
                    s1 = _mm512_dpbusd_epi32(s1, w[g + 1], _mm512_set1_epi32(*x.add(g + 1)));
                }
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd[k].add(b)));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), scale, acc[k]);
            }
        }
    }
    let r0 = ti * TILE;
    let mask = ((1u32 << (j.rows - r0).min(TILE)) - 1) as __mmask16;
    for (k, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(j.y.add((t0 + k) * j.ystride + r0), mask, *a);
    }
}

pub(crate) unsafe fn float_rows(j: &FloatJob, rows: Range<usize>) {
    let mut r = rows.start;
    while r < rows.end {
        let rr = if rows.end - r >= 4 { 4 } else { 1 };
        let mut t0 = 0;
        while t0 < j.n {
            let tt = if j.n - t0 >= 4 { 4 } else { 1 };
            match (j.bf16, rr, tt) {
                (true, 4, 4) => frows::<true, 4, 4>(j, r, t0),
                (true, 4, _) => frows::<true, 4, 1>(j, r, t0),
                (true, _, 4) => frows::<true, 1, 4>(j, r, t0),
                (true, _, _) => frows::<true, 1, 1>(j, r, t0),
                (false, 4, 4) => frows::<false, 4, 4>(j, r, t0),
                (false, 4, _) => frows::<false, 4, 1>(j, r, t0),
                (false, _, 4) => frows::<false, 1, 4>(j, r, t0),
                (false, _, _) => frows::<false, 1, 1>(j, r, t0),
            }
            t0 += tt;
        }
        r += rr;
    }
}

/// 16 weights as f32; bf16 is the upper half of an f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_w<const BF: bool>(p: *const u8, mask: __mmask16) -> __m512 {
    if BF {
        let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    } else {
        _mm512_maskz_loadu_ps(mask, p as *const f32)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn frows<const BF: bool, const R: usize, const T: usize>(j: &FloatJob, r0: usize, t0: usize) {
    let es = if BF { 2 } else { 4 };
    let stride = j.cols * es;
    let w0 = j.data.add(r0 * stride);
    let x0 = j.xs.as_ptr().add(t0 * j.cols);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut c = 0;
    while c < j.cols {
        // 32 columns per step where possible (a whole cache line of bf16), then masked tails.
        let step = if j.cols - c >= 32 { 32 } else { (j.cols - c).min(16) };
        let mut cc = c;
        while cc < c + step {
            let mask = ((1u32 << (c + step - cc).min(16)) - 1) as __mmask16;
            let mut x = [_mm512_setzero_ps(); T];
            for (k, v) in x.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, x0.add(k * j.cols + cc));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let w = load_w::<BF>(w0.add(r * stride + cc * es), mask);
                for k in 0..T {
                    a[k] = _mm512_fmadd_ps(w, x[k], a[k]);
                }
            }
            cc += 16;
        }
        c += step;
    }
    for (r, a) in acc.iter().enumerate() {
        for k in 0..T {
            *j.y.add((t0 + k) * j.ystride + r0 + r) = _mm512_reduce_add_ps(a[k]);
        }
    }
}
