//! AVX2 kernels (+FMA, F16C). Without VNNI, int8 products go through `vpmaddubsw`, whose pairwise
//! i16 sums saturate; so each weight's sign moves onto the activation (`vpsignb`) and the unsigned
//! operand is |w| <= 128, keeping every pair sum within 2 * 128 * 127 < 2^15. `vpmaddwd` by ones
//! then adds pairs of pairs: four weights per 32-bit lane, the tile layout's group, 8 rows to a
//! register.

// Kernels index several parallel register arrays by the same loop variable.
#![allow(clippy::needless_range_loop)]

use super::float::FloatTiles;
use super::k4::{self, K4Tiles};
use super::layout::{Avx2Tiles, Job};
use super::pack::{IntKind, Tiled, TILE};
use super::s2::{self, S2Tiles};
use super::s3::{self, S3Tiles};
use super::s4::{self, S4Tiles};
use crate::quant::bytes::MINUS_8_TABLE;
use std::arch::x86_64::*;
use std::ops::Range;

/// Prefetch distance for the integer tiles; see `avx512`.
const PF_INT: usize = 2048;
/// Activation vectors sharing one pass over a tile (16 ymm registers limit it).
const MAXT: usize = 4;

/// How a block's bytes decode (a const parameter of the kernels).
const Q8: u8 = 0;
/// Nibbles through a table (iq4_nl): signed values, sign trick.
const TABLE: u8 = 1;
/// Nibbles whose value is `n - 8` (q4_0, q4_k): the nibble itself is the unsigned operand, with
/// no sign trick, and `8 * sum(x)` is taken off the block sum.
const LINEAR: u8 = 2;

unsafe fn int_tiles(j: &Job<Tiled>, tiles: Range<usize>) {
    let kind = match j.layout.kind {
        IntKind::Q8 => Q8,
        IntKind::Nib if j.layout.table == MINUS_8_TABLE => LINEAR,
        IntKind::Nib => TABLE,
    };
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.acts.n {
            let m = (j.acts.n - t0).min(MAXT);
            macro_rules! go {
                ($($k:ident, $t:literal);*) => {
                    match (kind, m) {
                        $(($k, $t) => tile::<$k, $t>(j, ti, t0),)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(Q8, 1; Q8, 2; Q8, 3; Q8, 4; TABLE, 1; TABLE, 2; TABLE, 3; TABLE, 4;
                LINEAR, 1; LINEAR, 2; LINEAR, 3; LINEAR, 4);
            t0 += m;
        }
    }
}

/// Weights of 8 rows (one half of a tile) of one block: signed, or raw nibbles for `LINEAR`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn decode<const KIND: u8>(q: *const u8, stab: __m256i) -> [__m256i; 8] {
    let mut w = [_mm256_setzero_si256(); 8];
    if KIND != Q8 {
        let low = _mm256_set1_epi8(0x0f);
        for k in 0..4 {
            let v = _mm256_load_si256(q.add(64 * k) as *const __m256i);
            w[k] = _mm256_and_si256(v, low);
            w[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            if KIND == TABLE {
                w[k] = _mm256_shuffle_epi8(stab, w[k]);
                w[k + 4] = _mm256_shuffle_epi8(stab, w[k + 4]);
            }
        }
    } else {
        let bias = _mm256_set1_epi8(-128);
        for (g, v) in w.iter_mut().enumerate() {
            *v = _mm256_xor_si256(_mm256_load_si256(q.add(64 * g) as *const __m256i), bias);
        }
    }
    w
}

/// Per 32-bit lane, the sum of four products of bytes: signed weights, or (`LINEAR`) unsigned
/// nibbles, whose products with int8 cannot saturate `vpmaddubsw` either (2 * 15 * 128).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot4<const KIND: u8>(w: __m256i, x: __m256i, ones: __m256i) -> __m256i {
    if KIND == LINEAR {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones)
    }
}

