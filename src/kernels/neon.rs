//! aarch64 NEON kernels. A tile group (four weights of 16 rows, 64 bytes) is four registers of
//! four rows each; the group's four activations are broadcast to every 32-bit lane. With the
//! dot-product extension one `sdot` per register sums each row's four products; without it
//! `smull` + `sadalp` build pair sums that a final `addp` folds into rows.
//!
//! Weights are decoded to signed int8 (q8_0: undo the `^ 0x80` bias; 4-bit: `tbl` lookup), so no
//! bias correction applies. NEON is part of every aarch64 target Rust supports, so only the
//! dot-product path needs a run-time check.

// Kernels index several parallel register arrays by the same loop variable.
#![allow(clippy::needless_range_loop)]

use super::float::FloatTiles;
use super::k4::{self, K4Tiles};
use super::layout::{Job, NeonTiles};
use super::pack::{IntKind, Tiled, TILE};
use super::s2::{self, S2Tiles};
use super::s3::{self, S3Tiles};
use super::s4::{self, S4Tiles};
use std::arch::aarch64::*;
use std::ops::Range;

/// Prefetch distance for the integer tiles; see `avx512`.
const PF_INT: usize = 2048;
/// Activation vectors sharing one pass over a tile.
const MAXT: usize = 4;

unsafe fn int_tiles(j: &Job<Tiled>, tiles: Range<usize>) {
    let nib = j.layout.kind == IntKind::Nib;
    let dot = std::arch::is_aarch64_feature_detected!("dotprod");
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.acts.n {
            let m = (j.acts.n - t0).min(MAXT);
            match (dot, nib) {
                (true, true) => tile_dot::<true>(j, ti, t0, m),
                (true, false) => tile_dot::<false>(j, ti, t0, m),
                (false, true) => tile::<true, false>(j, ti, t0, m),
                (false, false) => tile::<false, false>(j, ti, t0, m),
            }
            t0 += m;
        }
    }
}

#[target_feature(enable = "dotprod")]
unsafe fn tile_dot<const NIB: bool>(j: &Job<Tiled>, ti: usize, t0: usize, m: usize) {
    tile::<NIB, true>(j, ti, t0, m)
}

/// `acc + (per 32-bit lane) the dot product of four signed bytes of a and of b`.
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // The intrinsic (vdotq_s32) is not yet stable; the instruction is what it compiles to.
    std::arch::asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    std::arch::asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags));
}

/// Signed weights of group `g` (weights 4g..4g+4) of rows 4m..4m+4 of the block at `q`.
#[inline(always)]
unsafe fn weights<const NIB: bool>(q: *const u8, g: usize, m: usize, table: int8x16_t) -> int8x16_t {
    if NIB {
        let v = vld1q_u8(q.add(64 * (g % 4) + 16 * m));
        let idx = if g < 4 { vandq_u8(v, vdupq_n_u8(0x0f)) } else { vshrq_n_u8::<4>(v) };
        vqtbl1q_s8(table, idx)
    } else {
        vreinterpretq_s8_u8(veorq_u8(vld1q_u8(q.add(64 * g + 16 * m)), vdupq_n_u8(0x80)))
    }
}

/// Per row of 16 (four registers of four), the sum of the products of the block's 32 signed
/// weights at `q` with the 32 int8 activations at `x`.
#[inline(always)]
unsafe fn block_isum<const NIB: bool, const DOT: bool>(q: *const u8, x: *const i32, table: int8x16_t) -> [int32x4_t; 4] {
    groups_isum::<NIB, DOT>(q, x, table, 0..8)
}

