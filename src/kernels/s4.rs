//! q4_s in tiles of 16 rows. Weight `e` of a 32-weight block `b` of a super-block is
//! `d * s[2b + e/16] * GRID[n]` (`d` here the stored f16 times 2^-13): two integer sub-scales per block, one per half. So a row's dot
//! product with quantized activations `x` is, per block,
//! `d * dx * (s_lo * sum_lo(GRID[n] xq) + s_hi * sum_hi(GRID[n] xq))`: the two half sums are
//! what the 4-bit kernels compute anyway (low nibbles are the first half, high nibbles the
//! second), and the sub-scales combine them in integers, exactly. The error is only the int8
//! rounding of `x`, as for the other integer types.
//!
//! A tile super-block (16 rows x 256 weights, 2368 bytes, the geometry of q4_k's, `k4`):
//! ```text
//! 0     8 x 256  nibbles of block b (32 weights), laid out as a 4-bit block (see `pack`)
//! 2048  8 x 16   s[2b] of rows 0..16 (i8)
//! 2176  8 x 16   s[2b + 1] of rows 0..16
//! 2304  16 x f16 d of rows 0..16 (as stored: the kernels multiply by 2^-13)
//! 2336  32 bytes of padding, to a whole number of cache lines
//! ```
//! 4.625 bits per weight in memory against the on-disk 4.5: the sub-scales are whole bytes.

use super::k4::for_each_row_superblock;
use super::layout::{Job, TileLayout};
use super::pack::{nibble, TILE};
use crate::quant::bytes::f16_at;
use crate::quant::q4_s::{unpack_scales, BLOCK_BYTES, QK_S};
use crate::quant::{IQ4_NL_GRID, QK};
use std::ops::Range;

pub(crate) use super::k4::{PF, PF_LINES, SB_BYTES, SUB};
pub(crate) use crate::quant::q4_s::D_UNIT;
/// Offsets inside a tile super-block.
pub(crate) const SLO_OFF: usize = SUB * 256;
pub(crate) const SHI_OFF: usize = SLO_OFF + SUB * TILE;
pub(crate) const D_OFF: usize = SHI_OFF + SUB * TILE;

/// The nibble table.
pub(crate) const TABLE: [i8; 16] = IQ4_NL_GRID;
/// The table biased by 128, for `vpdpbusd`'s unsigned operand.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const UTABLE: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut n = 0;
    while n < 16 {
        t[n] = (TABLE[n] as u8) ^ 0x80;
        n += 1;
    }
    t
};

const _: () = assert!(QK_S == crate::quant::QK_K && D_OFF + 64 == SB_BYTES);

/// Geometry of a q4_s matrix: q4_k's (`k4::K4Tiles`), a distinct type for its own kernels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct S4Tiles {
    /// Super-blocks per row.
    pub nsb: usize,
    pub tiles: usize,
}

impl S4Tiles {
    pub(crate) fn new(rows: usize, cols: usize) -> S4Tiles {
        S4Tiles { nsb: cols / QK_S, tiles: rows.div_ceil(TILE) }
    }

    pub(crate) fn tile_bytes(&self) -> usize {
        self.nsb * SB_BYTES
    }
}

impl TileLayout for S4Tiles {
    const INT8_ACTS: bool = true;

    fn tiles(&self) -> usize {
        self.tiles
    }

    fn tile_bytes(&self) -> usize {
        S4Tiles::tile_bytes(self)
    }

    fn pack(&self, rows: usize, _cols: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
        pack(self, rows, bytes, first, out)
    }

    fn unpack_row(&self, data: &[u8], r: usize, out: &mut [f32]) {
        unpack_row(self, data, r, out)
    }

    unsafe fn tiles_scalar(j: &Job<Self>, tiles: Range<usize>) {
        tiles_scalar(j, tiles)
    }
}

