//! q4_k in tiles of 16 rows. Weight `q` of sub-block `j` (32 weights) of a super-block (256) is
//! `d*sc[j] * q - dmin*m[j]`, q a nibble, so a row's dot product with activations `x` is, per
//! sub-block, `d*sc[j] * sum((q - 8) x) - (dmin*m[j] - 8*d*sc[j]) * sum(x)`. The first sum runs on
//! the integer kernels' machinery (the nibbles packed exactly as an iq4_nl block whose table is
//! -8..8); the second uses the exact f32 sum of the activation block, so the only error is, as for
//! the other integer types, the int8 rounding of `x` in the first. Centring q at 8 makes what
//! that rounding multiplies about half as large as `q` itself would (measured: 1.5% relative
//! RMS error of a product uncentred, against about 0.7%).
//!
//! A tile super-block (16 rows x 256 weights, 2368 bytes, a multiple of 64):
//! ```text
//! 0     8 x 256  nibbles of sub-block j, laid out as a 4-bit block (see `pack`)
//! 2048  8 x 16   sc[j] of rows 0..16 (6-bit, one byte each)
//! 2176  8 x 16   m[j] of rows 0..16
//! 2304  16 x f16 d of rows 0..16
//! 2336  16 x f16 dmin of rows 0..16
//! ```
//! `d*sc` and `dmin*m` are exact in f32 (11 + 6 significant bits), which keeps `row_f32` bit for
//! bit the reference decoder's, at 4.625 bits per weight against the on-disk 4.5.

use super::layout::{Job, TileLayout};
use super::pack::{nibble, TILE};
use crate::quant::bytes::{f16_at, MINUS_8_TABLE};
use crate::quant::q4_k::{scale_min, BLOCK_BYTES, QK_K};
use crate::quant::QK;
use std::ops::Range;

pub(crate) const SUB: usize = QK_K / QK;
pub(crate) const SB_BYTES: usize = SUB * 256 + 2 * SUB * TILE + 2 * TILE * 2;
pub(crate) const SC_OFF: usize = SUB * 256;
pub(crate) const M_OFF: usize = SC_OFF + SUB * TILE;
pub(crate) const D_OFF: usize = M_OFF + SUB * TILE;
pub(crate) const DMIN_OFF: usize = D_OFF + TILE * 2;
/// Prefetch distance: a super-block's scales sit at its end but are read first, so the whole of
/// the next super-block is fetched while this one is worked on.
pub(crate) const PF: usize = SB_BYTES;
/// Lines of the next super-block to prefetch per sub-block (37 lines in 8 steps).
pub(crate) const PF_LINES: usize = 5;

/// The nibble table: q - 8.
pub(crate) const TABLE: [i8; 16] = MINUS_8_TABLE;

const _: () = assert!(SB_BYTES == 37 * 64 && DMIN_OFF + 32 == SB_BYTES);

#[derive(Debug, Clone, Copy)]
pub(crate) struct K4Tiles {
    /// Super-blocks per row.
    pub nsb: usize,
    pub tiles: usize,
}

impl K4Tiles {
    pub(crate) fn new(rows: usize, cols: usize) -> K4Tiles {
        K4Tiles { nsb: cols / QK_K, tiles: rows.div_ceil(TILE) }
    }

    pub(crate) fn tile_bytes(&self) -> usize {
        self.nsb * SB_BYTES
    }
}

impl TileLayout for K4Tiles {
    const INT8_ACTS: bool = true;

    fn tiles(&self) -> usize {
        self.tiles
    }