/// Where a block's integer sum starts: `-8 * sum(x)` for `LINEAR` nibbles (from the bias
/// correction `c = -128 * sum(x)`), else 0.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn isum_start<const KIND: u8>(c: i32) -> __m256i {
    if KIND == LINEAR {
        _mm256_set1_epi32(c / 16)
    } else {
        _mm256_setzero_si256()
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const KIND: u8, const T: usize>(j: &Job<Tiled>, ti: usize, t0: usize) {
    const { assert!(KIND <= LINEAR) };
    let nib = KIND != Q8;
    let t = j.layout;
    // Compile-time sizes, so the prefetch loop unrolls.
    let (qb, pb) = if nib { (256, 576) } else { (512, 1088) };
    debug_assert_eq!((qb, pb), (t.qbytes(), t.pair_bytes()));
    let base = j.data.add(ti * t.tile_bytes());
    let stab = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.table.as_ptr() as *const __m128i));
    let ones = _mm256_set1_epi16(1);
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let xc: [*const i32; T] = std::array::from_fn(|k| acts.c_ptr(t0 + k));
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
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
            for half in 0..2 {
                let w = decode::<KIND>(pair.add(h * qb + 32 * half), stab);
                let sp = pair.add(2 * qb + h * 32 + 16 * half);
                let dw = _mm256_cvtph_ps(_mm_load_si128(sp as *const __m128i));
                for k in 0..T {
                    let x = xq[k].add(b * 8);
                    let mut s0 = isum_start::<KIND>(*xc[k].add(b));
                    let mut s1 = _mm256_setzero_si256();
                    for g in (0..8).step_by(2) {
                        s0 = _mm256_add_epi32(s0, dot4::<KIND>(w[g], _mm256_set1_epi32(*x.add(g)), ones));
                        s1 = _mm256_add_epi32(s1, dot4::<KIND>(w[g + 1], _mm256_set1_epi32(*x.add(g + 1)), ones));
                    }
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xd[k].add(b)));
                    let isum = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                    acc[k][half] = _mm256_fmadd_ps(isum, scale, acc[k][half]);
                }
            }
        }
    }
    store_rows(j.y, j.ystride, j.rows, ti, t0, &acc);
}

/// Write tile `ti`'s outputs for tokens t0..t0+T (`acc[k][half]`: rows 8 half .. 8 half + 8),
/// skipping the padding rows past `rows`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_rows<const T: usize>(y: *mut f32, ystride: usize, rows: usize, ti: usize, t0: usize, acc: &[[__m256; 2]; T]) {
    let r0 = ti * TILE;
    for half in 0..2 {
        let valid = rows.saturating_sub(r0 + 8 * half).min(8);
        if valid == 0 {
            continue;
        }
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (k, a) in acc.iter().enumerate() {
            _mm256_maskstore_ps(y.add((t0 + k) * ystride + r0 + 8 * half), mask, a[half]);
        }
    }
}

/// Activation vectors sharing one pass over a float tile (4 accumulators each).
const MAXT_F: usize = 2;

unsafe fn float_tiles(j: &Job<FloatTiles>, tiles: Range<usize>) {
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.n {
            let m = (j.n - t0).min(MAXT_F);
            match (j.layout.bf16, m) {
                (true, 1) => ftile::<true, 1>(j, ti, t0),
                (true, _) => ftile::<true, 2>(j, ti, t0),
                (false, 1) => ftile::<false, 1>(j, ti, t0),
                (false, _) => ftile::<false, 2>(j, ti, t0),
            }
            t0 += m;
        }
    }
}

/// Weights of rows 8h..8h+8 for columns 2c2 and 2c2+1.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fpair<const BF: bool>(base: *const u8, c2: usize, h: usize) -> (__m256, __m256) {
    if BF {
        let v = _mm256_load_si256(base.add(c2 * 64 + 32 * h) as *const __m256i);
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)), _mm256_castsi256_ps(_mm256_and_si256(v, high)))
    } else {
        let p = base.add(c2 * 128 + 32 * h);
        (_mm256_load_ps(p as *const f32), _mm256_load_ps(p.add(64) as *const f32))
    }
}

