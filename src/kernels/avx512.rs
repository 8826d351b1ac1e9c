//! AVX-512 kernels (F, BW, VL, VNNI). Integer tiles: one `vpdpbusd` multiplies four weights of
//! each of 16 rows (unsigned, biased by 128) by four activations broadcast from memory; the bias
//! is removed by starting each block's sum at `-128 * sum(x)`. Each weight block is loaded once
//! and applied to up to 8 activation vectors.

// Kernels index several parallel register arrays by the same loop variable.
#![allow(clippy::needless_range_loop)]

use super::float::FloatTiles;
use super::k4::{self, K4Tiles};
use super::layout::{Avx512Tiles, Job};
use super::pack::{IntKind, Tiled, TILE};
use super::s2::{self, S2Tiles};
use super::s3::{self, S3Tiles};
use super::s4::{self, S4Tiles};
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

unsafe fn int_tiles(j: &Job<Tiled>, tiles: Range<usize>) {
    let nib = j.layout.kind == IntKind::Nib;
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

unsafe fn tile_n<const NIB: bool>(j: &Job<Tiled>, ti: usize, t0: usize, m: usize) {
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

/// Raw nibbles, low then high: vpdpbusd's unsigned operand as they are.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_raw(q: *const u8, low: __m512i) -> [__m512i; 8] {
    let mut w = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        let v = _mm512_load_si512(q.add(64 * k) as *const _);
        w[k] = _mm512_and_si512(v, low);
        w[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
    }
    w
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const NIB: bool, const T: usize>(j: &Job<Tiled>, ti: usize, t0: usize) {
    let t = j.layout;
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
        for h in 0..2 {
            // Half the pair's lines per block: a burst of all of them would overflow the miss
            // queue and have prefetches dropped (measured: q4_k streamed at half speed so).
            let lines = pb / 64;
            for l in h * lines.div_ceil(2)..((h + 1) * lines.div_ceil(2)).min(lines) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
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

unsafe fn float_tiles(j: &Job<FloatTiles>, tiles: Range<usize>) {
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.n {
            let m = (j.n - t0).min(MAXT);
            macro_rules! go {
                ($($t:literal)*) => {
                    match (j.layout.bf16, m) {
                        $((true, $t) => ftile::<true, $t>(j, ti, t0),)*
                        $((false, $t) => ftile::<false, $t>(j, ti, t0),)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(1 2 3 4 5 6 7 8);
            t0 += m;
        }
    }
}

/// Tokens t0..t0+T through float tile `ti`. Two accumulators per token, for even and odd
/// columns, halve the dependency chain of FMAs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn ftile<const BF: bool, const T: usize>(j: &Job<FloatTiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let x0 = j.xs.as_ptr().add(t0 * j.cols);
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let mut even = [_mm512_setzero_ps(); T];
    let mut odd = [_mm512_setzero_ps(); T];
    // Pairs of columns: one bf16 group, or two f32 groups.
    let pairs = j.cols / 2;
    for c2 in 0..pairs {
        let (we, wo) = if BF {
            let p = base.add(c2 * 64);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF_INT) as *const i8);
            let v = _mm512_load_si512(p as *const _);
            (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)), _mm512_castsi512_ps(_mm512_and_si512(v, high)))
        } else {
            let p = base.add(c2 * 128);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF_INT) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF_INT + 64) as *const i8);
            (_mm512_load_ps(p as *const f32), _mm512_load_ps(p.add(64) as *const f32))
        };
        for k in 0..T {
            let x = x0.add(k * j.cols + 2 * c2);
            even[k] = _mm512_fmadd_ps(we, _mm512_set1_ps(*x), even[k]);
            odd[k] = _mm512_fmadd_ps(wo, _mm512_set1_ps(*x.add(1)), odd[k]);
        }
    }
    if j.cols % 2 == 1 {
        // The last column: a bf16 group's low half, or a whole f32 group.
        let c = j.cols - 1;
        let w = if BF {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_load_si512(base.add(c / 2 * 64) as *const _)))
        } else {
            _mm512_load_ps(base.add(c * 64) as *const f32)
        };
        for k in 0..T {
            even[k] = _mm512_fmadd_ps(w, _mm512_set1_ps(*x0.add(k * j.cols + c)), even[k]);
        }
    }
    let r0 = ti * TILE;
    let mask = ((1u32 << (j.rows - r0).min(TILE)) - 1) as __mmask16;
    for k in 0..T {
        _mm512_mask_storeu_ps(j.y.add((t0 + k) * j.ystride + r0), mask, _mm512_add_ps(even[k], odd[k]));
    }
}

