//! q2_s in tiles of 16 rows. Weight `e` of a super-block is `d * s[e / 8] * GRID[n]` (`d` the
//! stored f16 times 2^-10, `n` the weight's 2-bit index): four integer sub-scales per 32-weight
//! activation block, one per quarter. So a row's dot product with quantized activations `x` is,
//! per block, `d * dx * sum_q(s[q] * sum_q(GRID[n] xq))`: four quarter sums of a table type
//! combined by the sub-scales in integers, exactly; the only error is the int8 rounding of `x`.
//!
//! A tile super-block (16 rows x 256 weights, 1344 bytes = 21 cache lines):
//! ```text
//! 0     8 x 128  block b: 2 x 64 bytes of crumbs (see below)
//! 1024  8 x 32   block b: u = s + 8 of quarters 0, 1 of rows 0..16 (16 bytes, quarter 0 in the
//!                low nibble), then of quarters 2, 3
//! 1280  16 x f16 d of rows 0..16 (as stored: the kernels multiply by 2^-10)
//! 1312  32 bytes of padding, to a whole number of cache lines
//! ```
//! In a block, weight `e` (0..32) of row `i` belongs to group `g = e / 4` (four weights that one
//! 32-bit lane multiplies at once), and its index sits in bits `2 (g % 4)` of byte `i * 4 + e % 4`
//! of crumb vector `g / 4`: one shift and one mask give a group, and quarter `q` is groups
//! `2q, 2q + 1`. Rows 0..8 are the first 32 bytes of each vector, rows 8..16 the last.
//! 2.625 bits per weight in memory against the on-disk 2.5625 (the padding).

use super::k4::for_each_row_superblock;
use super::layout::{Job, TileLayout};
use super::pack::TILE;
use crate::quant::bytes::f16_at;
use crate::quant::q2_s::{BLOCK_BYTES, GRID, QK as QK_S};
use crate::quant::QK;
use std::ops::Range;

pub(crate) use crate::quant::q2_s::D_UNIT;
/// The 4-level grid, padded to a 16-entry table (indices are two bits).
pub(crate) const TABLE: [i8; 16] = [GRID[0], GRID[1], GRID[2], GRID[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// Where the on-disk block's indices start (`formats/blocks.md`, "q2_s").
const QS: usize = 2 + QK_S / 16;

/// Activation blocks per super-block, and weights per sub-scale.
pub(crate) const SUB: usize = QK_S / QK;
pub(crate) const QUARTER: usize = QK / 4;
/// Bytes of one block's crumbs in a tile.
pub(crate) const BLK_BYTES: usize = 2 * 64;
/// Offsets inside a tile super-block.
pub(crate) const SC_OFF: usize = SUB * BLK_BYTES;
pub(crate) const D_OFF: usize = SC_OFF + SUB * 2 * TILE;
pub(crate) const SB_BYTES: usize = D_OFF + 2 * TILE + 32;
/// Prefetch distance (one super-block) and lines to prefetch per block (21 in 8 steps).
pub(crate) const PF: usize = SB_BYTES;
pub(crate) const PF_LINES: usize = 3;

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

/// `UTABLE`'s four values repeated: a table for indices with junk above their two bits.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const UTABLE4: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut n = 0;
    while n < 16 {
        t[n] = UTABLE[n % 4];
        n += 1;
    }
    t
};

const _: () = assert!(SB_BYTES == 21 * 64 && BLOCK_BYTES == QS + QK_S / 4 && SUB * QK == QK_S);

/// Geometry of a q2_s matrix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct S2Tiles {
    /// Super-blocks per row.
    pub nsb: usize,
    pub tiles: usize,
}

impl S2Tiles {
    pub(crate) fn new(rows: usize, cols: usize) -> S2Tiles {
        S2Tiles { nsb: cols / QK_S, tiles: rows.div_ceil(TILE) }
    }

    pub(crate) fn tile_bytes(&self) -> usize {
        self.nsb * SB_BYTES
    }
}

impl TileLayout for S2Tiles {
    const INT8_ACTS: bool = true;

    fn tiles(&self) -> usize {
        self.tiles
    }