/// Tokens t0..t0+T through float tile `ti`; accumulators per token, half tile, column parity.
#[target_feature(enable = "avx2,fma")]
unsafe fn ftile<const BF: bool, const T: usize>(j: &Job<FloatTiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let x0 = j.xs.as_ptr().add(t0 * j.cols);
    let mut acc = [[[_mm256_setzero_ps(); 2]; 2]; T];
    let step = if BF { 64 } else { 128 };
    for c2 in 0..j.cols / 2 {
        let p = base.add(c2 * step);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF_INT) as *const i8);
        if !BF {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF_INT + 64) as *const i8);
        }
        for h in 0..2 {
            let (we, wo) = fpair::<BF>(base, c2, h);
            for k in 0..T {
                let x = x0.add(k * j.cols + 2 * c2);
                acc[k][h][0] = _mm256_fmadd_ps(we, _mm256_set1_ps(*x), acc[k][h][0]);
                acc[k][h][1] = _mm256_fmadd_ps(wo, _mm256_set1_ps(*x.add(1)), acc[k][h][1]);
            }
        }
    }
    if j.cols % 2 == 1 {
        let c = j.cols - 1;
        for h in 0..2 {
            let w = if BF {
                let v = _mm256_load_si256(base.add(c / 2 * 64 + 32 * h) as *const __m256i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
            } else {
                _mm256_load_ps(base.add(c * 64 + 32 * h) as *const f32)
            };
            for k in 0..T {
                acc[k][h][0] = _mm256_fmadd_ps(w, _mm256_set1_ps(*x0.add(k * j.cols + c)), acc[k][h][0]);
            }
        }
    }
    let r0 = ti * TILE;
    for h in 0..2 {
        let valid = j.rows.saturating_sub(r0 + 8 * h).min(8);
        if valid == 0 {
            continue;
        }
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for k in 0..T {
            let v = _mm256_add_ps(acc[k][h][0], acc[k][h][1]);
            _mm256_maskstore_ps(j.y.add((t0 + k) * j.ystride + r0 + 8 * h), mask, v);
        }
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
                _ => k4_tile::<4>(j, ti, t0),
            }
            t0 += m;
        }
    }
}

/// 8 bytes as 8 f32.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bytes_f32(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// Tokens t0..t0+T through q4_k tile `ti` (see `k4`), 8 rows at a time.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_tile<const T: usize>(j: &Job<K4Tiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    // q4_k's nibble table is q - 8: linear.
    let stab = _mm256_setzero_si256();
    let ones = _mm256_set1_epi16(1);
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let xc: [*const i32; T] = std::array::from_fn(|k| acts.c_ptr(t0 + k));
    let xs: [*const f32; T] = std::array::from_fn(|k| acts.s_ptr(t0 + k));
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * k4::SB_BYTES);
        let ahead = sb.wrapping_add(k4::PF);
        for half in 0..2 {
            for l in 19 * half..(19 * (half + 1)).min(k4::SB_BYTES / 64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let dv = _mm256_cvtph_ps(_mm_load_si128(sb.add(k4::D_OFF + 16 * half) as *const __m128i));
            let mv = _mm256_cvtph_ps(_mm_load_si128(sb.add(k4::DMIN_OFF + 16 * half) as *const __m128i));
            for sub in 0..k4::SUB {
                let b = s * k4::SUB + sub;
                let w = decode::<LINEAR>(sb.add(sub * 256 + 32 * half), stab);
                let dsc = _mm256_mul_ps(dv, bytes_f32(sb.add(k4::SC_OFF + sub * TILE + 8 * half)));
                let mn = _mm256_mul_ps(mv, bytes_f32(sb.add(k4::M_OFF + sub * TILE + 8 * half)));
                let off = _mm256_sub_ps(mn, _mm256_mul_ps(_mm256_set1_ps(8.0), dsc));
                for k in 0..T {
                    let x = xq[k].add(b * 8);
                    let mut s0 = isum_start::<LINEAR>(*xc[k].add(b));
                    let mut s1 = _mm256_setzero_si256();
                    for g in (0..8).step_by(2) {
                        s0 = _mm256_add_epi32(s0, dot4::<LINEAR>(w[g], _mm256_set1_epi32(*x.add(g)), ones));
                        s1 = _mm256_add_epi32(s1, dot4::<LINEAR>(w[g + 1], _mm256_set1_epi32(*x.add(g + 1)), ones));
                    }
                    let scale = _mm256_mul_ps(dsc, _mm256_set1_ps(*xd[k].add(b)));
                    let isum = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                    acc[k][half] = _mm256_fmadd_ps(isum, scale, acc[k][half]);
                    acc[k][half] = _mm256_fnmadd_ps(off, _mm256_set1_ps(*xs[k].add(b)), acc[k][half]);
                }
            }
        }
    }
    store_rows(j.y, j.ystride, j.rows, ti, t0, &acc);
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
                _ => s4_tile::<4>(j, ti, t0),
            }
            t0 += m;
        }
    }
}