unsafe fn k4_tiles(j: &Job<K4Tiles>, tiles: Range<usize>) {
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.acts.n {
            let m = (j.acts.n - t0).min(MAXT);
            match m {
                1 => k4_tile::<1>(j, ti, t0),
                2 => k4_tile::<2>(j, ti, t0),
                3 => k4_tile::<3>(j, ti, t0),
                4 => k4_tile::<4>(j, ti, t0),
                5 => k4_tile::<5>(j, ti, t0),
                6 => k4_tile::<6>(j, ti, t0),
                7 => k4_tile::<7>(j, ti, t0),
                _ => k4_tile::<8>(j, ti, t0),
            }
            t0 += m;
        }
    }
}

/// 16 bytes as 16 f32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bytes_f32(p: *const u8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(p as *const __m128i)))
}

/// Tokens t0..t0+T through q4_k tile `ti`: the integer sums as for a 4-bit block, then the
/// sub-block's scale and offset (see `k4`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn k4_tile<const T: usize>(j: &Job<K4Tiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let low = _mm512_set1_epi8(0x0f);
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let xc: [*const i32; T] = std::array::from_fn(|k| acts.c_ptr(t0 + k));
    let xs: [*const f32; T] = std::array::from_fn(|k| acts.s_ptr(t0 + k));
    let mut acc = [_mm512_setzero_ps(); T];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * k4::SB_BYTES);
        let ahead = sb.wrapping_add(k4::PF);
        let dv = _mm512_cvtph_ps(_mm256_load_si256(sb.add(k4::D_OFF) as *const __m256i));
        let mv = _mm512_cvtph_ps(_mm256_load_si256(sb.add(k4::DMIN_OFF) as *const __m256i));
        for sub in 0..k4::SUB {
            // A few lines per sub-block rather than a burst that would overflow the miss queue.
            for l in k4::PF_LINES * sub..(k4::PF_LINES * (sub + 1)).min(k4::SB_BYTES / 64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let b = s * k4::SUB + sub;
            // The table is q - 8: the raw nibble is the unsigned operand, and the block sum
            // starts at -8 * sum(x) = c / 16 instead of the bias correction c.
            let w = decode_raw(sb.add(sub * 256), low);
            let dsc = _mm512_mul_ps(dv, bytes_f32(sb.add(k4::SC_OFF + sub * TILE)));
            let mn = _mm512_mul_ps(mv, bytes_f32(sb.add(k4::M_OFF + sub * TILE)));
            let off = _mm512_sub_ps(mn, _mm512_mul_ps(_mm512_set1_ps(8.0), dsc));
            for k in 0..T {
                let x = xq[k].add(b * 8);
                let mut s0 = _mm512_set1_epi32(*xc[k].add(b) / 16);
                let mut s1 = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, w[g], _mm512_set1_epi32(*x.add(g)));
                    s1 = _mm512_dpbusd_epi32(s1, w[g + 1], _mm512_set1_epi32(*x.add(g + 1)));
                }
                let scale = _mm512_mul_ps(dsc, _mm512_set1_ps(*xd[k].add(b)));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), scale, acc[k]);
                acc[k] = _mm512_fnmadd_ps(off, _mm512_set1_ps(*xs[k].add(b)), acc[k]);
            }
        }
    }
    let r0 = ti * TILE;
    let mask = ((1u32 << (j.rows - r0).min(TILE)) - 1) as __mmask16;
    for (k, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(j.y.add((t0 + k) * j.ystride + r0), mask, *a);
    }
}

unsafe fn s4_tiles(j: &Job<S4Tiles>, tiles: Range<usize>) {
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.acts.n {
            let m = (j.acts.n - t0).min(MAXT);
            match m {
                1 => s4_tile::<1>(j, ti, t0),
                2 => s4_tile::<2>(j, ti, t0),
                3 => s4_tile::<3>(j, ti, t0),
                4 => s4_tile::<4>(j, ti, t0),
                5 => s4_tile::<5>(j, ti, t0),
                6 => s4_tile::<6>(j, ti, t0),
                7 => s4_tile::<7>(j, ti, t0),
                _ => s4_tile::<8>(j, ti, t0),
            }
            t0 += m;
        }
    }
}

/// 16 signed bytes as 16 i32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bytes_i32(p: *const u8) -> __m512i {
    _mm512_cvtepi8_epi32(_mm_load_si128(p as *const __m128i))
}

