//! The integer tiles of q8_0, q4_0 and iq4_nl. Every matrix is repacked into *tiles* of 16 rows
//! (bf16 / f32: `float`; q4_k: `k4`; q4_s: `s4`), so that one 512-bit register holds the same four bytes of weights of 16 rows
//! and one instruction leaves one row's partial sum in each 32-bit lane: no horizontal
//! reductions, and a tile's row scales load as one vector.
//!
//! A tile is a run of *pairs* of blocks; a pair is `[quants of block 2p][quants of block 2p+1]
//! [16 f16 scales of block 2p][16 f16 scales of block 2p+1]`, 1088 bytes for q8_0 and 576 for the
//! 4-bit types, both multiples of 64. So each tile, and each thread's run of tiles, is one aligned
//! stream that the hardware and software prefetchers can follow. Rows are padded to a multiple of
//! 16 and blocks to an even count with zero scales.
//!
//! Quants of one block (16 rows `i`, 32 weights `e`):
//! * q8_0: byte `(e/4)*64 + i*4 + e%4` is `q(i, e) ^ 0x80`, i.e. `q + 128` as u8, so the weight is
//!   the unsigned operand of `vpdpbusd`; the `128 * sum(x)` this adds is removed per activation
//!   block (see `act`).
//! * q4_0 / iq4_nl: byte `k*64 + i*4 + j` (k < 4, j < 4) holds the nibble of weight `4k+j` low and
//!   of weight `4k+j+16` high, which is ggml's byte `4k+j` of row `i`'s block, moved as a whole.
//!   Kernels map nibbles to values through a 16-entry table (`Tiled::table`).

use super::layout::{Job, TileLayout};
use crate::quant::bytes::{f16_at, MINUS_8_TABLE};
use crate::quant::{QuantType, IQ4_NL_GRID, QK};
use std::ops::Range;

/// Rows per tile.
pub(crate) const TILE: usize = 16;

/// How a tile's quants decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntKind {
    Q8,
    /// 4-bit index into a 16-value table.
    Nib,
}

/// Geometry of a tiled matrix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tiled {
    pub kind: IntKind,
    /// Signed value of each nibble (unused for q8_0).
    pub table: [i8; 16],
    /// Blocks per row, padded to even.
    pub nbp: usize,
    pub tiles: usize,
}

impl Tiled {
    pub(crate) fn new(qtype: QuantType, rows: usize, cols: usize) -> Tiled {
        let (kind, table) = match qtype {
            QuantType::Q8_0 => (IntKind::Q8, [0; 16]),
            QuantType::Q4_0 => (IntKind::Nib, MINUS_8_TABLE),
            QuantType::Iq4Nl => (IntKind::Nib, IQ4_NL_GRID),
            other => unreachable!("{other} is not tiled"),
        };
        Tiled { kind, table, nbp: (cols / QK).div_ceil(2) * 2, tiles: rows.div_ceil(TILE), }
    }

    /// Quant bytes of one block of one tile.
    pub(crate) fn qbytes(&self) -> usize {
        match self.kind {
            IntKind::Q8 => TILE * QK,
            IntKind::Nib => TILE * QK / 2,
        }
    }

    pub(crate) fn pair_bytes(&self) -> usize {
        2 * self.qbytes() + 2 * TILE * 2
    }

    pub(crate) fn tile_bytes(&self) -> usize {
        self.nbp / 2 * self.pair_bytes()
    }

    /// Offset of block `b`'s quants inside a tile.
    pub(crate) fn quant_off(&self, b: usize) -> usize {
        b / 2 * self.pair_bytes() + b % 2 * self.qbytes()
    }

    /// Offset of block `b`'s 16 f16 scales inside a tile.
    pub(crate) fn scale_off(&self, b: usize) -> usize {
        b / 2 * self.pair_bytes() + 2 * self.qbytes() + b % 2 * TILE * 2
    }

    /// The nibble table biased by 128, as `vpdpbusd`'s unsigned operand wants it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn unsigned_table(&self) -> [u8; 16] {
        self.table.map(|v| (v as u8) ^ 0x80)
    }

    /// Signed weight `e` (0..32) of row `i` of a block whose quants start at `q`.
    #[inline]
    pub(crate) fn quant(&self, q: &[u8], i: usize, e: usize) -> i8 {
        match self.kind {
            IntKind::Q8 => (q[e / 4 * 64 + i * 4 + e % 4] ^ 0x80) as i8,
            IntKind::Nib => self.table[nibble(q, i, e) as usize],
        }
    }
}