/// Repack q4_s rows (`bytes`) of tiles `first..` into `out` (whole tiles, zeroed or an earlier
/// packing of the same shape: padding rows are never written).
fn pack(k: &S4Tiles, rows: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
    for_each_row_superblock(k.tile_bytes(), SB_BYTES, BLOCK_BYTES, rows, bytes, first, out, |sb, i, src| {
        sb[D_OFF + 2 * i..D_OFF + 2 * i + 2].copy_from_slice(&src[0..2]);
        let sc = unpack_scales(&src[2..16]);
        for b in 0..SUB {
            sb[SLO_OFF + b * TILE + i] = sc[2 * b] as u8;
            sb[SHI_OFF + b * TILE + i] = sc[2 * b + 1] as u8;
            // Each block is an iq4_nl block's nibbles: byte 4k + jj moves as a whole to
            // k*64 + i*4 + jj.
            let q = &src[16 + 16 * b..32 + 16 * b];
            for kk in 0..4 {
                let at = b * 256 + kk * 64 + i * 4;
                sb[at..at + 4].copy_from_slice(&q[4 * kk..4 * kk + 4]);
            }
        }
    });
}

/// Row `r` as f32, bit for bit the reference decoder's.
fn unpack_row(k: &S4Tiles, data: &[u8], r: usize, out: &mut [f32]) {
    let tile = &data[r / TILE * k.tile_bytes()..(r / TILE + 1) * k.tile_bytes()];
    let i = r % TILE;
    for (s, y) in out.chunks_exact_mut(QK_S).enumerate() {
        let sb = &tile[s * SB_BYTES..(s + 1) * SB_BYTES];
        let d = f16_at(sb, D_OFF + 2 * i) * D_UNIT;
        for (b, y) in y.chunks_exact_mut(QK).enumerate() {
            let c0 = d * sb[SLO_OFF + b * TILE + i] as i8 as f32;
            let c1 = d * sb[SHI_OFF + b * TILE + i] as i8 as f32;
            for (e, o) in y.iter_mut().enumerate() {
                let c = if e < QK / 2 { c0 } else { c1 };
                *o = c * TABLE[nibble(&sb[b * 256..], i, e) as usize] as f32;
            }
        }
    }
}

/// The reference kernel. Per row and block, in this order (the SIMD paths do the same):
/// `isum = s_lo * sum_lo + s_hi * sum_hi` in i32 (each half sum is `sum(GRID[n] * xq)` over 16
/// weights), then `acc = fma(isum, d * dx, acc)`.
unsafe fn tiles_scalar(j: &Job<S4Tiles>, tiles: Range<usize>) {
    let tb = j.layout.tile_bytes();
    for ti in tiles {
        let tile = std::slice::from_raw_parts(j.data.add(ti * tb), tb);
        for i in 0..TILE.min(j.rows - ti * TILE) {
            for tok in 0..j.acts.n {
                let mut acc = 0f32;
                for s in 0..j.layout.nsb {
                    let sb = &tile[s * SB_BYTES..(s + 1) * SB_BYTES];
                    let d = f16_at(sb, D_OFF + 2 * i) * D_UNIT;
                    for sub in 0..SUB {
                        let b = s * SUB + sub;
                        let x = j.acts.q(tok, b);
                        let q = &sb[sub * 256..(sub + 1) * 256];
                        let half = |h: Range<usize>| -> i32 {
                            h.map(|e| TABLE[nibble(q, i, e) as usize] as i32 * x[e] as i32).sum()
                        };
                        let slo = sb[SLO_OFF + sub * TILE + i] as i8 as i32;
                        let shi = sb[SHI_OFF + sub * TILE + i] as i8 as i32;
                        let isum = slo * half(0..QK / 2) + shi * half(QK / 2..QK);
                        acc = (isum as f32).mul_add(d * j.acts.d(tok, b), acc);
                    }
                }
                *j.y.add(tok * j.ystride + ti * TILE + i) = acc;
            }
        }
    }
}