    fn tile_bytes(&self) -> usize {
        S2Tiles::tile_bytes(self)
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

/// Repack q2_s rows (`bytes`) of tiles `first..` into `out` (whole tiles, zeroed or an earlier
/// packing of the same shape: padding rows are never written).
fn pack(k: &S2Tiles, rows: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
    for_each_row_superblock(k.tile_bytes(), SB_BYTES, BLOCK_BYTES, rows, bytes, first, out, |sb, i, src| {
        sb[D_OFF + 2 * i..D_OFF + 2 * i + 2].copy_from_slice(&src[0..2]);
        for b in 0..SUB {
            // Sub-scales 4b .. 4b + 4 are the two bytes 2 + 2b, 3 + 2b, already as two
            // nibbles each in the order the tile keeps them.
            sb[SC_OFF + 32 * b + i] = src[2 + 2 * b];
            sb[SC_OFF + 32 * b + 16 + i] = src[3 + 2 * b];
            // On disk, weight 32b + l has its index in bits 2 (b % 4) of byte
            // 32 (b / 4) + l.
            let (q, shift) = (&src[QS + 32 * (b / 4)..QS + 32 * (b / 4) + 32], 2 * (b % 4));
            let blk = &mut sb[b * BLK_BYTES..(b + 1) * BLK_BYTES];
            for jj in 0..4 {
                let (mut c0, mut c1) = (0u8, 0u8);
                for g in 0..4 {
                    c0 |= ((q[4 * g + jj] >> shift) & 3) << (2 * g);
                    c1 |= ((q[16 + 4 * g + jj] >> shift) & 3) << (2 * g);
                }
                blk[i * 4 + jj] = c0;
                blk[64 + i * 4 + jj] = c1;
            }
        }
    });
}

/// 2-bit index of weight `e` (0..32) of row `i` in the block whose crumbs start at `blk`.
#[inline]
pub(crate) fn index(blk: &[u8], i: usize, e: usize) -> usize {
    let g = e / 4;
    ((blk[64 * (g / 4) + i * 4 + e % 4] >> (2 * (g % 4))) & 3) as usize
}

/// Signed sub-scale of quarter `q` (0..4) of row `i` of the block whose scale bytes start at `sc`.
#[inline]
pub(crate) fn scale(sc: &[u8], i: usize, q: usize) -> i32 {
    ((sc[16 * (q / 2) + i] >> (4 * (q % 2))) & 15) as i32 - 8
}

/// Row `r` as f32, bit for bit the reference decoder's.
fn unpack_row(k: &S2Tiles, data: &[u8], r: usize, out: &mut [f32]) {
    let tile = &data[r / TILE * k.tile_bytes()..(r / TILE + 1) * k.tile_bytes()];
    let i = r % TILE;
    for (s, y) in out.chunks_exact_mut(QK_S).enumerate() {
        let sb = &tile[s * SB_BYTES..(s + 1) * SB_BYTES];
        let d = f16_at(sb, D_OFF + 2 * i) * D_UNIT;
        for (b, y) in y.chunks_exact_mut(QK).enumerate() {
            let (blk, sc) = (&sb[b * BLK_BYTES..], &sb[SC_OFF + 32 * b..]);
            for (e, o) in y.iter_mut().enumerate() {
                *o = (d * scale(sc, i, e / QUARTER) as f32) * TABLE[index(blk, i, e)] as f32;
            }
        }
    }
}

/// The reference kernel. Per row and block, in this order (the SIMD paths do the same):
/// `isum = sum over quarters q of s[q] * sum_q(GRID[n] * xq)` in i32, then
/// `acc = fma(isum, d * dx, acc)`.
unsafe fn tiles_scalar(j: &Job<S2Tiles>, tiles: Range<usize>) {
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
                        let (blk, sc) = (&sb[sub * BLK_BYTES..], &sb[SC_OFF + 32 * sub..]);
                        let mut isum = 0i32;
                        for q in 0..4 {
                            let part: i32 = (QUARTER * q..QUARTER * (q + 1))
                                .map(|e| TABLE[index(blk, i, e)] as i32 * x[e] as i32)
                                .sum();
                            isum += scale(sc, i, q) * part;
                        }
                        acc = (isum as f32).mul_add(d * j.acts.d(tok, b), acc);
                    }
                }
                *j.y.add(tok * j.ystride + ti * TILE + i) = acc;
            }
        }
    }
}