/// 8 signed bytes as 8 i32.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bytes_i32(p: *const u8) -> __m256i {
    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

/// Tokens t0..t0+T through q4_s tile `ti` (see `s4`), 8 rows at a time: the half-block sums of
/// the table's signed values (low nibbles, then high) combined by the integer sub-scales.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn s4_tile<const T: usize>(j: &Job<S4Tiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let stab = _mm256_broadcastsi128_si256(_mm_loadu_si128(s4::TABLE.as_ptr() as *const __m128i));
    let ones = _mm256_set1_epi16(1);
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s4::SB_BYTES);
        let ahead = sb.wrapping_add(s4::PF);
        for half in 0..2 {
            for l in 19 * half..(19 * (half + 1)).min(s4::SB_BYTES / 64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let dv = _mm256_cvtph_ps(_mm_load_si128(sb.add(s4::D_OFF + 16 * half) as *const __m128i));
            let dv = _mm256_mul_ps(dv, _mm256_set1_ps(s4::D_UNIT));
            for sub in 0..s4::SUB {
                let b = s * s4::SUB + sub;
                let w = decode::<TABLE>(sb.add(sub * 256 + 32 * half), stab);
                let slo = bytes_i32(sb.add(s4::SLO_OFF + sub * TILE + 8 * half));
                let shi = bytes_i32(sb.add(s4::SHI_OFF + sub * TILE + 8 * half));
                for k in 0..T {
                    let x = xq[k].add(b * 8);
                    let mut lo = _mm256_setzero_si256();
                    let mut hi = _mm256_setzero_si256();
                    for g in 0..4 {
                        lo = _mm256_add_epi32(lo, dot4::<TABLE>(w[g], _mm256_set1_epi32(*x.add(g)), ones));
                        hi = _mm256_add_epi32(hi, dot4::<TABLE>(w[g + 4], _mm256_set1_epi32(*x.add(g + 4)), ones));
                    }
                    let isum = _mm256_add_epi32(_mm256_mullo_epi32(lo, slo), _mm256_mullo_epi32(hi, shi));
                    let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*xd[k].add(b)));
                    acc[k][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[k][half]);
                }
            }
        }
    }
    store_rows(j.y, j.ystride, j.rows, ti, t0, &acc);
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
                    _ => $kernel::<4>(j, ti, t0),
                }
                t0 += m;
            }
        }
    }};
}

/// `v` shifted right by `n` bits per 16-bit lane (left by `-n` when `n` is negative); `n` is a
/// constant wherever the kernels call it (their group loops unroll).
#[inline(always)]
unsafe fn shift_right16(v: __m256i, n: i32) -> __m256i {
    if n >= 0 {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(n))
    } else {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128(-n))
    }
}

/// 0x08 in every byte of the 32-bit lanes (rows) whose bit is set in `bits`, else 0.
#[inline(always)]
unsafe fn grid_bits(bits: u8) -> __m256i {
    let lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits as i32), lane), lane);
    _mm256_and_si256(set, _mm256_set1_epi8(8))
}

