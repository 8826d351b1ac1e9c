//! q8_0: 32 weights share one f16 scale `d`; weight = d * q with q in [-127, 127].
//! Byte layout (34 bytes): d (f16 LE), q[0..32] (i8). Identical to ggml's `block_q8_0`, and the
//! quantizer rounds exactly like ggml's `quantize_row_q8_0_reference`: d = amax / 127 stored as
//! f16, q = roundf(x / d) computed with the unrounded d.
//!
//! This is the converter's bulk path (hundreds of GB of expert weights), so the loops are written
//! to auto-vectorize: no serial float reductions, no libm calls, and an AVX2 build of the same code
//! chosen at run time. Both builds give identical bytes (no FMA contraction, same operation order).

use super::bytes::block_scale;
use super::{f16_scale, QK};

pub const BLOCK_BYTES: usize = 2 + QK;

/// C's `roundf` (half away from zero) in a form that vectorizes. Adding the largest f32 below 0.5
/// and truncating gives roundf for every finite f32: below a tie the sum stays below the next
/// integer, and at a tie (k + 0.5) the sum k + 1 - 2^-25 rounds to k + 1 in f32 addition.
#[inline(always)]
pub(crate) fn round_half_away(v: f32) -> f32 {
    (v + 0.499_999_97f32.copysign(v)).trunc()
}

#[inline(always)]
fn quantize_block(x: &[f32], b: &mut [u8]) {
    let x: &[f32; QK] = x.try_into().unwrap();
    let b: &mut [u8; BLOCK_BYTES] = b.try_into().unwrap();
    // |x| as integers: for non-NaN floats the bit patterns order like the values, and integer
    // max reductions vectorize where float ones (NaN rules) do not.
    let mut amax_bits = 0u32;
    for &v in x {
        amax_bits = amax_bits.max(v.to_bits() & 0x7fff_ffff);
    }
    // NaN and infinity (bit patterns above f32::MAX) would make the scale NaN; cap them so a
    // non-finite weight gives a finite, if meaningless, block.
    let amax = f32::from_bits(amax_bits.min(f32::MAX.to_bits()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f16_scale(d).to_le_bytes());
    for (q, &v) in b[2..].iter_mut().zip(x) {
        // |v * id| <= 127 + rounding, so the clamp only guards non-finite input.
        *q = round_half_away(v * id).clamp(-127.0, 127.0) as i8 as u8;
    }
}

#[inline(always)]
fn quantize_row_generic(row: &[f32], out: &mut [u8]) {
    for (x, b) in row.chunks_exact(QK).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        quantize_block(x, b);
    }
}

#[inline(always)]
fn dequantize_row_generic(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = block_scale(b);
        for (o, &q) in y.iter_mut().zip(&b[2..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

super::multiversion!(quantize_row, quantize_row_generic, quantize_row_avx2, (row: &[f32], out: &mut [u8]));
super::multiversion!(dequantize_row, dequantize_row_generic, dequantize_row_avx2, (bytes: &[u8], out: &mut [f32]));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::measure::{sample, Dist};

    #[test]
    fn round_half_away_is_roundf() {
        // Every f32 within 64 ulps of each integer and half-integer up to 256, both signs:
        // where the trick could go wrong.
        for k in 0..=512 {
            let centre = k as f32 * 0.5;
            let mut v = centre;
            for _ in 0..64 {
                v = f32::from_bits(v.to_bits().saturating_sub(1));
            }
            for _ in 0..129 {
                for s in [v, -v] {
                    assert_eq!(round_half_away(s), s.round(), "{s:e}");
                }
                v = f32::from_bits(v.to_bits() + 1);
            }
        }
        // And a spread of magnitudes.
        let mut x = 1e-6f32;
        while x < 1e9 {
            for s in [x, -x] {
                assert_eq!(round_half_away(s), s.round(), "{s:e}");
            }
            x *= 1.0001;
        }
    }

    #[test]
    fn builds_agree_bit_for_bit() {
        let mut row = sample(Dist::StudentT(3), 64 * QK, 5);
        row[7] = f32::NAN;
        row[40] = f32::INFINITY;
        row[64..96].fill(0.0);
        let mut a = vec![0u8; 64 * BLOCK_BYTES];
        let mut b = a.clone();
        quantize_row(&row, &mut a);
        quantize_row_generic(&row, &mut b);
        assert_eq!(a, b);
        let (mut ya, mut yb) = (vec![0f32; row.len()], vec![0f32; row.len()]);
        dequantize_row(&a, &mut ya);
        dequantize_row_generic(&a, &mut yb);
        assert_eq!(ya, yb);
    }
}
