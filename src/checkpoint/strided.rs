//! Element types of the pickled checkpoint forms, and reading rows out of a stored matrix that is
//! laid out transposed or strided (ckpt-0 stores `[in, out]`, torch views may have any strides).

/// Element type of a stored array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    I8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
        }
    }
}

#[inline]
pub(crate) fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Decode `out.len()` little-endian elements from the start of `bytes`.
pub(crate) fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let n = out.len();
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes[..n * 4].chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes[..n * 2].chunks_exact(2)) {
                *o = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes[..n * 2].chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::I8 => {
            for (o, &b) in out.iter_mut().zip(&bytes[..n]) {
                *o = b as i8 as f32;
            }
        }
    }
}

/// One element at element index `i`.
#[inline]
pub(crate) fn decode_one(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    let mut o = [0f32];
    decode(dtype, &bytes[i * dtype.size()..], &mut o);
    o[0]
}

/// Tile edge of the transposing copy: a 64x64 f32 tile is 16 KiB, so the tile and the 64 output
/// row segments it feeds stay in L1 while the source is read in 64-element runs.
const TILE: usize = 64;

/// Fill `out` (`n` rows of `cols`, row-major) from a source stored column-major with respect to
/// the rows we want: `load(c, r, buf)` must fill `buf[i]` with element `(r + i, c)`, a contiguous
/// run in the source. Works tile by tile so neither side is walked with a large stride.
pub(crate) fn transpose_rows<T: Copy + Default>(
    n: usize,
    cols: usize,
    out: &mut [T],
    mut load: impl FnMut(usize, usize, &mut [T]),
) {
    debug_assert_eq!(out.len(), n * cols);
    let mut tile = [T::default(); TILE * TILE];
    for r0 in (0..n).step_by(TILE) {
        let rn = TILE.min(n - r0);
        for c0 in (0..cols).step_by(TILE) {
            let cn = TILE.min(cols - c0);
            for cc in 0..cn {
                load(c0 + cc, r0, &mut tile[cc * TILE..cc * TILE + rn]);
            }
            scatter(&tile, rn, cn, &mut out[r0 * cols + c0..], cols);
        }
    }
}

/// `out[rr * stride + cc] = tile[cc * TILE + rr]` for the `rn x cn` corner of the tile, in 8x8
/// blocks of fixed size (which compile to straight-line, bounds-check-free code) plus the ragged
/// edges.
#[inline]
fn scatter<T: Copy>(tile: &[T; TILE * TILE], rn: usize, cn: usize, out: &mut [T], stride: usize) {
    const B: usize = 8;
    let (rf, cf) = (rn / B * B, cn / B * B);
    for rb in (0..rf).step_by(B) {
        for cb in (0..cf).step_by(B) {
            let mut blk = [[tile[0]; B]; B];
            for (j, src) in tile[cb * TILE..].chunks_exact(TILE).take(B).enumerate() {
                let src: &[T; B] = src[rb..rb + B].try_into().unwrap();
                for i in 0..B {
                    blk[i][j] = src[i];
                }
            }
            for (i, b) in blk.iter().enumerate() {
                out[(rb + i) * stride + cb..][..B].copy_from_slice(b);
            }
        }
    }
    for rr in 0..rn {
        let row = &mut out[rr * stride..][..cn];
        let from = if rr < rf { cf } else { 0 };
        for (cc, o) in row.iter_mut().enumerate().skip(from) {
            *o = tile[cc * TILE + rr];
        }
    }
}

/// Element `(r, c)` of a strided view lies at `base + r * rs + c * cs` (in elements).
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub dtype: DType,
    pub base: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// Rows `row0 ..` into `out` (a whole number of rows of `cols`). `bytes` must hold every
    /// element the view reaches; callers check that once when they open the file.
    pub(crate) fn read_rows(&self, bytes: &[u8], cols: usize, row0: usize, out: &mut [f32]) {
        let n = out.len() / cols;
        let es = self.dtype.size();
        if self.cs == 1 && (self.rs == cols || n == 1) {
            let start = (self.base + row0 * self.rs) * es;
            decode(self.dtype, &bytes[start..], out);
        } else if self.cs == 1 {
            for (r, o) in out.chunks_exact_mut(cols).enumerate() {
                decode(self.dtype, &bytes[(self.base + (row0 + r) * self.rs) * es..], o);
            }
        } else if self.rs == 1 {
            transpose_rows(n, cols, out, |c, r, buf| {
                decode(self.dtype, &bytes[(self.base + c * self.cs + row0 + r) * es..], buf)
            });
        } else {
            for (r, o) in out.chunks_exact_mut(cols).enumerate() {
                for (c, x) in o.iter_mut().enumerate() {
                    *x = decode_one(
                        self.dtype,
                        bytes,
                        self.base + (row0 + r) * self.rs + c * self.cs,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_and_strided_views_match_the_direct_definition() {
        // A 7 x 130 f32 buffer; views of shape [rows, cols] with several stride patterns.
        let src: Vec<f32> = (0..7 * 130).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bytes: Vec<u8> = src.iter().flat_map(|x| x.to_le_bytes()).collect();
        let cases = [
            (View { dtype: DType::F32, base: 3, rs: 130, cs: 1 }, 6, 127), // row-major, offset
            (View { dtype: DType::F32, base: 0, rs: 1, cs: 7 }, 7, 130),   // transposed
            (View { dtype: DType::F32, base: 1, rs: 1, cs: 7 }, 5, 129),   // transposed, offset
            (View { dtype: DType::F32, base: 2, rs: 131, cs: 3 }, 3, 40),  // general
        ];
        for (v, rows, cols) in cases {
            for row0 in 0..rows {
                for n in 1..=rows - row0 {
                    let mut out = vec![0f32; n * cols];
                    v.read_rows(&bytes, cols, row0, &mut out);
                    for r in 0..n {
                        for c in 0..cols {
                            let want = src[v.base + (row0 + r) * v.rs + c * v.cs];
                            assert_eq!(out[r * cols + c], want, "{v:?} row {} col {c}", row0 + r);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tiled_transpose_covers_full_blocks_and_ragged_edges() {
        // Stored [cols, rows] row-major (like ckpt-0's [in, out]); canonical rows are its columns.
        let (rows, cols) = (150, 77);
        let src: Vec<i8> = (0..rows * cols).map(|i| (i * 7 % 251) as u8 as i8).collect();
        for (row0, n) in [(0, 150), (0, 64), (1, 63), (5, 129), (64, 65), (149, 1), (7, 8)] {
            let mut out = vec![0i8; n * cols];
            transpose_rows(n, cols, &mut out, |c, r, buf| {
                buf.copy_from_slice(&src[c * rows + row0 + r..][..buf.len()])
            });
            for r in 0..n {
                for c in 0..cols {
                    assert_eq!(out[r * cols + c], src[c * rows + row0 + r], "({row0}+{r}, {c})");
                }
            }
        }
    }
}
