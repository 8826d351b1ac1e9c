//! bf16 and f32 matrices: f32 products and sums, exact to f32 rounding.

use super::layout::{Job, TileLayout};
use super::pack::TILE;
use std::ops::Range;

/// Float matrices use tiles of 16 rows too (`TILE`): group `g` of a tile is 64 bytes, four per
/// row `i` at `g*64 + i*4`, holding bf16 columns `2g` (low half) and `2g+1` (high half), or f32 column `g`.
/// A thread then reads one linear stream, as for the integer types, instead of one per row, and
/// each output row is one vector lane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FloatTiles {
    pub bf16: bool,
    /// Groups per tile row: columns / 2 (rounded up) for bf16, columns for f32.
    pub groups: usize,
    pub tiles: usize,
}

impl FloatTiles {
    pub(crate) fn new(bf16: bool, rows: usize, cols: usize) -> FloatTiles {
        let groups = if bf16 { cols.div_ceil(2) } else { cols };
        FloatTiles { bf16, groups, tiles: rows.div_ceil(TILE) }
    }

    pub(crate) fn tile_bytes(&self) -> usize {
        self.groups * 64
    }

    /// Weight `(i, c)` of a tile, as f32.
    #[inline]
    pub(crate) fn weight(&self, tile: &[u8], i: usize, c: usize) -> f32 {
        if self.bf16 {
            let at = c / 2 * 64 + i * 4 + c % 2 * 2;
            f32::from_bits((u16::from_le_bytes([tile[at], tile[at + 1]]) as u32) << 16)
        } else {
            let at = c * 64 + i * 4;
            f32::from_le_bytes([tile[at], tile[at + 1], tile[at + 2], tile[at + 3]])
        }
    }
}

impl TileLayout for FloatTiles {
    const INT8_ACTS: bool = false;

    fn tiles(&self) -> usize {
        self.tiles
    }

    fn tile_bytes(&self) -> usize {
        FloatTiles::tile_bytes(self)
    }

    /// Row-major bf16 / f32 rows; padding is never written.
    fn pack(&self, rows: usize, cols: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
        pack(self, rows, cols, bytes, first, out)
    }

    fn unpack_row(&self, data: &[u8], r: usize, out: &mut [f32]) {
        let tile = &data[r / TILE * self.tile_bytes()..(r / TILE + 1) * self.tile_bytes()];
        for (c, o) in out.iter_mut().enumerate() {
            *o = self.weight(tile, r % TILE, c);
        }
    }

    unsafe fn tiles_scalar(j: &Job<Self>, tiles: Range<usize>) {
        tiles_scalar(j, tiles)
    }
}

fn pack(f: &FloatTiles, rows: usize, cols: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
    let es = if f.bf16 { 2 } else { 4 };
    let tb = f.tile_bytes();
    if tb == 0 {
        return; // no columns
    }
    for (ti, tile) in out.chunks_exact_mut(tb).enumerate() {
        for i in 0..TILE {
            let r = (first + ti) * TILE + i;
            if r >= rows {
                break;
            }
            let src = &bytes[r * cols * es..(r + 1) * cols * es];
            // Either two bf16 columns or one f32 column per group: four bytes in both cases,
            // except a final lone bf16 column.
            for (g, w) in src.chunks(4).enumerate() {
                tile[g * 64 + i * 4..g * 64 + i * 4 + w.len()].copy_from_slice(w);
            }
        }
    }
}

/// The reference kernel: one f32 sum per output, columns in order.
unsafe fn tiles_scalar(j: &Job<FloatTiles>, tiles: Range<usize>) {
    let tb = j.layout.tile_bytes();
    for ti in tiles {
        let tile = std::slice::from_raw_parts(j.data.add(ti * tb), tb);
        for i in 0..TILE {
            let r = ti * TILE + i;
            if r >= j.rows {
                break;
            }
            for tok in 0..j.n {
                let x = &j.xs[tok * j.cols..(tok + 1) * j.cols];
                let mut s = 0f32;
                for (c, xv) in x.iter().enumerate() {
                    s += j.layout.weight(tile, i, c) * xv;
                }
                *j.y.add(tok * j.ystride + r) = s;
            }
        }
    }
}
