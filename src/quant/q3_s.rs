//! q3_s: our 3-bit type for expert matrices, 3.28125 bits per weight (105 bytes per 256
//! weights, every scale counted). A super-block of 256 weights is 8 sub-blocks of 32, each two
//! halves of 16: weight `i` is `d * 2^-11 * s[i / 32] * GRID[8 * sel[i / 16] + n]`, with `d`
//! the super-block's f16 scale, `s[k]` a signed 5-bit integer (-16..=15), `sel[h]` one bit per
//! half choosing one of two 8-level grids and `n` the weight's 3-bit index. Selector and index
//! form a 4-bit index into one 16-entry int8 table, so a kernel decodes with one table lookup.
//!
//! Byte layout (105 bytes; `formats/blocks.md` has the formulas):
//!
//! ```text
//! 0..2     d      f16 LE (the scale is d * 2^-11)
//! 2..6     low 4 bits of s[k] + 16: byte 2 + k/2, low nibble for even k
//! 6        bit k: bit 4 of s[k] + 16
//! 7..9     sel: 16-bit LE, bit h = grid of weights 16h .. 16h + 16
//! 9..73    ql: weight 128c + 32k + l has its index bits 0-1 in bits 2k..2k+2 of byte 32c + l
//! 73..105  qh: weight 32b + l has its index bit 2 in bit b of byte l
//! ```
//!
//! Why grids per half and scales per 32: the 0.3 bits a weight left beside the 3-bit indices
//! (60 bits a super-block after `d`) cannot hold a 4-bit scale per 16 weights (64 bits); a 5-bit
//! scale per 32 and a grid bit per 16 (56 bits) can, and grid 1, whose inner levels are about
//! 0.6 times grid 0's, gives a half with smaller weights than its sibling most of what its own
//! scale would.
//! The quantizer is `lowbit`'s search (weighted least squares over searched scales).

use super::lowbit::{fit_superblock, importance_of, nearest, split, Grids};
use super::f16_round;

/// Weights per super-block.
pub const QK: usize = 256;
/// Weights per sub-block (one integer scale each).
pub const SUB: usize = 32;
/// Weights per half (one grid bit each).
pub const HALF: usize = 16;
const NSUB: usize = QK / SUB;
const NHALF: usize = QK / HALF;
pub const BLOCK_BYTES: usize = 2 + 4 + 1 + 2 + QK / 4 + QK / 8;
/// The sub-scale range.
pub const S_MIN: i32 = -16;
pub const S_MAX: i32 = 15;
/// The unit of the stored `d`: 2^-11. Multiplying by it is exact in f32.
pub const D_UNIT: f32 = 1.0 / 2048.0;
/// The two 8-level grids side by side: entry `8 * sel + n`.
pub const GRID: [i8; 16] = [-127, -85, -51, -24, 2, 28, 58, 100, -115, -63, -35, -14, 0, 16, 38, 68];

const GRIDS: Grids<8, 2> = Grids::new(&[
    [GRID[0], GRID[1], GRID[2], GRID[3], GRID[4], GRID[5], GRID[6], GRID[7]],
    [GRID[8], GRID[9], GRID[10], GRID[11], GRID[12], GRID[13], GRID[14], GRID[15]],
]);

const QL: usize = 9;
const QH: usize = QL + QK / 4;

/// `d` rounded to what a block can store (an f16 multiple of `D_UNIT`).
#[inline(always)]
fn round_d(d: f32) -> f32 {
    f16_round(d / D_UNIT) * D_UNIT
}

/// The 8 sub-scales from a block's bytes 2..7.
#[inline(always)]
pub fn unpack_scales(s: &[u8]) -> [i8; NSUB] {
    let mut out = [0i8; NSUB];
    for k in 0..NSUB {
        let lo = (s[k / 2] >> (4 * (k % 2))) & 15;
        let hi = (s[4] >> k) & 1;
        out[k] = ((lo | (hi << 4)) as i32 + S_MIN) as i8;
    }
    out
}

/// Inverse of `unpack_scales`; values must be in `S_MIN..=S_MAX`.
pub fn pack_scales(sc: &[i8; NSUB]) -> [u8; 5] {
    let mut s = [0u8; 5];
    for k in 0..NSUB {
        let u = (sc[k] as i32 - S_MIN) as u8;
        s[k / 2] |= (u & 15) << (4 * (k % 2));
        s[4] |= (u >> 4) << k;
    }
    s
}

/// The 3-bit index of weight `i` of a block.
#[inline(always)]
pub fn index(b: &[u8], i: usize) -> u8 {
    let lo = (b[QL + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3;
    let hi = (b[QH + i % 32] >> (i / 32)) & 1;
    lo | (hi << 2)
}

#[inline(always)]
fn quantize_block(x: &[f32], imp: Option<&[f32]>, b: &mut [u8]) {
    let xs: [[f32; HALF]; NHALF] = split(x);
    let w: [[f32; HALF]; NHALF] = importance_of(imp);
    let fit = fit_superblock(&xs, &w, &GRIDS, SUB / HALF, (S_MIN, S_MAX), round_d);
    b.fill(0);
    let mut s = [0i8; NSUB];
    s.copy_from_slice(&fit.s[..NSUB]);
    b[..2].copy_from_slice(&super::f16_scale(fit.d / D_UNIT).to_le_bytes());
    b[2..7].copy_from_slice(&pack_scales(&s));
    let mut sel = 0u16;
    for h in 0..NHALF {
        sel |= (fit.sel[h] as u16) << h;
    }
    b[7..9].copy_from_slice(&sel.to_le_bytes());
    for h in 0..NHALF {
        let c = fit.d * s[h / 2] as f32;
        if c == 0.0 {
            continue; // indices stay 0; the scale makes them zeros
        }
        let ic = 1.0 / c;
        let mids = &GRIDS.mids[fit.sel[h] as usize];
        for l in 0..HALF {
            let i = HALF * h + l;
            let n = nearest(xs[h][l] * ic, mids);
            b[QL + 32 * (i / 128) + i % 32] |= (n & 3) << (2 * ((i / 32) % 4));
            b[QH + i % 32] |= (n >> 2) << (i / 32);
        }
    }
}

#[inline(always)]
fn quantize_row_generic(row: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
    for (n, (x, b)) in row.chunks_exact(QK).zip(out.chunks_exact_mut(BLOCK_BYTES)).enumerate() {
        quantize_block(x, importance.map(|w| &w[QK * n..QK * (n + 1)]), b);
    }
}

/// The reference decoder: `((d * 2^-11) * s[k]) * GRID[8 sel + n]`, every product exact in f32.
#[inline(always)]
fn dequantize_row_generic(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32() * D_UNIT;
        let s = unpack_scales(&b[2..7]);
        let sel = u16::from_le_bytes([b[7], b[8]]);
        for (i, v) in y.iter_mut().enumerate() {
            let t = 8 * ((sel >> (i / HALF)) & 1) as usize + index(b, i) as usize;
            *v = (d * s[i / SUB] as f32) * GRID[t] as f32;
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
    super::lowbit::check_quantize_args("q3_s", QK, BLOCK_BYTES, row, importance, out);
    quantize_rows(row, importance, out)
}

/// Decode `bytes` (whole blocks) into `out.len()` weights.
pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    super::lowbit::check_dequantize_args("q3_s", QK, BLOCK_BYTES, bytes, out);
    dequantize_rows(bytes, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::measure::{sample, Dist};

    #[test]
    fn scale_packing_round_trips() {
        let sc: [i8; NSUB] = [-16, 15, 0, -1, 1, 7, -9, 12];
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
