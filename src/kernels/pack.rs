//! Runtime layouts. Every matrix is repacked into *tiles* of 16 rows (bf16 / f32: see
//! `FloatTiles`), so that one 512-bit register holds the same four bytes of weights of 16 rows
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

use crate::quant::{QuantType, IQ4_NL_GRID, QK};
use std::alloc::{self, Layout};

/// Rows per tile.
pub(crate) const TILE: usize = 16;

/// A zero-initialised, 64-byte aligned byte buffer. Large ones are mapped straight from the OS
/// and, on Linux, asked to be backed by 2 MiB pages: a stream through a big matrix then takes
/// no TLB miss every 4 KiB, which measurably raises the bandwidth a matrix-vector product gets.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    /// Bytes mapped with mmap (0: from the global allocator).
    mapped: usize,
}

// The buffer is plain bytes owned by this value.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

/// Buffers from this size on are mapped.
#[cfg(target_os = "linux")]
const MAP_FROM: usize = 4 << 20;
#[cfg(target_os = "linux")]
const HUGE: usize = 2 << 20;

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            let ptr = std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8;
            return AlignedBuf { ptr, len, mapped: 0 };
        }
        #[cfg(target_os = "linux")]
        if len >= MAP_FROM {
            if let Some(b) = Self::mapped(len) {
                return b;
            }
        }
        let layout = Layout::from_size_align(len, 64).expect("buffer size overflows");
        // Zeroed allocations of this size come straight from the kernel as untouched pages.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len, mapped: 0 }
    }

    /// Map `len` bytes (rounded up to whole huge pages) at a huge-page boundary; anonymous
    /// mappings are zero-filled.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Option<AlignedBuf> {
        let want = len.div_ceil(HUGE) * HUGE;
        let map_len = want + HUGE;
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return None;
            }
            let base = base as *mut u8;
            // Trim to an aligned window of `want` bytes.
            let head = base.align_offset(HUGE);
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            let ptr = base.add(head);
            let tail = map_len - head - want;
            if tail > 0 {
                libc::munmap(ptr.add(want) as *mut libc::c_void, tail);
            }
            // Advice only: without transparent huge pages this is a no-op.
            libc::madvise(ptr as *mut libc::c_void, want, libc::MADV_HUGEPAGE);
            Some(AlignedBuf { ptr, len, mapped: want })
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped != 0 {
            #[cfg(target_os = "linux")]
            unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.mapped);
            }
        } else if self.len != 0 {
            unsafe { alloc::dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, 64)) }
        }
    }
}

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
            QuantType::Q4_0 => (IntKind::Nib, std::array::from_fn(|n| n as i8 - 8)),
            QuantType::Iq4Nl => (IntKind::Nib, IQ4_NL_GRID),
            QuantType::F32 | QuantType::Bf16 | QuantType::Q4K | QuantType::Q4S => {
                unreachable!("{qtype} is not tiled")
            }
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
    pub(crate) fn unsigned_table(&self) -> [u8; 16] {
        self.table.map(|v| (v as u8) ^ 0x80)
    }

    /// Signed weight `e` (0..32) of row `i` of a block whose quants start at `q`.
    #[inline]
    pub(crate) fn quant(&self, q: &[u8], i: usize, e: usize) -> i8 {
        match self.kind {
            IntKind::Q8 => (q[e / 4 * 64 + i * 4 + e % 4] ^ 0x80) as i8,
            IntKind::Nib => {
                let k = e % 16;
                let byte = q[k / 4 * 64 + i * 4 + k % 4];
                let n = if e < 16 { byte & 0x0f } else { byte >> 4 };
                self.table[n as usize]
            }
        }
    }
}

/// Repack the ggml-layout rows (`bytes`, all `rows` of them) of tiles `first..` into `out`, whole
/// tiles, zeroed or holding an earlier packing of a matrix of the same shape.
pub(crate) fn pack_tiles(
    t: &Tiled,
    qtype: QuantType,
    rows: usize,
    cols: usize,
    bytes: &[u8],
    first: usize,
    out: &mut [u8],
) {
    let nb = cols / QK;
    let bb = qtype.block_bytes();
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

/// Row `r` of a tiled matrix as f32, bit for bit what `QuantType::dequantize_row` gives for the
/// original bytes.
pub(crate) fn unpack_row(t: &Tiled, data: &[u8], r: usize, cols: usize, out: &mut [f32]) {
    let tile = &data[r / TILE * t.tile_bytes()..(r / TILE + 1) * t.tile_bytes()];
    let i = r % TILE;
    for (b, y) in out[..cols].chunks_exact_mut(QK).enumerate() {
        let so = t.scale_off(b) + i * 2;
        let d = half::f16::from_le_bytes([tile[so], tile[so + 1]]).to_f32();
        let q = &tile[t.quant_off(b)..t.quant_off(b) + t.qbytes()];
        for (e, o) in y.iter_mut().enumerate() {
            *o = d * t.quant(q, i, e) as f32;
        }
    }
}

/// Float matrices use tiles of 16 rows too: group `g` of a tile is 64 bytes, four per row `i` at
/// `g*64 + i*4`, holding bf16 columns `2g` (low half) and `2g+1` (high half), or f32 column `g`.
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

/// Repack row-major bf16 / f32 rows (`bytes`) of tiles `first..` into `out`, whole tiles, zeroed
/// or holding an earlier packing of the same shape (padding is never written).
pub(crate) fn pack_float_tiles(f: &FloatTiles, rows: usize, cols: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
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

/// Row `r` of a float-tiled matrix as f32.
pub(crate) fn unpack_float_row(f: &FloatTiles, data: &[u8], r: usize, out: &mut [f32]) {
    let tile = &data[r / TILE * f.tile_bytes()..(r / TILE + 1) * f.tile_bytes()];
    for (c, o) in out.iter_mut().enumerate() {
        *o = f.weight(tile, r % TILE, c);
    }
}
