//! q4_0: ggml's reference 4-bit type, kept as the yardstick for our int4. 32 weights share an
//! f16 scale `d`; weight = d * (n - 8) for a nibble n. Byte j of the 16 nibble bytes holds weight j
//! in its low nibble and weight j + 16 in its high nibble.
//!
//! The quantizer is ggml's `quantize_row_q4_0_ref` operation for operation: the signed value of
//! largest magnitude (the first one on ties) gives d = max / -8, so it maps to nibble 0; each
//! weight becomes `min(15, trunc(x / d + 8.5))` computed with the unrounded d, in f32. (ggml
//! truncates through an int8_t, Rust through `as i32`; both truncate toward zero and the value
//! lies in [0.5, 16.5].) `tests/ggml_crosscheck.rs` checks the bytes against ggml itself.

use super::bytes::MINUS_8_TABLE;
use super::{f16_scale, QK};

pub const BLOCK_BYTES: usize = 2 + QK / 2;

#[inline(always)]
fn quantize_block(x: &[f32], b: &mut [u8]) {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f16_scale(d).to_le_bytes());
    for j in 0..QK / 2 {
        let q0 = ((x[j] * id + 8.5) as i32).min(15) as u8;
        let q1 = ((x[j + QK / 2] * id + 8.5) as i32).min(15) as u8;
        b[2 + j] = q0 | (q1 << 4);
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
    super::dequantize_nibble_row(bytes, out, &MINUS_8_TABLE);
}

super::multiversion!(quantize_row, quantize_row_generic, quantize_row_avx2, (row: &[f32], out: &mut [u8]));
super::multiversion!(dequantize_row, dequantize_row_generic, dequantize_row_avx2, (bytes: &[u8], out: &mut [f32]));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::measure::{sample, Dist};

    #[test]
    fn builds_agree_bit_for_bit() {
        let mut row = sample(Dist::Laplace, 64 * QK, 6);
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