    fn tile_bytes(&self) -> usize {
        K4Tiles::tile_bytes(self)
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

/// The loop every super-block layout's `pack` shares: for each real row `i` of tiles `first..`
/// of `out` (padding rows are never visited) and each of its on-disk super-blocks `src`
/// (`block_bytes` each), `f(sb, i, src)` with `sb` that super-block's `sb_bytes` in the tile.
#[allow(clippy::too_many_arguments)]
pub(crate) fn for_each_row_superblock(
    tile_bytes: usize,
    sb_bytes: usize,
    block_bytes: usize,
    rows: usize,
    bytes: &[u8],
    first: usize,
    out: &mut [u8],
    mut f: impl FnMut(&mut [u8], usize, &[u8]),
) {
    if tile_bytes == 0 {
        return;
    }
    let nsb = tile_bytes / sb_bytes;
    let rb = nsb * block_bytes;
    for (ti, tile) in out.chunks_exact_mut(tile_bytes).enumerate() {
        let ti = first + ti;
        for i in 0..TILE.min(rows.saturating_sub(ti * TILE)) {
            let row = &bytes[(ti * TILE + i) * rb..(ti * TILE + i + 1) * rb];
            for (s, src) in row.chunks_exact(block_bytes).enumerate() {
                f(&mut tile[s * sb_bytes..(s + 1) * sb_bytes], i, src);
            }
        }
    }
}

/// Repack ggml q4_k rows (`bytes`) of tiles `first..` into `out` (whole tiles, zeroed or an
/// earlier packing of the same shape: padding rows are never written).
fn pack(k: &K4Tiles, rows: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
    for_each_row_superblock(k.tile_bytes(), SB_BYTES, BLOCK_BYTES, rows, bytes, first, out, |sb, i, src| {
        sb[D_OFF + 2 * i..D_OFF + 2 * i + 2].copy_from_slice(&src[0..2]);
        sb[DMIN_OFF + 2 * i..DMIN_OFF + 2 * i + 2].copy_from_slice(&src[2..4]);
        let qs = &src[16..];
        for j in 0..SUB {
            let (sc, m) = scale_min(j, &src[4..16]);
            sb[SC_OFF + j * TILE + i] = sc;
            sb[M_OFF + j * TILE + i] = m;
            // Sub-block j = 2c + h is nibble h of bytes 32c..32c+32; as a 4-bit block,
            // byte k*64 + i*4 + jj holds weights 4k+jj (low) and 4k+jj+16 (high).
            let (c, shift) = (j / 2, 4 * (j % 2));
            for kk in 0..4 {
                let word = |at: usize| {
                    let w = u32::from_le_bytes(qs[32 * c + at..32 * c + at + 4].try_into().unwrap());
                    (w >> shift) & 0x0f0f_0f0f
                };
                let byte4 = word(4 * kk) | (word(16 + 4 * kk) << 4);
                let at = j * 256 + kk * 64 + i * 4;
                sb[at..at + 4].copy_from_slice(&byte4.to_le_bytes());
            }
        }
    });
}

/// Row `r` as f32, bit for bit the reference decoder's.
fn unpack_row(k: &K4Tiles, data: &[u8], r: usize, out: &mut [f32]) {
    let tile = &data[r / TILE * k.tile_bytes()..(r / TILE + 1) * k.tile_bytes()];
    let i = r % TILE;
    for (s, y) in out.chunks_exact_mut(QK_K).enumerate() {
        let sb = &tile[s * SB_BYTES..(s + 1) * SB_BYTES];
        let (d, dmin) = (f16_at(sb, D_OFF + 2 * i), f16_at(sb, DMIN_OFF + 2 * i));
        for (j, y) in y.chunks_exact_mut(QK).enumerate() {
            let dsc = d * sb[SC_OFF + j * TILE + i] as f32;
            let mn = dmin * sb[M_OFF + j * TILE + i] as f32;
            for (e, o) in y.iter_mut().enumerate() {
                *o = dsc * nibble(&sb[j * 256..], i, e) as f32 - mn;
            }
        }
    }
}

/// The reference kernel. Per row and block, in this order (the SIMD paths do the same):
/// `acc = fma(isum, dsc * dx, acc)`, then `acc = fma(-(mn - 8 * dsc), sum(x), acc)`, where
/// `isum = sum((q - 8) xq)`, `dsc = d * sc`, `mn = dmin * m`.
unsafe fn tiles_scalar(j: &Job<K4Tiles>, tiles: Range<usize>) {
    let tb = j.layout.tile_bytes();
    for ti in tiles {
        let tile = std::slice::from_raw_parts(j.data.add(ti * tb), tb);
        for i in 0..TILE.min(j.rows - ti * TILE) {
            for tok in 0..j.acts.n {
                let mut acc = 0f32;
                for s in 0..j.layout.nsb {
                    let sb = &tile[s * SB_BYTES..(s + 1) * SB_BYTES];
                    let (d, dmin) = (f16_at(sb, D_OFF + 2 * i), f16_at(sb, DMIN_OFF + 2 * i));
                    for sub in 0..SUB {
                        let b = s * SUB + sub;
                        let x = j.acts.q(tok, b);
                        let q = &sb[sub * 256..(sub + 1) * 256];
                        let isum: i32 = (0..QK).map(|e| TABLE[nibble(q, i, e) as usize] as i32 * x[e] as i32).sum();
                        let dsc = d * sb[SC_OFF + sub * TILE + i] as f32;
                        let off = dmin * sb[M_OFF + sub * TILE + i] as f32 - 8.0 * dsc;
                        acc = (isum as f32).mul_add(dsc * j.acts.d(tok, b), acc);
                        acc = (-off).mul_add(j.acts.sum(tok, b), acc);
                    }
                }
                *j.y.add(tok * j.ystride + ti * TILE + i) = acc;
            }
        }
    }
}