/// Signed table values of one q3_s block's 32 weights of 8 rows (tile half `half`), group by
/// group (see `s3`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn decode_s3(blk: *const u8, sel: *const u8, half: usize, stab: __m256i) -> [__m256i; 8] {
    let crumbs = [
        _mm256_load_si256(blk.add(32 * half) as *const __m256i),
        _mm256_load_si256(blk.add(64 + 32 * half) as *const __m256i),
    ];
    let high = _mm256_load_si256(blk.add(128 + 32 * half) as *const __m256i);
    let (m3, m4) = (_mm256_set1_epi8(3), _mm256_set1_epi8(4));
    // Grid bits of the block's two halves of 16 weights, for rows 8 half .. 8 half + 8.
    let grid = [grid_bits(*sel.add(half)), grid_bits(*sel.add(2 + half))];
    let mut w = [_mm256_setzero_si256(); 8];
    for g in 0..8 {
        let c = _mm256_and_si256(shift_right16(crumbs[g / 4], 2 * (g % 4) as i32), m3);
        let h = _mm256_and_si256(shift_right16(high, g as i32 - 2), m4);
        let t = _mm256_or_si256(_mm256_or_si256(c, h), grid[g / 4]);
        w[g] = _mm256_shuffle_epi8(stab, t);
    }
    w
}

/// Tokens t0..t0+T through q3_s tile `ti` (see `s3`), 8 rows at a time: each block's sum of the
/// table's signed values times its integer sub-scale.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn s3_tile<const T: usize>(j: &Job<S3Tiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let stab = _mm256_broadcastsi128_si256(_mm_loadu_si128(s3::TABLE.as_ptr() as *const __m128i));
    let ones = _mm256_set1_epi16(1);
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s3::SB_BYTES);
        let ahead = sb.wrapping_add(s3::PF);
        for half in 0..2 {
            for l in 14 * half..(14 * (half + 1)).min(s3::SB_BYTES / 64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let dv = _mm256_cvtph_ps(_mm_load_si128(sb.add(s3::D_OFF + 16 * half) as *const __m128i));
            let dv = _mm256_mul_ps(dv, _mm256_set1_ps(s3::D_UNIT));
            for sub in 0..s3::SUB {
                let b = s * s3::SUB + sub;
                let w = decode_s3(sb.add(sub * s3::BLK_BYTES), sb.add(s3::SEL_OFF + 4 * sub), half, stab);
                let sc = bytes_i32(sb.add(s3::SC_OFF + sub * TILE + 8 * half));
                for k in 0..T {
                    let x = xq[k].add(b * 8);
                    let mut s0 = _mm256_setzero_si256();
                    let mut s1 = _mm256_setzero_si256();
                    for g in (0..8).step_by(2) {
                        s0 = _mm256_add_epi32(s0, dot4::<TABLE>(w[g], _mm256_set1_epi32(*x.add(g)), ones));
                        s1 = _mm256_add_epi32(s1, dot4::<TABLE>(w[g + 1], _mm256_set1_epi32(*x.add(g + 1)), ones));
                    }
                    let isum = _mm256_mullo_epi32(_mm256_add_epi32(s0, s1), sc);
                    let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*xd[k].add(b)));
                    acc[k][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[k][half]);
                }
            }
        }
    }
    store_rows(j.y, j.ystride, j.rows, ti, t0, &acc);
}

