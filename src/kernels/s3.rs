//! q3_s in tiles of 16 rows. Weight `e` of a 32-weight sub-block `b` of a super-block is
//! `d * s[b] * GRID[8 * sel + n]` (`d` the stored f16 times 2^-11, `sel` the grid bit of the
//! weight's half, `n` its 3-bit index): one integer scale per 32 weights, which is one
//! activation block. So a row's dot product with quantized activations `x` is, per block,
//! `d * dx * s[b] * sum(GRID[t] xq)`, the sum of a 4-bit table type and the scale applied in
//! integers, exactly; the only error is the int8 rounding of `x`.
//!
//! The kernels rebuild the 4-bit table index `t` of each weight from three pieces: two bits from
//! a crumb plane, one from a bit plane, and the half's grid bit from a 16-bit mask (one bit per
//! row). A tile super-block (16 rows x 256 weights, 1728 bytes = 27 cache lines):
//! ```text
//! 0     8 x 192  block b: 2 x 64 bytes of crumbs, then 64 bytes of high bits (see below)
//! 1536  8 x 4    block b: the grid bits of rows 0..16, u16 for the first half, u16 the second
//! 1568  8 x 16   s[b] of rows 0..16 (i8)
//! 1696  16 x f16 d of rows 0..16 (as stored: the kernels multiply by 2^-11)
//! ```
//! In a block, weight `e` (0..32) of row `i` belongs to group `g = e / 4` (four weights that
//! one 32-bit lane multiplies at once), at byte `i * 4 + e % 4` of every 64-byte vector: the
//! group's index bits 0-1 in bits `2 (g % 4)` of crumb vector `g / 4` (so crumb vector 0 holds
//! the first half, vector 1 the second), its bit 2 in bit `g` of the high-bit vector. Rows
//! 0..8 are the first 32 bytes of each vector, rows 8..16 the last (AVX2 takes 8 rows at a time).
//! 3.375 bits per weight in memory against the on-disk 3.28125: the sub-scales are whole bytes
//! and the grid bits per row.

use super::k4::for_each_row_superblock;
use super::layout::{Job, TileLayout};
use super::pack::TILE;
use crate::quant::bytes::f16_at;
use crate::quant::q3_s::{index as disk_index, unpack_scales, BLOCK_BYTES, QK as QK_S};
use crate::quant::QK;
use std::ops::Range;

pub(crate) use crate::quant::q3_s::D_UNIT;
/// The two 8-level grids side by side: entry `8 * sel + n`.
pub(crate) const TABLE: [i8; 16] = crate::quant::q3_s::GRID;

/// Sub-blocks (= activation blocks) per super-block.
pub(crate) const SUB: usize = QK_S / QK;
/// Bytes of one block's index planes in a tile.
pub(crate) const BLK_BYTES: usize = 3 * 64;
/// Offsets inside a tile super-block.
pub(crate) const SEL_OFF: usize = SUB * BLK_BYTES;
pub(crate) const SC_OFF: usize = SEL_OFF + SUB * 4;
pub(crate) const D_OFF: usize = SC_OFF + SUB * TILE;
pub(crate) const SB_BYTES: usize = D_OFF + 2 * TILE;
/// Prefetch distance (one super-block) and lines to prefetch per block (27 in 8 steps).
pub(crate) const PF: usize = SB_BYTES;
pub(crate) const PF_LINES: usize = 4;

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

const _: () = assert!(SB_BYTES == 27 * 64 && SUB * QK == QK_S);

/// Geometry of a q3_s matrix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct S3Tiles {
    /// Super-blocks per row.
    pub nsb: usize,
    pub tiles: usize,
}

impl S3Tiles {
    pub(crate) fn new(rows: usize, cols: usize) -> S3Tiles {
        S3Tiles { nsb: cols / QK_S, tiles: rows.div_ceil(TILE) }
    }

    pub(crate) fn tile_bytes(&self) -> usize {
        self.nsb * SB_BYTES
    }
}

impl TileLayout for S3Tiles {
    const INT8_ACTS: bool = true;

    fn tiles(&self) -> usize {
        self.tiles
    }