/// `block_isum` over groups `groups` only (weights 4g..4g+4 of each): 0..4 and 4..8 of a 4-bit
/// block are its two halves of 16 weights.
#[inline(always)]
unsafe fn groups_isum<const NIB: bool, const DOT: bool>(
    q: *const u8,
    x: *const i32,
    table: int8x16_t,
    groups: Range<usize>,
) -> [int32x4_t; 4] {
    let mut isum = [vdupq_n_s32(0); 4];
    if DOT {
        for g in groups {
            let xg = vreinterpretq_s8_s32(vdupq_n_s32(x.add(g).read_unaligned()));
            for (m, s) in isum.iter_mut().enumerate() {
                *s = sdot(*s, weights::<NIB>(q, g, m, table), xg);
            }
        }
    } else {
        let mut lo = [vdupq_n_s32(0); 4];
        let mut hi = [vdupq_n_s32(0); 4];
        for g in groups {
            let xg = vreinterpretq_s8_s32(vdupq_n_s32(x.add(g).read_unaligned()));
            for m in 0..4 {
                let w = weights::<NIB>(q, g, m, table);
                lo[m] = vpadalq_s16(lo[m], vmull_s8(vget_low_s8(w), vget_low_s8(xg)));
                hi[m] = vpadalq_s16(hi[m], vmull_high_s8(w, xg));
            }
        }
        for m in 0..4 {
            // lo = [row 4m pairs a, b; row 4m+1 pairs a, b], hi likewise for 4m+2, 4m+3.
            isum[m] = vpaddq_s32(lo[m], hi[m]);
        }
    }
    isum
}

/// Tokens t0..t0+nt (nt <= MAXT) through tile `ti`.
#[inline(always)]
unsafe fn tile<const NIB: bool, const DOT: bool>(j: &Job<Tiled>, ti: usize, t0: usize, nt: usize) {
    let t = j.layout;
    let (qb, pb) = if NIB { (256, 576) } else { (512, 1088) };
    debug_assert_eq!((qb, pb), (t.qbytes(), t.pair_bytes()));
    let base = j.data.add(ti * t.tile_bytes());
    let table = vld1q_s8(t.table.as_ptr());
    let acts = j.acts;
    let mut acc = [[vdupq_n_f32(0.0); 4]; MAXT];
    for b in 0..t.nbp {
        let pair = base.add(b / 2 * pb);
        // Half the pair's lines per block, not all in one burst (see `avx512`).
        let (lines, h) = (pb / 64, b % 2);
        for l in h * lines.div_ceil(2)..((h + 1) * lines.div_ceil(2)).min(lines) {
            prefetch(pair.wrapping_add(PF_INT + 64 * l));
        }
        let q = pair.add(b % 2 * qb);
        let sp = pair.add(2 * qb + b % 2 * TILE * 2);
        let mut dw = [0f32; TILE];
        for (i, d) in dw.iter_mut().enumerate() {
            *d = half::f16::from_le_bytes([*sp.add(2 * i), *sp.add(2 * i + 1)]).to_f32();
        }
        for (k, a) in acc.iter_mut().enumerate().take(nt) {
            let isum = block_isum::<NIB, DOT>(q, acts.q_ptr(t0 + k, b) as *const i32, table);
            let dx = vdupq_n_f32(*acts.d_ptr(t0 + k).add(b));
            for m in 0..4 {
                let scale = vmulq_f32(vld1q_f32(dw.as_ptr().add(4 * m)), dx);
                a[m] = vfmaq_f32(a[m], vcvtq_f32_s32(isum[m]), scale);
            }
        }
    }
    let r0 = ti * TILE;
    let valid = (j.rows - r0).min(TILE);
    for (k, a) in acc.iter().enumerate().take(nt) {
        let mut out = [0f32; TILE];
        for m in 0..4 {
            vst1q_f32(out.as_mut_ptr().add(4 * m), a[m]);
        }
        std::ptr::copy_nonoverlapping(out.as_ptr(), j.y.add((t0 + k) * j.ystride + r0), valid);
    }
}

/// Activation vectors sharing one pass over a float tile (8 accumulators each).
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

/// Weights of rows 4m..4m+4 for columns 2c2 and 2c2+1.
#[inline(always)]
unsafe fn fpair<const BF: bool>(base: *const u8, c2: usize, m: usize) -> (float32x4_t, float32x4_t) {
    if BF {
        let v = vld1q_u32(base.add(c2 * 64 + 16 * m) as *const u32);
        let even = vreinterpretq_f32_u32(vshlq_n_u32::<16>(v));
        let odd = vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xffff_0000)));
        (even, odd)
    } else {
        let p = base.add(c2 * 128 + 16 * m);
        (vld1q_f32(p as *const f32), vld1q_f32(p.add(64) as *const f32))
    }
}

