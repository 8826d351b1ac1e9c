//! q8_0: 32 weights share one f16 scale `d`; weight = d * q with q in [-127, 127].
//! Byte layout (34 bytes): d (f16 LE), q[0..32] (i8). Identical to ggml's `block_q8_0`.

use super::{block_scale, QK};
use half::f16;

pub fn quantize_row(row: &[f32], out: &mut [u8]) {
    for (x, b) in row.chunks_exact(QK).zip(out.chunks_exact_mut(2 + QK)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, v) in b[2..].iter_mut().zip(x) {
            *q = (v * id).round() as i8 as u8;
        }
    }
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(2 + QK).zip(out.chunks_exact_mut(QK)) {
        let d = block_scale(b);
        for (o, q) in y.iter_mut().zip(&b[2..]) {
            *o = d * (*q as i8) as f32;
        }
    }
}
