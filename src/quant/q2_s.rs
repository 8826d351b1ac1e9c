//! q2_s: our 2-bit type for expert matrices, 2.5625 bits per weight (82 bytes per 256 weights,
//! every scale counted). A super-block of 256 weights is 32 sub-blocks of 8: weight `i` is
//! `d * 2^-10 * s[i / 8] * GRID[n]`, with `d` the super-block's f16 scale, `s[j]` a signed
//! 4-bit integer (-8..=7) and `n` the weight's 2-bit index into a 4-level asymmetric grid.
//!
//! Byte layout (82 bytes; `formats/blocks.md` has the formulas):
//!
//! ```text
//! 0..2     d      f16 LE (the scale is d * 2^-10)
//! 2..18    s[j] + 8: byte 2 + j/2, low nibble for even j
//! 18..82   qs: weight 128c + 32k + l has its index in bits 2k..2k+2 of byte 32c + l
//! ```
//!
//! Why a scale per 8 weights: at 2 bits a weight the fit of the scale to its own few weights
//! matters more than the grid's shape or the scale's precision; this beats 16-weight
//! sub-blocks with finer scales or a grid choice at the same size. The quantizer is `lowbit`'s
//! search (weighted least squares over searched scales).

use super::lowbit::{fit_superblock, importance_of, nearest, split, Grids};
use super::f16_round;

/// Weights per super-block.
pub const QK: usize = 256;
/// Weights per sub-block (one integer scale each).
pub const SUB: usize = 8;
const NSUB: usize = QK / SUB;
pub const BLOCK_BYTES: usize = 2 + NSUB / 2 + QK / 4;
/// The sub-scale range.
pub const S_MIN: i32 = -8;
pub const S_MAX: i32 = 7;
/// The unit of the stored `d`: 2^-10. Multiplying by it is exact in f32.
pub const D_UNIT: f32 = 1.0 / 1024.0;
/// The 4-level grid.
pub const GRID: [i8; 4] = [-127, -42, 15, 88];

const GRIDS: Grids<4, 1> = Grids::new(&[GRID]);

const QS: usize = 2 + NSUB / 2;

#[inline(always)]
fn round_d(d: f32) -> f32 {
    f16_round(d / D_UNIT) * D_UNIT
}

/// The 32 sub-scales from a block's bytes 2..18.
#[inline(always)]
pub fn unpack_scales(s: &[u8]) -> [i8; NSUB] {
    let mut out = [0i8; NSUB];
    for j in 0..NSUB {
        out[j] = (((s[j / 2] >> (4 * (j % 2))) & 15) as i32 + S_MIN) as i8;
    }
    out
}

/// Inverse of `unpack_scales`; values must be in `S_MIN..=S_MAX`.
pub fn pack_scales(sc: &[i8; NSUB]) -> [u8; NSUB / 2] {
    let mut s = [0u8; NSUB / 2];
    for j in 0..NSUB {
        s[j / 2] |= ((sc[j] as i32 - S_MIN) as u8) << (4 * (j % 2));
    }
    s
}

/// The 2-bit index of weight `i` of a block.
#[inline(always)]
pub fn index(b: &[u8], i: usize) -> u8 {
    (b[QS + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3
}

#[inline(always)]
fn quantize_block(x: &[f32], imp: Option<&[f32]>, b: &mut [u8]) {
    let xs: [[f32; SUB]; NSUB] = split(x);
    let w: [[f32; SUB]; NSUB] = importance_of(imp);
    let fit = fit_superblock(&xs, &w, &GRIDS, 1, (S_MIN, S_MAX), round_d);
    b.fill(0);
    b[..2].copy_from_slice(&super::f16_scale(fit.d / D_UNIT).to_le_bytes());
    b[2..QS].copy_from_slice(&pack_scales(&fit.s));
    for j in 0..NSUB {
        let c = fit.d * fit.s[j] as f32;
        if c == 0.0 {
            continue; // indices stay 0; the scale makes them zeros
        }
        let ic = 1.0 / c;
        for l in 0..SUB {
            let i = SUB * j + l;
            let n = nearest(xs[j][l] * ic, &GRIDS.mids[0]);
            b[QS + 32 * (i / 128) + i % 32] |= n << (2 * ((i / 32) % 4));
        }
    }
}

#[inline(always)]
fn quantize_row_generic(row: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
    for (n, (x, b)) in row.chunks_exact(QK).zip(out.chunks_exact_mut(BLOCK_BYTES)).enumerate() {
        quantize_block(x, importance.map(|w| &w[QK * n..QK * (n + 1)]), b);
    }
}

/// The reference decoder: `((d * 2^-10) * s[j]) * GRID[n]`, every product exact in f32.
#[inline(always)]
fn dequantize_row_generic(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32() * D_UNIT;
        let s = unpack_scales(&b[2..QS]);
        for (i, v) in y.iter_mut().enumerate() {
            *v = (d * s[i / SUB] as f32) * GRID[index(b, i) as usize] as f32;
        }
    }
}

super::multiversion!(quantize_rows, quantize_row_generic, quantize_row_avx2, (row: &[f32], importance: Option<&[f32]>, out: &mut [u8]));
super::multiversion!(dequantize_rows, dequantize_row_generic, dequantize_row_avx2, (bytes: &[u8], out: &mut [f32]));

/// Quantize a row of weights (a whole number of 256-weight super-blocks) into `out`
/// (`row.len() / 256 * BLOCK_BYTES` bytes), minimising the squared error weighted by
/// `importance` (one value per weight, e.g. the mean squared activation of its input column)
/// when given, else the plain squared error. Deterministic: the same bytes on every CPU.
pub fn quantize_row(row: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
    super::lowbit::check_quantize_args("q2_s", QK, BLOCK_BYTES, row, importance, out);
    quantize_rows(row, importance, out)
}

/// Decode `bytes` (whole blocks) into `out.len()` weights.
pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    super::lowbit::check_dequantize_args("q2_s", QK, BLOCK_BYTES, bytes, out);
    dequantize_rows(bytes, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::measure::{sample, Dist};

    #[test]
    fn scale_packing_round_trips() {
        let mut sc = [0i8; NSUB];
        for (j, s) in sc.iter_mut().enumerate() {
            *s = (j as i32 % 16 - 8) as i8;
        }
        assert_eq!(unpack_scales(&pack_scales(&sc)), sc);
    }

    #[test]
    fn builds_agree_bit_for_bit() {
        let mut row = sample(Dist::StudentT(3), QK * 16, 11);
        row[5] = f32::NAN;
        row[700] = f32::INFINITY;
        row[1024..1280].fill(0.0);
        row[1280..1536].fill(-0.25);
        let imp = sample(Dist::Laplace, QK * 16, 12).iter().map(|v| v * v).collect::<Vec<_>>();
        for w in [None, Some(&imp[..])] {
            let mut a = vec![0u8; BLOCK_BYTES * 16];
            let mut b = a.clone();
            quantize_row(&row, w, &mut a);
            quantize_row_generic(&row, w, &mut b);
            assert_eq!(a, b);
            let (mut ya, mut yb) = (vec![0f32; row.len()], vec![0f32; row.len()]);
            dequantize_row(&a, &mut ya);
            dequantize_row_generic(&a, &mut yb);
            assert_eq!(ya, yb);
        }
    }
}