/// Tokens t0..t0+T through float tile `ti`; accumulators per token, row quarter, column parity.
#[inline(always)]
unsafe fn ftile<const BF: bool, const T: usize>(j: &Job<FloatTiles>, ti: usize, t0: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let x0 = j.xs.as_ptr().add(t0 * j.cols);
    let mut acc = [[[vdupq_n_f32(0.0); 2]; 4]; T];
    let step = if BF { 64 } else { 128 };
    for c2 in 0..j.cols / 2 {
        prefetch(base.add(c2 * step).wrapping_add(PF_INT));
        if !BF {
            prefetch(base.add(c2 * step).wrapping_add(PF_INT + 64));
        }
        for m in 0..4 {
            let (we, wo) = fpair::<BF>(base, c2, m);
            for k in 0..T {
                let x = x0.add(k * j.cols + 2 * c2);
                acc[k][m][0] = vfmaq_f32(acc[k][m][0], we, vdupq_n_f32(*x));
                acc[k][m][1] = vfmaq_f32(acc[k][m][1], wo, vdupq_n_f32(*x.add(1)));
            }
        }
    }
    if j.cols % 2 == 1 {
        let c = j.cols - 1;
        for m in 0..4 {
            let w = if BF {
                let v = vld1q_u32(base.add(c / 2 * 64 + 16 * m) as *const u32);
                vreinterpretq_f32_u32(vshlq_n_u32::<16>(v))
            } else {
                vld1q_f32(base.add(c * 64 + 16 * m) as *const f32)
            };
            for k in 0..T {
                acc[k][m][0] = vfmaq_f32(acc[k][m][0], w, vdupq_n_f32(*x0.add(k * j.cols + c)));
            }
        }
    }
    let r0 = ti * TILE;
    let valid = (j.rows - r0).min(TILE);
    for k in 0..T {
        let mut out = [0f32; TILE];
        for m in 0..4 {
            vst1q_f32(out.as_mut_ptr().add(4 * m), vaddq_f32(acc[k][m][0], acc[k][m][1]));
        }
        std::ptr::copy_nonoverlapping(out.as_ptr(), j.y.add((t0 + k) * j.ystride + r0), valid);
    }
}

unsafe fn k4_tiles(j: &Job<K4Tiles>, tiles: Range<usize>) {
    let dot = std::arch::is_aarch64_feature_detected!("dotprod");
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.acts.n {
            let m = (j.acts.n - t0).min(MAXT);
            if dot {
                k4_tile_dot(j, ti, t0, m)
            } else {
                k4_tile::<false>(j, ti, t0, m)
            }
            t0 += m;
        }
    }
}

#[target_feature(enable = "dotprod")]
unsafe fn k4_tile_dot(j: &Job<K4Tiles>, ti: usize, t0: usize, nt: usize) {
    k4_tile::<true>(j, ti, t0, nt)
}

/// Tokens t0..t0+nt through q4_k tile `ti` (see `k4`).
#[inline(always)]
unsafe fn k4_tile<const DOT: bool>(j: &Job<K4Tiles>, ti: usize, t0: usize, nt: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let table = vld1q_s8(k4::TABLE.as_ptr());
    let acts = j.acts;
    let f16 = |p: *const u8, i: usize| half::f16::from_le_bytes([*p.add(2 * i), *p.add(2 * i + 1)]).to_f32();
    let mut acc = [[vdupq_n_f32(0.0); 4]; MAXT];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * k4::SB_BYTES);
        for sub in 0..k4::SUB {
            for l in k4::PF_LINES * sub..(k4::PF_LINES * (sub + 1)).min(k4::SB_BYTES / 64) {
                prefetch(sb.wrapping_add(k4::PF + 64 * l));
            }
            let b = s * k4::SUB + sub;
            let mut dsc = [0f32; TILE];
            // The offset of q - 8 (see `k4`).
            let mut mn = [0f32; TILE];
            for i in 0..TILE {
                dsc[i] = f16(sb.add(k4::D_OFF), i) * *sb.add(k4::SC_OFF + sub * TILE + i) as f32;
                mn[i] = f16(sb.add(k4::DMIN_OFF), i) * *sb.add(k4::M_OFF + sub * TILE + i) as f32 - 8.0 * dsc[i];
            }
            for (k, a) in acc.iter_mut().enumerate().take(nt) {
                let isum = block_isum::<true, DOT>(sb.add(sub * 256), acts.q_ptr(t0 + k, b) as *const i32, table);
                let dx = vdupq_n_f32(*acts.d_ptr(t0 + k).add(b));
                let xs = vdupq_n_f32(*acts.s_ptr(t0 + k).add(b));
                for m in 0..4 {
                    let scale = vmulq_f32(vld1q_f32(dsc.as_ptr().add(4 * m)), dx);
                    a[m] = vfmaq_f32(a[m], vcvtq_f32_s32(isum[m]), scale);
                    a[m] = vfmsq_f32(a[m], vld1q_f32(mn.as_ptr().add(4 * m)), xs);
                }
            }
        }
    }
    let r0 = ti * TILE;
    let valid = (j.rows - r0).min(TILE);
    for (k, a) in acc.iter().enumerate().take(nt) {
        let mut out = [0f32; TILE];
        for m in 0..4 {
            vst1q_f32(out.as_mut_ptr().add(4 * m), a[m]);
        }
        std::ptr::copy_nonoverlapping(out.as_ptr(), j.y.add((t0 + k) * j.ystride + r0), valid);
    }
}