    fn tile_bytes(&self) -> usize {
        S3Tiles::tile_bytes(self)
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

/// Repack q3_s rows (`bytes`) of tiles `first..` into `out` (whole tiles, zeroed or an earlier
/// packing of the same shape: padding rows are never written, and every byte a real row owns is).
fn pack(k: &S3Tiles, rows: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
    for_each_row_superblock(k.tile_bytes(), SB_BYTES, BLOCK_BYTES, rows, bytes, first, out, |sb, i, src| {
        sb[D_OFF + 2 * i..D_OFF + 2 * i + 2].copy_from_slice(&src[0..2]);
        let sel = u16::from_le_bytes([src[7], src[8]]);
        let sc = unpack_scales(&src[2..7]);
        for b in 0..SUB {
            sb[SC_OFF + b * TILE + i] = sc[b] as u8;
            for h in 0..2 {
                let at = SEL_OFF + 4 * b + 2 * h;
                let mut m = u16::from_le_bytes([sb[at], sb[at + 1]]) & !(1 << i);
                m |= ((sel >> (2 * b + h)) & 1) << i;
                sb[at..at + 2].copy_from_slice(&m.to_le_bytes());
            }
            let blk = &mut sb[b * BLK_BYTES..(b + 1) * BLK_BYTES];
            for jj in 0..4 {
                let (mut c0, mut c1, mut hb) = (0u8, 0u8, 0u8);
                for g in 0..8 {
                    let n = disk_index(src, 32 * b + 4 * g + jj);
                    let crumb = (n & 3) << (2 * (g % 4));
                    if g < 4 {
                        c0 |= crumb
                    } else {
                        c1 |= crumb
                    }
                    hb |= (n >> 2) << g;
                }
                blk[i * 4 + jj] = c0;
                blk[64 + i * 4 + jj] = c1;
                blk[128 + i * 4 + jj] = hb;
            }
        }
    });
}

/// Table index (0..16) of weight `e` (0..32) of row `i` in the block whose planes start at
/// `blk`, with its grid bits `sel` (the two u16 masks of the block).
#[inline]
pub(crate) fn index(blk: &[u8], sel: &[u8], i: usize, e: usize) -> usize {
    let (g, jj) = (e / 4, e % 4);
    let crumb = (blk[64 * (g / 4) + i * 4 + jj] >> (2 * (g % 4))) & 3;
    let high = (blk[128 + i * 4 + jj] >> g) & 1;
    let h = e / 16;
    let grid = (u16::from_le_bytes([sel[2 * h], sel[2 * h + 1]]) >> i) & 1;
    (crumb | (high << 2)) as usize | (grid as usize) << 3
}

/// Row `r` as f32, bit for bit the reference decoder's.
fn unpack_row(k: &S3Tiles, data: &[u8], r: usize, out: &mut [f32]) {
    let tile = &data[r / TILE * k.tile_bytes()..(r / TILE + 1) * k.tile_bytes()];
    let i = r % TILE;
    for (s, y) in out.chunks_exact_mut(QK_S).enumerate() {
        let sb = &tile[s * SB_BYTES..(s + 1) * SB_BYTES];
        let d = f16_at(sb, D_OFF + 2 * i) * D_UNIT;
        for (b, y) in y.chunks_exact_mut(QK).enumerate() {
            let c = d * sb[SC_OFF + b * TILE + i] as i8 as f32;
            let (blk, sel) = (&sb[b * BLK_BYTES..], &sb[SEL_OFF + 4 * b..]);
            for (e, o) in y.iter_mut().enumerate() {
                *o = c * TABLE[index(blk, sel, i, e)] as f32;
            }
        }
    }
}

/// The reference kernel. Per row and block, in this order (the SIMD paths do the same):
/// `isum = s * sum(GRID[t] * xq)` in i32 over the block's 32 weights, then
/// `acc = fma(isum, d * dx, acc)`.
unsafe fn tiles_scalar(j: &Job<S3Tiles>, tiles: Range<usize>) {
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
                        let (blk, sel) = (&sb[sub * BLK_BYTES..], &sb[SEL_OFF + 4 * sub..]);
                        let sum: i32 = (0..QK).map(|e| TABLE[index(blk, sel, i, e)] as i32 * x[e] as i32).sum();
                        let isum = sb[SC_OFF + sub * TILE + i] as i8 as i32 * sum;
                        acc = (isum as f32).mul_add(d * j.acts.d(tok, b), acc);
                    }
                }
                *j.y.add(tok * j.ystride + ti * TILE + i) = acc;
            }
        }
    }
}