/// Tokens t0..t0+T through q2_s tile `ti` (see `s2`), 8 rows at a time. `vpmaddwd` adds the
/// pairs of products by the quarter's sub-scale instead of by ones, so the scales cost nothing
/// per group: every 32-bit lane sums four products of one quarter.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn s2_tile<const T: usize>(j: &Job<S2Tiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let stab = _mm256_broadcastsi128_si256(_mm_loadu_si128(s2::TABLE.as_ptr() as *const __m128i));
    let m3 = _mm256_set1_epi8(3);
    let (low, eight) = (_mm256_set1_epi16(15), _mm256_set1_epi16(8));
    // Each lane's low byte to both of its 16-bit halves.
    let dup = _mm256_setr_epi8(
        0, -128, 0, -128, 4, -128, 4, -128, 8, -128, 8, -128, 12, -128, 12, -128,
        0, -128, 0, -128, 4, -128, 4, -128, 8, -128, 8, -128, 12, -128, 12, -128,
    );
    let acts = j.acts;
    let xq: [*const i32; T] = std::array::from_fn(|k| acts.q_ptr(t0 + k, 0) as *const i32);
    let xd: [*const f32; T] = std::array::from_fn(|k| acts.d_ptr(t0 + k));
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s2::SB_BYTES);
        let ahead = sb.wrapping_add(s2::PF);
        for half in 0..2 {
            for l in 11 * half..(11 * (half + 1)).min(s2::SB_BYTES / 64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let dv = _mm256_cvtph_ps(_mm_load_si128(sb.add(s2::D_OFF + 16 * half) as *const __m128i));
            let dv = _mm256_mul_ps(dv, _mm256_set1_ps(s2::D_UNIT));
            for sub in 0..s2::SUB {
                let b = s * s2::SUB + sub;
                let blk = sb.add(sub * s2::BLK_BYTES + 32 * half);
                let crumbs = [_mm256_load_si256(blk as *const __m256i), _mm256_load_si256(blk.add(64) as *const __m256i)];
                let mut w = [_mm256_setzero_si256(); 8];
                for g in 0..8 {
                    let c = _mm256_and_si256(shift_right16(crumbs[g / 4], 2 * (g % 4) as i32), m3);
                    w[g] = _mm256_shuffle_epi8(stab, c);
                }
                // The sub-scales of quarters 2p, 2p + 1 as 16-bit pairs per row.
                let mut sc = [_mm256_setzero_si256(); 4];
                for p in 0..2 {
                    let u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(sb.add(s2::SC_OFF + 32 * sub + 16 * p + 8 * half) as *const __m128i));
                    let u = _mm256_shuffle_epi8(u, dup);
                    sc[2 * p] = _mm256_sub_epi16(_mm256_and_si256(u, low), eight);
                    sc[2 * p + 1] = _mm256_sub_epi16(_mm256_srli_epi16::<4>(u), eight);
                }
                for k in 0..T {
                    let x = xq[k].add(b * 8);
                    let mut s0 = _mm256_setzero_si256();
                    let mut s1 = _mm256_setzero_si256();
                    for g in (0..8).step_by(2) {
                        let (xa, xb) = (_mm256_set1_epi32(*x.add(g)), _mm256_set1_epi32(*x.add(g + 1)));
                        let pa = _mm256_maddubs_epi16(_mm256_abs_epi8(w[g]), _mm256_sign_epi8(xa, w[g]));
                        let pb = _mm256_maddubs_epi16(_mm256_abs_epi8(w[g + 1]), _mm256_sign_epi8(xb, w[g + 1]));
                        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(pa, sc[g / 2]));
                        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(pb, sc[g / 2]));
                    }
                    let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*xd[k].add(b)));
                    let isum = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                    acc[k][half] = _mm256_fmadd_ps(isum, scale, acc[k][half]);
                }
            }
        }
    }
    store_rows(j.y, j.ystride, j.rows, ti, t0, &acc);
}

// The layouts' entry points on this path.

impl Avx2Tiles for Tiled {
    unsafe fn tiles_avx2(j: &Job<Self>, tiles: Range<usize>) {
        int_tiles(j, tiles)
    }
}

impl Avx2Tiles for FloatTiles {
    unsafe fn tiles_avx2(j: &Job<Self>, tiles: Range<usize>) {
        float_tiles(j, tiles)
    }
}

impl Avx2Tiles for K4Tiles {
    unsafe fn tiles_avx2(j: &Job<Self>, tiles: Range<usize>) {
        k4_tiles(j, tiles)
    }
}

impl Avx2Tiles for S4Tiles {
    unsafe fn tiles_avx2(j: &Job<Self>, tiles: Range<usize>) {
        s4_tiles(j, tiles)
    }
}

impl Avx2Tiles for S3Tiles {
    unsafe fn tiles_avx2(j: &Job<Self>, tiles: Range<usize>) {
        by_tokens!(j, tiles, s3_tile)
    }
}

impl Avx2Tiles for S2Tiles {
    unsafe fn tiles_avx2(j: &Job<Self>, tiles: Range<usize>) {
        by_tokens!(j, tiles, s2_tile)
    }
}