unsafe fn s4_tiles(j: &Job<S4Tiles>, tiles: Range<usize>) {
    let dot = std::arch::is_aarch64_feature_detected!("dotprod");
    for ti in tiles {
        let mut t0 = 0;
        while t0 < j.acts.n {
            let m = (j.acts.n - t0).min(MAXT);
            if dot {
                s4_tile_dot(j, ti, t0, m)
            } else {
                s4_tile::<false>(j, ti, t0, m)
            }
            t0 += m;
        }
    }
}

#[target_feature(enable = "dotprod")]
unsafe fn s4_tile_dot(j: &Job<S4Tiles>, ti: usize, t0: usize, nt: usize) {
    s4_tile::<true>(j, ti, t0, nt)
}

/// Tokens t0..t0+nt through q4_s tile `ti` (see `s4`): the two half-block sums combined by the
/// integer sub-scales.
#[inline(always)]
unsafe fn s4_tile<const DOT: bool>(j: &Job<S4Tiles>, ti: usize, t0: usize, nt: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let table = vld1q_s8(s4::TABLE.as_ptr());
    let acts = j.acts;
    let mut acc = [[vdupq_n_f32(0.0); 4]; MAXT];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s4::SB_BYTES);
        let mut d = [0f32; TILE];
        for (i, v) in d.iter_mut().enumerate() {
            *v = half::f16::from_le_bytes([*sb.add(s4::D_OFF + 2 * i), *sb.add(s4::D_OFF + 2 * i + 1)]).to_f32() * s4::D_UNIT;
        }
        for sub in 0..s4::SUB {
            for l in s4::PF_LINES * sub..(s4::PF_LINES * (sub + 1)).min(s4::SB_BYTES / 64) {
                prefetch(sb.wrapping_add(s4::PF + 64 * l));
            }
            let b = s * s4::SUB + sub;
            let q = sb.add(sub * 256);
            // Sub-scales of 16 rows, widened to four registers of four i32.
            let widen = |p: *const u8| -> [int32x4_t; 4] {
                let v = vld1q_s8(p as *const i8);
                let (l, h) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
                [vmovl_s16(vget_low_s16(l)), vmovl_high_s16(l), vmovl_s16(vget_low_s16(h)), vmovl_high_s16(h)]
            };
            let slo = widen(sb.add(s4::SLO_OFF + sub * TILE));
            let shi = widen(sb.add(s4::SHI_OFF + sub * TILE));
            for (k, a) in acc.iter_mut().enumerate().take(nt) {
                let x = acts.q_ptr(t0 + k, b) as *const i32;
                let lo = groups_isum::<true, DOT>(q, x, table, 0..4);
                let hi = groups_isum::<true, DOT>(q, x, table, 4..8);
                let dx = vdupq_n_f32(*acts.d_ptr(t0 + k).add(b));
                for m in 0..4 {
                    let isum = vaddq_s32(vmulq_s32(lo[m], slo[m]), vmulq_s32(hi[m], shi[m]));
                    let scale = vmulq_f32(vld1q_f32(d.as_ptr().add(4 * m)), dx);
                    a[m] = vfmaq_f32(a[m], vcvtq_f32_s32(isum), scale);
                }
            }
        }
    }
    let r0 = ti * TILE;
    let valid = (j.rows - r0).min(TILE);
    for (k, a) in acc.iter().enumerate().take(nt) {
        let mut out = [0f32; TILE];
        for m in 0..4 {
            vst1q_f32(out.as_mut_ptr().add(4 * m), a[m]);
        }
        std::ptr::copy_nonoverlapping(out.as_ptr(), j.y.add((t0 + k) * j.ystride + r0), valid);
    }
}