/// Nibble `e` (0..32) of row `i` of the 32-weight block whose quants start at `q`, in the 4-bit
/// tile layout that q4_0, iq4_nl, q4_k and q4_s share.
#[inline]
pub(crate) fn nibble(q: &[u8], i: usize, e: usize) -> u8 {
    let k = e % 16;
    let byte = q[k / 4 * 64 + i * 4 + k % 4];
    if e < 16 {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

impl TileLayout for Tiled {
    const INT8_ACTS: bool = true;

    fn tiles(&self) -> usize {
        self.tiles
    }

    fn tile_bytes(&self) -> usize {
        Tiled::tile_bytes(self)
    }

    /// ggml-layout rows.
    fn pack(&self, rows: usize, cols: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
        pack(self, rows, cols, bytes, first, out)
    }

    fn unpack_row(&self, data: &[u8], r: usize, out: &mut [f32]) {
        unpack_row(self, data, r, out)
    }

    unsafe fn tiles_scalar(j: &Job<Self>, tiles: Range<usize>) {
        tiles_scalar(j, tiles)
    }
}

fn pack(t: &Tiled, rows: usize, cols: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
    let nb = cols / QK;
    // ggml's blocks: an f16 scale, then the quants.
    let bb = 2 + t.qbytes() / TILE;
    let rb = nb * bb;
    let tb = t.tile_bytes();
    debug_assert_eq!(out.len() % tb, 0);
    debug_assert_eq!(bytes.len(), rows * rb);
    let (qb, pb) = (t.qbytes(), t.pair_bytes());
    if tb == 0 {
        return; // no columns
    }
    for (ti, tile) in out.chunks_exact_mut(tb).enumerate() {
        let ti = first + ti;
        let real = rows.saturating_sub(ti * TILE).min(TILE);
        assert!(bytes.len() >= (ti * TILE + real) * rb && tile.len() >= nb.div_ceil(2) * pb);
        let tile_ptr = tile.as_mut_ptr();
        // Safety: the reads stay in rows ti*16 .. ti*16+real and the writes in pair b / 2,
        // which the assert above covers.
        let copy = |b: usize, i: usize| unsafe {
            let pair = tile_ptr.add(b / 2 * pb);
            let h = b % 2;
            let src = bytes.as_ptr().add((ti * TILE + i) * rb + b * bb);
            std::ptr::copy_nonoverlapping(src, pair.add(2 * qb + h * TILE * 2 + i * 2), 2);
            let quants = pair.add(h * qb + i * 4);
            let q = src.add(2);
            match t.kind {
                IntKind::Q8 => {
                    for g in 0..QK / 4 {
                        let w = q.add(4 * g).cast::<u32>().read_unaligned() ^ 0x8080_8080;
                        quants.add(g * 64).cast::<u32>().write_unaligned(w);
                    }
                }
                IntKind::Nib => {
                    for k in 0..QK / 8 {
                        let w = q.add(4 * k).cast::<u32>().read_unaligned();
                        quants.add(k * 64).cast::<u32>().write_unaligned(w);
                    }
                }
            }
        };
        // The faster order, measured: q8_0 fills each 64-byte line of the tile while it is in
        // L1 (block by block, 16 rows each); the 4-bit types read each source row through.
        if t.kind == IntKind::Q8 {
            (0..nb).for_each(|b| (0..real).for_each(|i| copy(b, i)));
        } else {
            (0..real).for_each(|i| (0..nb).for_each(|b| copy(b, i)));
        }
        for i in 0..TILE {
            pad(t, tile, i, if i < real { nb } else { 0 });
        }
    }
}

/// Padding from block `from` of tile row `i` on: zero scales (already zero in a fresh buffer,
/// and a reload of the same shape writes only real rows and blocks), and zero q8 weights so that
/// no padded product is ever NaN * 0.
fn pad(t: &Tiled, tile: &mut [u8], i: usize, from: usize) {
    if t.kind == IntKind::Q8 {
        for b in from..t.nbp {
            let qo = t.quant_off(b);
            for g in 0..QK / 4 {
                tile[qo + g * 64 + i * 4..qo + g * 64 + i * 4 + 4].fill(0x80);
            }
        }
    }
}

fn unpack_row(t: &Tiled, data: &[u8], r: usize, out: &mut [f32]) {
    let tile = &data[r / TILE * t.tile_bytes()..(r / TILE + 1) * t.tile_bytes()];
    let i = r % TILE;
    for (b, y) in out.chunks_exact_mut(QK).enumerate() {
        let d = f16_at(tile, t.scale_off(b) + i * 2);
        let q = &tile[t.quant_off(b)..t.quant_off(b) + t.qbytes()];
        for (e, o) in y.iter_mut().enumerate() {
            *o = d * t.quant(q, i, e) as f32;
        }
    }
}


/// The reference kernel. The same float operations per row in the same order as the SIMD paths
/// (`acc = fma(isum, d_w * d_x, acc)` block after block), so they agree bit for bit today; tests
/// allow summation-order differences all the same.
unsafe fn tiles_scalar(j: &Job<Tiled>, tiles: Range<usize>) {
    let t = j.layout;
    let tb = t.tile_bytes();
    for ti in tiles {
        let tile = std::slice::from_raw_parts(j.data.add(ti * tb), tb);
        for i in 0..TILE {
            let r = ti * TILE + i;
            if r >= j.rows {
                break;
            }
            for tok in 0..j.acts.n {
                let mut acc = 0f32;
                for b in 0..t.nbp {
                    let q = &tile[t.quant_off(b)..t.quant_off(b) + t.qbytes()];
                    let x = j.acts.q(tok, b);
                    let mut isum = 0i32;
                    for (e, &xe) in x.iter().enumerate() {
                        isum += t.quant(q, i, e) as i32 * xe as i32;
                    }
                    let dw = f16_at(tile, t.scale_off(b) + 2 * i);
                    acc = (isum as f32).mul_add(dw * j.acts.d(tok, b), acc);
                }
                *j.y.add(tok * j.ystride + r) = acc;
            }
        }
    }
}