/// Tokens t0..t0+T through q4_s tile `ti`: the two half-block sums of a 4-bit block (low
/// nibbles, then high), each started at its half's bias correction, combined by the integer
/// sub-scales (see `s4`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn s4_tile<const T: usize>(j: &Job<S4Tiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let low = _mm512_set1_epi8(0x0f);
    let tbl = _mm512_broadcast_i32x4(_mm_loadu_si128(s4::UTABLE.as_ptr() as *const __m128i));
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let xh: [*const i32; T] = std::array::from_fn(|k| acts.h_ptr(t0 + k));
    let mut acc = [_mm512_setzero_ps(); T];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s4::SB_BYTES);
        let ahead = sb.wrapping_add(s4::PF);
        let dv = _mm512_cvtph_ps(_mm256_load_si256(sb.add(s4::D_OFF) as *const __m256i));
        let dv = _mm512_mul_ps(dv, _mm512_set1_ps(s4::D_UNIT));
        for sub in 0..s4::SUB {
            for l in s4::PF_LINES * sub..(s4::PF_LINES * (sub + 1)).min(s4::SB_BYTES / 64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let b = s * s4::SUB + sub;
            let w = decode_nib(sb.add(sub * 256), tbl, low);
            let slo = bytes_i32(sb.add(s4::SLO_OFF + sub * TILE));
            let shi = bytes_i32(sb.add(s4::SHI_OFF + sub * TILE));
            for k in 0..T {
                let x = xq[k].add(b * 8);
                let mut lo = _mm512_set1_epi32(*xh[k].add(2 * b));
                let mut hi = _mm512_set1_epi32(*xh[k].add(2 * b + 1));
                for g in 0..4 {
                    lo = _mm512_dpbusd_epi32(lo, w[g], _mm512_set1_epi32(*x.add(g)));
                    hi = _mm512_dpbusd_epi32(hi, w[g + 4], _mm512_set1_epi32(*x.add(g + 4)));
                }
                let isum = _mm512_add_epi32(_mm512_mullo_epi32(lo, slo), _mm512_mullo_epi32(hi, shi));
                let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*xd[k].add(b)));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[k]);
            }
        }
    }
    let r0 = ti * TILE;
    let mask = ((1u32 << (j.rows - r0).min(TILE)) - 1) as __mmask16;
    for (k, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(j.y.add((t0 + k) * j.ystride + r0), mask, *a);
    }
}

/// Tiles `tiles` of a layout whose tile kernel takes up to `MAXT` tokens as a const parameter.
macro_rules! by_tokens {
    ($j:expr, $tiles:expr, $kernel:ident) => {{
        let j = $j;
        for ti in $tiles {
            let mut t0 = 0;
            while t0 < j.acts.n {
                let m = (j.acts.n - t0).min(MAXT);
                match m {
                    1 => $kernel::<1>(j, ti, t0),
                    2 => $kernel::<2>(j, ti, t0),
                    3 => $kernel::<3>(j, ti, t0),
                    4 => $kernel::<4>(j, ti, t0),
                    5 => $kernel::<5>(j, ti, t0),
                    6 => $kernel::<6>(j, ti, t0),
                    7 => $kernel::<7>(j, ti, t0),
                    _ => $kernel::<8>(j, ti, t0),
                }
                t0 += m;
            }
        }
    }};
}

/// `v` shifted right by `n` bits per 16-bit lane (left by `-n` when `n` is negative). `n` is a
/// constant wherever the kernels call it (their group loops unroll), and compiles to an
/// immediate shift.
#[inline(always)]
unsafe fn shift_right16(v: __m512i, n: i32) -> __m512i {
    if n >= 0 {
        _mm512_srl_epi16(v, _mm_cvtsi32_si128(n))
    } else {
        _mm512_sll_epi16(v, _mm_cvtsi32_si128(-n))
    }
}

/// Store one tile's accumulators for tokens t0..t0+T.
#[inline(always)]
unsafe fn store_tile<const T: usize>(y: *mut f32, ystride: usize, rows: usize, ti: usize, t0: usize, acc: &[__m512; T]) {
    let r0 = ti * TILE;
    let mask = ((1u32 << (rows - r0).min(TILE)) - 1) as __mmask16;
    for (k, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(y.add((t0 + k) * ystride + r0), mask, *a);
    }
}