/// Per row of 16 (four registers of four), the sum over groups `groups` of the products of the
/// decoded signed weights `w[g][m]` (group `g`, rows 4m..4m+4) with the int8 activations at `x`.
#[inline(always)]
unsafe fn decoded_isum<const DOT: bool>(w: &[[int8x16_t; 4]; 8], x: *const i32, groups: Range<usize>) -> [int32x4_t; 4] {
    let mut isum = [vdupq_n_s32(0); 4];
    if DOT {
        for g in groups {
            let xg = vreinterpretq_s8_s32(vdupq_n_s32(x.add(g).read_unaligned()));
            for (m, s) in isum.iter_mut().enumerate() {
                *s = sdot(*s, w[g][m], xg);
            }
        }
    } else {
        let mut lo = [vdupq_n_s32(0); 4];
        let mut hi = [vdupq_n_s32(0); 4];
        for g in groups {
            let xg = vreinterpretq_s8_s32(vdupq_n_s32(x.add(g).read_unaligned()));
            for m in 0..4 {
                lo[m] = vpadalq_s16(lo[m], vmull_s8(vget_low_s8(w[g][m]), vget_low_s8(xg)));
                hi[m] = vpadalq_s16(hi[m], vmull_high_s8(w[g][m], xg));
            }
        }
        for m in 0..4 {
            isum[m] = vpaddq_s32(lo[m], hi[m]);
        }
    }
    isum
}

/// Signed weights of one q3_s block of 16 rows (see `s3`): crumbs, the high bit moved to bit 2,
/// the half's grid bit (from the per-row masks at `sel`) as bit 3, through the table.
#[inline(always)]
unsafe fn decode_s3(blk: *const u8, sel: *const u8, table: int8x16_t) -> [[int8x16_t; 4]; 8] {
    let mut w = [[vdupq_n_s8(0); 4]; 8];
    for m in 0..4 {
        let crumbs = [vld1q_u8(blk.add(16 * m)), vld1q_u8(blk.add(64 + 16 * m))];
        let high = vld1q_u8(blk.add(128 + 16 * m));
        // Grid bits of rows 4m..4m+4 for the block's two halves, as 8 in every byte of a row.
        let lane = vld1q_u32([1u32, 2, 4, 8].as_ptr());
        let grid = [0, 1].map(|h| {
            let bits = (sel.add(2 * h).cast::<u16>().read_unaligned() as u32 >> (4 * m)) & 15;
            vandq_u8(vreinterpretq_u8_u32(vtstq_u32(vdupq_n_u32(bits), lane)), vdupq_n_u8(8))
        });
        for g in 0..8 {
            let c = vandq_u8(vshlq_u8(crumbs[g / 4], vdupq_n_s8(-2 * (g % 4) as i8)), vdupq_n_u8(3));
            let h = vandq_u8(vshlq_u8(high, vdupq_n_s8(2 - g as i8)), vdupq_n_u8(4));
            w[g][m] = vqtbl1q_s8(table, vorrq_u8(vorrq_u8(c, h), grid[g / 4]));
        }
    }
    w
}

/// Signed weights of one q2_s block of 16 rows (see `s2`).
#[inline(always)]
unsafe fn decode_s2(blk: *const u8, table: int8x16_t) -> [[int8x16_t; 4]; 8] {
    let mut w = [[vdupq_n_s8(0); 4]; 8];
    for m in 0..4 {
        let crumbs = [vld1q_u8(blk.add(16 * m)), vld1q_u8(blk.add(64 + 16 * m))];
        for g in 0..8 {
            let c = vandq_u8(vshlq_u8(crumbs[g / 4], vdupq_n_s8(-2 * (g % 4) as i8)), vdupq_n_u8(3));
            w[g][m] = vqtbl1q_s8(table, c);
        }
    }
    w
}

