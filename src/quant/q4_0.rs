//! q4_0: ggml's reference 4-bit type, kept as the yardstick for our int4. 32 weights share an
//! f16 scale `d`; weight = d * (n - 8) for a nibble n. Byte j of the 16 nibble bytes holds weight j
//! in its low nibble and weight j + 16 in its high nibble. The rounding is ggml's reference
//! (`quantize_row_q4_0_ref`): the signed value of largest magnitude maps to -8.

use super::{block_scale, QK};
use half::f16;

pub fn quantize_row(row: &[f32], out: &mut [u8]) {
    for (x, b) in row.chunks_exact(QK).zip(out.chunks_exact_mut(2 + QK / 2)) {
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
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..QK / 2 {
            let q0 = ((x[j] * id + 8.5) as i32).min(15) as u8;
            let q1 = ((x[j + QK / 2] * id + 8.5) as i32).min(15) as u8;
            b[2 + j] = q0 | (q1 << 4);
        }
    }
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(2 + QK / 2).zip(out.chunks_exact_mut(QK)) {
        let d = block_scale(b);
        for j in 0..QK / 2 {
            y[j] = d * ((b[2 + j] & 0x0f) as i32 - 8) as f32;
            y[j + QK / 2] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
        }
    }
}