/// The (biased) table values of one q3_s block's 32 weights of 16 rows, group by group: two
/// crumb bits, the high bit moved to bit 2, the half's grid bit as bit 3 (`s3`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_s3(blk: *const u8, sel: *const u8, tbl: __m512i) -> [__m512i; 8] {
    let crumbs = [_mm512_load_si512(blk as *const _), _mm512_load_si512(blk.add(64) as *const _)];
    let high = _mm512_load_si512(blk.add(128) as *const _);
    let (m3, m7) = (_mm512_set1_epi8(3), _mm512_set1_epi8(7));
    let eight = _mm512_set1_epi8(8);
    let grid = [
        _mm512_maskz_mov_epi32(sel.cast::<u16>().read_unaligned(), eight),
        _mm512_maskz_mov_epi32(sel.add(2).cast::<u16>().read_unaligned(), eight),
    ];
    let mut w = [_mm512_setzero_si512(); 8];
    for g in 0..8 {
        let c = shift_right16(crumbs[g / 4], 2 * (g % 4) as i32);
        let h = shift_right16(high, g as i32 - 2);
        // Bits 0-1 from the crumbs, the rest from the high bits; then bit 2 kept, bit 3 the grid.
        let t = _mm512_ternarylogic_epi32::<0xe4>(c, h, m3);
        let t = _mm512_ternarylogic_epi32::<0xea>(t, m7, grid[g / 4]);
        w[g] = _mm512_shuffle_epi8(tbl, t);
    }
    w
}

/// Tokens t0..t0+T through q3_s tile `ti`: each block's sum (started at its bias correction)
/// times the integer sub-scale (see `s3`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn s3_tile<const T: usize>(j: &Job<S3Tiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let tbl = _mm512_broadcast_i32x4(_mm_loadu_si128(s3::UTABLE.as_ptr() as *const __m128i));
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let xc: [*const i32; T] = std::array::from_fn(|k| acts.c_ptr(t0 + k));
    let mut acc = [_mm512_setzero_ps(); T];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s3::SB_BYTES);
        let ahead = sb.wrapping_add(s3::PF);
        let dv = _mm512_cvtph_ps(_mm256_load_si256(sb.add(s3::D_OFF) as *const __m256i));
        let dv = _mm512_mul_ps(dv, _mm512_set1_ps(s3::D_UNIT));
        for sub in 0..s3::SUB {
            for l in s3::PF_LINES * sub..(s3::PF_LINES * (sub + 1)).min(s3::SB_BYTES / 64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let b = s * s3::SUB + sub;
            let w = decode_s3(sb.add(sub * s3::BLK_BYTES), sb.add(s3::SEL_OFF + 4 * sub), tbl);
            let sc = bytes_i32(sb.add(s3::SC_OFF + sub * TILE));
            for k in 0..T {
                let x = xq[k].add(b * 8);
                let mut s0 = _mm512_set1_epi32(*xc[k].add(b));
                let mut s1 = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, w[g], _mm512_set1_epi32(*x.add(g)));
                    s1 = _mm512_dpbusd_epi32(s1, w[g + 1], _mm512_set1_epi32(*x.add(g + 1)));
                }
                let isum = _mm512_mullo_epi32(_mm512_add_epi32(s0, s1), sc);
                let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*xd[k].add(b)));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[k]);
            }
        }
    }
    store_tile(j.y, j.ystride, j.rows, ti, t0, &acc);
}

/// The (biased) table values of one q2_s block's 32 weights of 16 rows, group by group. With
/// VBMI, `vpermb` reads only bits 0-5 of each shifted byte, so a table repeated 16 times over
/// its 64 entries ignores the neighbouring crumbs and no mask is needed; else mask and `pshufb`.
#[inline(always)]
unsafe fn decode_s2<const VBMI: bool>(blk: *const u8, tbl: __m512i) -> [__m512i; 8] {
    let crumbs = [_mm512_load_si512(blk as *const _), _mm512_load_si512(blk.add(64) as *const _)];
    let m3 = _mm512_set1_epi8(3);
    let mut w = [_mm512_setzero_si512(); 8];
    for g in 0..8 {
        let c = shift_right16(crumbs[g / 4], 2 * (g % 4) as i32);
        w[g] = if VBMI {
            _mm512_permutexvar_epi8(c, tbl)
        } else {
            _mm512_shuffle_epi8(tbl, _mm512_and_si512(c, m3))
        };
    }
    w
}