/// 16 signed bytes as four registers of four i32.
#[inline(always)]
unsafe fn widen_i8(v: int8x16_t) -> [int32x4_t; 4] {
    let (l, h) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
    [vmovl_s16(vget_low_s16(l)), vmovl_high_s16(l), vmovl_s16(vget_low_s16(h)), vmovl_high_s16(h)]
}

/// The 16 f16 super-block scales at `p`, times `unit`.
#[inline(always)]
unsafe fn row_scales(p: *const u8, unit: f32) -> [f32; TILE] {
    let mut d = [0f32; TILE];
    for (i, v) in d.iter_mut().enumerate() {
        *v = half::f16::from_le_bytes([*p.add(2 * i), *p.add(2 * i + 1)]).to_f32() * unit;
    }
    d
}

/// Store one tile's accumulators for tokens t0..t0+nt.
#[inline(always)]
unsafe fn store_tile(j_y: *mut f32, ystride: usize, rows: usize, ti: usize, t0: usize, nt: usize, acc: &[[float32x4_t; 4]; MAXT]) {
    let r0 = ti * TILE;
    let valid = (rows - r0).min(TILE);
    for (k, a) in acc.iter().enumerate().take(nt) {
        let mut out = [0f32; TILE];
        for m in 0..4 {
            vst1q_f32(out.as_mut_ptr().add(4 * m), a[m]);
        }
        std::ptr::copy_nonoverlapping(out.as_ptr(), j_y.add((t0 + k) * ystride + r0), valid);
    }
}

macro_rules! neon_tiles {
    ($j:expr, $tiles:expr, $dot:ident, $plain:ident) => {{
        let j = $j;
        let dot = std::arch::is_aarch64_feature_detected!("dotprod");
        for ti in $tiles {
            let mut t0 = 0;
            while t0 < j.acts.n {
                let m = (j.acts.n - t0).min(MAXT);
                if dot {
                    $dot(j, ti, t0, m)
                } else {
                    $plain::<false>(j, ti, t0, m)
                }
                t0 += m;
            }
        }
    }};
}

#[target_feature(enable = "dotprod")]
unsafe fn s3_tile_dot(j: &Job<S3Tiles>, ti: usize, t0: usize, nt: usize) {
    s3_tile::<true>(j, ti, t0, nt)
}

/// Tokens t0..t0+nt through q3_s tile `ti` (see `s3`): each block's sum times its integer
/// sub-scale.
#[inline(always)]
unsafe fn s3_tile<const DOT: bool>(j: &Job<S3Tiles>, ti: usize, t0: usize, nt: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let table = vld1q_s8(s3::TABLE.as_ptr());
    let acts = j.acts;
    let mut acc = [[vdupq_n_f32(0.0); 4]; MAXT];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s3::SB_BYTES);
        let d = row_scales(sb.add(s3::D_OFF), s3::D_UNIT);
        for sub in 0..s3::SUB {
            for l in s3::PF_LINES * sub..(s3::PF_LINES * (sub + 1)).min(s3::SB_BYTES / 64) {
                prefetch(sb.wrapping_add(s3::PF + 64 * l));
            }
            let b = s * s3::SUB + sub;
            let w = decode_s3(sb.add(sub * s3::BLK_BYTES), sb.add(s3::SEL_OFF + 4 * sub), table);
            let sc = widen_i8(vld1q_s8(sb.add(s3::SC_OFF + sub * TILE) as *const i8));
            for (k, a) in acc.iter_mut().enumerate().take(nt) {
                let sum = decoded_isum::<DOT>(&w, acts.q_ptr(t0 + k, b) as *const i32, 0..8);
                let dx = vdupq_n_f32(*acts.d_ptr(t0 + k).add(b));
                for m in 0..4 {
                    let isum = vmulq_s32(sum[m], sc[m]);
                    let scale = vmulq_f32(vld1q_f32(d.as_ptr().add(4 * m)), dx);
                    a[m] = vfmaq_f32(a[m], vcvtq_f32_s32(isum), scale);
                }
            }
        }
    }
    store_tile(j.y, j.ystride, j.rows, ti, t0, nt, &acc);
}

