//! The seam between `Matrix` and the block types: each runtime layout (`pack::Tiled` for q8_0,
//! q4_0 and iq4_nl, `float::FloatTiles`, `k4::K4Tiles`, `s4::S4Tiles`, `s3::S3Tiles`,
//! `s2::S2Tiles`) implements `TileLayout` (geometry, packing, row decoding, the scalar reference
//! kernel) in its own file, and one `*Tiles` trait per SIMD path in that path's file. `Matrix`
//! holds the layout as a `dyn Layout` made once in `Matrix::from_bytes` (`matrix::layout_for`), so
//! the only dynamic call a product makes is one per run of tiles a thread takes; inside it
//! everything is static.

use super::act::QActs;
use super::Isa;
use std::ops::Range;

/// One matrix product over tiles of layout `L`: the weights at `data` times either the int8
/// activation blocks `acts` (integer layouts) or the f32 inputs `xs` (float layouts). `Matrix`
/// builds it as `Job<dyn Layout>`; `Layout::run` hands the kernels a `Job<Self>`.
pub(crate) struct Job<'a, L: ?Sized> {
    pub layout: &'a L,
    pub data: *const u8,
    /// Real rows; tile rows past this are padding and not stored.
    pub rows: usize,
    pub cols: usize,
    /// The quantized inputs (`acts.n == n`); left stale for layouts without `INT8_ACTS`.
    pub acts: &'a QActs,
    /// `[n, cols]`
    pub xs: &'a [f32],
    pub n: usize,
    /// `y[tok * ystride + row]`
    pub y: *mut f32,
    pub ystride: usize,
}

// Jobs are shared by the pool's threads, which write disjoint rows of `y`.
unsafe impl<L: ?Sized + Sync> Sync for Job<'_, L> {}

impl<'a, L: ?Sized> Job<'a, L> {
    /// The same product seen through another layout value (the concrete one behind a `dyn`).
    pub(crate) fn with<'b, M>(&self, layout: &'b M) -> Job<'b, M>
    where
        'a: 'b,
    {
        let Job { data, rows, cols, acts, xs, n, y, ystride, .. } = *self;
        Job { layout, data, rows, cols, acts, xs, n, y, ystride }
    }
}

/// What a runtime layout provides. All tiles hold 16 rows (`pack::TILE`); everything else is the
/// layout's own.
pub(crate) trait TileLayout: SimdTiles + Sized + Send + Sync + 'static {
    /// Whether the kernels read the inputs as int8 blocks (`Job::acts`) rather than as f32.
    const INT8_ACTS: bool;

    /// Tiles of the matrix (rows / 16, rounded up).
    fn tiles(&self) -> usize;

    /// Bytes of one tile (a multiple of 64, so that every tile starts on a cache line).
    fn tile_bytes(&self) -> usize;

    /// Repack on-disk rows `bytes` (all `rows` of them, `cols` columns) of tiles `first..` into
    /// `out`, whole tiles, which are zeroed or hold an earlier packing of a matrix of the same
    /// shape: padding that a fresh buffer has as zeros need not be written again.
    fn pack(&self, rows: usize, cols: usize, bytes: &[u8], first: usize, out: &mut [u8]);

    /// Row `r` of the packed matrix `data` as f32 (`out.len()` is the column count), bit for bit
    /// what `QuantType::dequantize_row` gives for the on-disk bytes.
    fn unpack_row(&self, data: &[u8], r: usize, out: &mut [f32]);

    /// The reference kernel: output tiles `tiles` of `j`, plain loops that the SIMD paths match.
    ///
    /// # Safety
    /// `j.data` holds `tiles()` tiles and `j.y` has room for every row and token of `j`.
    unsafe fn tiles_scalar(j: &Job<Self>, tiles: Range<usize>);
}

/// A layout's AVX2 (+FMA, F16C) kernel, implemented in `avx2.rs`.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Avx2Tiles: Sized {
    /// As `TileLayout::tiles_scalar`; the CPU must have the path's features.
    unsafe fn tiles_avx2(j: &Job<Self>, tiles: Range<usize>);
}

/// A layout's AVX-512 VNNI kernel, implemented in `avx512.rs`.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Avx512Tiles: Sized {
    /// As `TileLayout::tiles_scalar`; the CPU must have the path's features.
    unsafe fn tiles_avx512(j: &Job<Self>, tiles: Range<usize>);
}

/// A layout's NEON kernel, implemented in `neon.rs`.
#[cfg(target_arch = "aarch64")]
pub(crate) trait NeonTiles: Sized {
    /// As `TileLayout::tiles_scalar`; the CPU must have the path's features.
    unsafe fn tiles_neon(j: &Job<Self>, tiles: Range<usize>);
}

/// The SIMD kernels this architecture needs of every layout: a layout without one does not
/// compile for it.
#[cfg(target_arch = "x86_64")]
pub(crate) trait SimdTiles: Avx2Tiles + Avx512Tiles {}
#[cfg(target_arch = "x86_64")]
impl<L: Avx2Tiles + Avx512Tiles> SimdTiles for L {}
#[cfg(target_arch = "aarch64")]
pub(crate) trait SimdTiles: NeonTiles {}
#[cfg(target_arch = "aarch64")]
impl<L: NeonTiles> SimdTiles for L {}
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(crate) trait SimdTiles {}
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
impl<L> SimdTiles for L {}

/// `TileLayout` as an object, for `Matrix` (implemented for every `TileLayout`).
pub(crate) trait Layout: Send + Sync {
    fn int8_acts(&self) -> bool;
    fn tiles(&self) -> usize;
    fn tile_bytes(&self) -> usize;
    fn pack(&self, rows: usize, cols: usize, bytes: &[u8], first: usize, out: &mut [u8]);
    fn unpack_row(&self, data: &[u8], r: usize, out: &mut [f32]);
    /// Output tiles `tiles` of `j` (whose layout is `self`) on `isa`.
    ///
    /// # Safety
    /// The CPU runs `isa`, and `j` is as `TileLayout::tiles_scalar` requires.
    unsafe fn run(&self, isa: Isa, j: &Job<dyn Layout>, tiles: Range<usize>);
}

impl<L: TileLayout> Layout for L {
    fn int8_acts(&self) -> bool {
        L::INT8_ACTS
    }

    fn tiles(&self) -> usize {
        TileLayout::tiles(self)
    }

    fn tile_bytes(&self) -> usize {
        TileLayout::tile_bytes(self)
    }

    fn pack(&self, rows: usize, cols: usize, bytes: &[u8], first: usize, out: &mut [u8]) {
        TileLayout::pack(self, rows, cols, bytes, first, out)
    }

    fn unpack_row(&self, data: &[u8], r: usize, out: &mut [f32]) {
        TileLayout::unpack_row(self, data, r, out)
    }

    unsafe fn run(&self, isa: Isa, j: &Job<dyn Layout>, tiles: Range<usize>) {
        let j = j.with(self);
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => L::tiles_avx512(&j, tiles),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => L::tiles_avx2(&j, tiles),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => L::tiles_neon(&j, tiles),
            _ => L::tiles_scalar(&j, tiles),
        }
    }
}