/// Tokens t0..t0+T through q2_s tile `ti`: four quarter sums per block (each started at its
/// bias correction) combined by the integer sub-scales (see `s2`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn s2_tile_vbmi<const T: usize>(j: &Job<S2Tiles>, ti: usize, t0: usize) {
    s2_tile::<T, true>(j, ti, t0)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn s2_tile_plain<const T: usize>(j: &Job<S2Tiles>, ti: usize, t0: usize) {
    s2_tile::<T, false>(j, ti, t0)
}

#[inline(always)]
unsafe fn s2_tile<const T: usize, const VBMI: bool>(j: &Job<S2Tiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    // The table in each 16-byte lane (pshufb), which is also every 4 entries of 64 (vpermb).
    let tbl = _mm512_broadcast_i32x4(_mm_loadu_si128(s2::UTABLE4.as_ptr() as *const __m128i));
    let (low, eight) = (_mm512_set1_epi32(15), _mm512_set1_epi32(8));
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let xe: [*const i32; T] = std::array::from_fn(|k| acts.e_ptr(t0 + k));
    let mut acc = [_mm512_setzero_ps(); T];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s2::SB_BYTES);
        let ahead = sb.wrapping_add(s2::PF);
        let dv = _mm512_cvtph_ps(_mm256_load_si256(sb.add(s2::D_OFF) as *const __m256i));
        let dv = _mm512_mul_ps(dv, _mm512_set1_ps(s2::D_UNIT));
        for sub in 0..s2::SUB {
            for l in s2::PF_LINES * sub..(s2::PF_LINES * (sub + 1)).min(s2::SB_BYTES / 64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let b = s * s2::SUB + sub;
            let w = decode_s2::<VBMI>(sb.add(sub * s2::BLK_BYTES), tbl);
            let mut sc = [_mm512_setzero_si512(); 4];
            for p in 0..2 {
                let u = _mm512_cvtepu8_epi32(_mm_load_si128(sb.add(s2::SC_OFF + 32 * sub + 16 * p) as *const __m128i));
                sc[2 * p] = _mm512_sub_epi32(_mm512_and_si512(u, low), eight);
                sc[2 * p + 1] = _mm512_sub_epi32(_mm512_srli_epi32::<4>(u), eight);
            }
            for k in 0..T {
                let x = xq[k].add(b * 8);
                let mut part = [_mm512_setzero_si512(); 4];
                for q in 0..4 {
                    part[q] = _mm512_set1_epi32(*xe[k].add(4 * b + q));
                    part[q] = _mm512_dpbusd_epi32(part[q], w[2 * q], _mm512_set1_epi32(*x.add(2 * q)));
                    part[q] = _mm512_dpbusd_epi32(part[q], w[2 * q + 1], _mm512_set1_epi32(*x.add(2 * q + 1)));
                }
                let lo = _mm512_add_epi32(_mm512_mullo_epi32(part[0], sc[0]), _mm512_mullo_epi32(part[1], sc[1]));
                let hi = _mm512_add_epi32(_mm512_mullo_epi32(part[2], sc[2]), _mm512_mullo_epi32(part[3], sc[3]));
                let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*xd[k].add(b)));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), scale, acc[k]);
            }
        }
    }
    store_tile(j.y, j.ystride, j.rows, ti, t0, &acc);
}

// The layouts' entry points on this path.

impl Avx512Tiles for Tiled {
    unsafe fn tiles_avx512(j: &Job<Self>, tiles: Range<usize>) {
        int_tiles(j, tiles)
    }
}

impl Avx512Tiles for FloatTiles {
    unsafe fn tiles_avx512(j: &Job<Self>, tiles: Range<usize>) {
        float_tiles(j, tiles)
    }
}

impl Avx512Tiles for K4Tiles {
    unsafe fn tiles_avx512(j: &Job<Self>, tiles: Range<usize>) {
        k4_tiles(j, tiles)
    }
}

impl Avx512Tiles for S4Tiles {
    unsafe fn tiles_avx512(j: &Job<Self>, tiles: Range<usize>) {
        s4_tiles(j, tiles)
    }
}

impl Avx512Tiles for S3Tiles {
    unsafe fn tiles_avx512(j: &Job<Self>, tiles: Range<usize>) {
        by_tokens!(j, tiles, s3_tile)
    }
}

impl Avx512Tiles for S2Tiles {
    unsafe fn tiles_avx512(j: &Job<Self>, tiles: Range<usize>) {
        if std::arch::is_x86_feature_detected!("avx512vbmi") {
            by_tokens!(j, tiles, s2_tile_vbmi)
        } else {
            by_tokens!(j, tiles, s2_tile_plain)
        }
    }
}