#[target_feature(enable = "dotprod")]
unsafe fn s2_tile_dot(j: &Job<S2Tiles>, ti: usize, t0: usize, nt: usize) {
    s2_tile::<true>(j, ti, t0, nt)
}

/// Tokens t0..t0+nt through q2_s tile `ti` (see `s2`): four quarter sums per block combined by
/// the integer sub-scales.
#[inline(always)]
unsafe fn s2_tile<const DOT: bool>(j: &Job<S2Tiles>, ti: usize, t0: usize, nt: usize) {
    let base = j.data.add(ti * j.layout.tile_bytes());
    let table = vld1q_s8(s2::TABLE.as_ptr());
    let acts = j.acts;
    let mut acc = [[vdupq_n_f32(0.0); 4]; MAXT];
    for s in 0..j.layout.nsb {
        let sb = base.add(s * s2::SB_BYTES);
        let d = row_scales(sb.add(s2::D_OFF), s2::D_UNIT);
        for sub in 0..s2::SUB {
            for l in s2::PF_LINES * sub..(s2::PF_LINES * (sub + 1)).min(s2::SB_BYTES / 64) {
                prefetch(sb.wrapping_add(s2::PF + 64 * l));
            }
            let b = s * s2::SUB + sub;
            let w = decode_s2(sb.add(sub * s2::BLK_BYTES), table);
            let mut sc = [[vdupq_n_s32(0); 4]; 4];
            for p in 0..2 {
                let u = vld1q_u8(sb.add(s2::SC_OFF + 32 * sub + 16 * p));
                let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(u, vdupq_n_u8(15))), vdupq_n_s8(8));
                let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(u)), vdupq_n_s8(8));
                sc[2 * p] = widen_i8(lo);
                sc[2 * p + 1] = widen_i8(hi);
            }
            for (k, a) in acc.iter_mut().enumerate().take(nt) {
                let x = acts.q_ptr(t0 + k, b) as *const i32;
                let mut isum = [vdupq_n_s32(0); 4];
                for q in 0..4 {
                    let part = decoded_isum::<DOT>(&w, x, 2 * q..2 * q + 2);
                    for m in 0..4 {
                        isum[m] = vmlaq_s32(isum[m], part[m], sc[q][m]);
                    }
                }
                let dx = vdupq_n_f32(*acts.d_ptr(t0 + k).add(b));
                for m in 0..4 {
                    let scale = vmulq_f32(vld1q_f32(d.as_ptr().add(4 * m)), dx);
                    a[m] = vfmaq_f32(a[m], vcvtq_f32_s32(isum[m]), scale);
                }
            }
        }
    }
    store_tile(j.y, j.ystride, j.rows, ti, t0, nt, &acc);
}

// The layouts' entry points on this path.

impl NeonTiles for Tiled {
    unsafe fn tiles_neon(j: &Job<Self>, tiles: Range<usize>) {
        int_tiles(j, tiles)
    }
}

impl NeonTiles for FloatTiles {
    unsafe fn tiles_neon(j: &Job<Self>, tiles: Range<usize>) {
        float_tiles(j, tiles)
    }
}

impl NeonTiles for K4Tiles {
    unsafe fn tiles_neon(j: &Job<Self>, tiles: Range<usize>) {
        k4_tiles(j, tiles)
    }
}

impl NeonTiles for S4Tiles {
    unsafe fn tiles_neon(j: &Job<Self>, tiles: Range<usize>) {
        s4_tiles(j, tiles)
    }
}

impl NeonTiles for S3Tiles {
    unsafe fn tiles_neon(j: &Job<Self>, tiles: Range<usize>) {
        neon_tiles!(j, tiles, s3_tile_dot, s3_tile)
    }
}

impl NeonTiles for S2Tiles {
    unsafe fn tiles_neon(j: &Job<Self>, tiles: Range<usize>) {
        neon_tiles!(j, tiles, s2_tile_dot, s2_tile)
    }
}
