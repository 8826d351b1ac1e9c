//! q4_K: ggml's 4-bit k-quant, 4.5 bits per weight, our int4 for rows that are whole multiples of
//! 256. A super-block of 256 weights is 8 sub-blocks of 32; sub-block j stores weight
//! `d * sc[j] * q - dmin * m[j]` with q a nibble and `sc[j]`, `m[j]` 6-bit integers under the
//! super-block's f16 scales `d` and `dmin`. The affine (offset) form fits each sub-block's actual
//! range instead of a range symmetric about zero, which is where it gains on iq4_nl.
//!
//! Byte layout (144 bytes, identical to ggml's `block_q4_K` with QK_K = 256):
//!
//! ```text
//! 0..2     d     f16 LE
//! 2..4     dmin  f16 LE
//! 4..16    scales: 8 x (6-bit sc, 6-bit m), packed as in `scale_min`
//! 16..144  qs: 4 chunks of 32 bytes; chunk c byte l holds weight 64c + l in its low nibble and
//!          weight 64c + 32 + l in its high nibble
//! ```
//!
//! The quantizer is ours: a least-squares affine fit per sub-block (several clipping starts, each
//! refined by alternating nearest assignment and refit), then the 6-bit scales and mins are
//! chosen by trying the neighbours of the rounded values, and `d`, `dmin` are refit over the whole
//! super-block by least squares; the last two steps repeat while the squared error falls.

mod search;

use super::bytes::f16_at;

/// Weights per super-block.
pub const QK_K: usize = 256;
pub const BLOCK_BYTES: usize = 4 + 12 + QK_K / 2;
const NSUB: usize = 8;

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed scale bytes (block bytes
/// 4..16): for j < 4, `sc = s[j] & 63`, `m = s[j + 4] & 63`; for j >= 4, the low 4 bits come from
/// `s[j + 4]` (sc low nibble, m high nibble) and the top 2 bits from bits 6-7 of `s[j - 4]` (sc)
/// and `s[j]` (m). This is ggml's `get_scale_min_k4`.
#[inline(always)]
pub fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Inverse of `scale_min` for all eight sub-blocks; values must be < 64.
pub fn pack_scales(sc: &[u8; NSUB], m: &[u8; NSUB]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    s
}

/// Quantize a row of whole super-blocks.
#[inline(always)]
fn quantize_row_impl<const AVX2: bool>(row: &[f32], out: &mut [u8]) {
    for (x, b) in row.chunks_exact(QK_K).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        let mut finite = true;
        for &v in x {
            finite &= v.is_finite();
        }
        if finite {
            search::quantize_block::<AVX2>(x, b);
        } else {
            // Rare: NaN becomes 0 and infinities the largest finite values.
            let mut clean = [0f32; QK_K];
            for (c, &v) in clean.iter_mut().zip(x) {
                *c = if v.is_nan() { 0.0 } else { v.clamp(f32::MIN, f32::MAX) };
            }
            search::quantize_block::<AVX2>(&clean, b);
        }
    }
}

pub fn quantize_row(row: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, as just checked.
            return unsafe { quantize_row_avx512(row, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, as just checked.
            return unsafe { quantize_row_avx2(row, out) };
        }
    }
    quantize_row_impl::<false>(row, out)
}

/// The AVX2 search compiled with AVX-512 allowed, which the scalar glue between its kernels uses.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_row_avx512(row: &[f32], out: &mut [u8]) {
    quantize_row_impl::<true>(row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(row: &[f32], out: &mut [u8]) {
    quantize_row_impl::<true>(row, out)
}

/// The reference decoder: weight 64c + l (+ 32 for the high nibble) of a super-block is
/// `d * sc - dmin * m` of its sub-block applied to its nibble, evaluated as `(d * sc) * q -
/// dmin * m` (every product is exact in f32, so the only rounding is the final subtraction).
#[inline(always)]
fn dequantize_row_generic(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qs = &b[16..BLOCK_BYTES];
        for c in 0..4 {
            let (sc0, m0) = scale_min(2 * c, scales);
            let (sc1, m1) = scale_min(2 * c + 1, scales);
            let (d0, o0) = (d * sc0 as f32, dmin * m0 as f32);
            let (d1, o1) = (d * sc1 as f32, dmin * m1 as f32);
            let q = &qs[32 * c..32 * c + 32];
            let y = &mut y[64 * c..64 * c + 64];
            for l in 0..32 {
                y[l] = d0 * (q[l] & 0x0f) as f32 - o0;
                y[32 + l] = d1 * (q[l] >> 4) as f32 - o1;
            }
        }
    }
}

super::multiversion!(dequantize_row, dequantize_row_generic, dequantize_row_avx2, (bytes: &[u8], out: &mut [f32]));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_packing_round_trips() {
        let sc: [u8; 8] = [0, 63, 17, 42, 63, 1, 32, 15];
        let m: [u8; 8] = [63, 0, 5, 48, 16, 63, 31, 2];
        let s = pack_scales(&sc, &m);
        for j in 0..8 {
            assert_eq!(scale_min(j, &s), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn builds_agree_bit_for_bit() {
        let mut rng = crate::quant::measure::Rng::new(11);
        let mut row: Vec<f32> = (0..QK_K * 16)
            .map(|_| rng.sample(crate::quant::measure::Dist::StudentT(3)) as f32)
            .collect();
        row[5] = f32::NAN;
        row[700] = f32::INFINITY;
        row[1024..1280].fill(0.0);
        row[1280..1536].fill(-0.25);
        let mut a = vec![0u8; BLOCK_BYTES * 16];
        let mut b = a.clone();
        quantize_row(&row, &mut a);
        quantize_row_impl::<false>(&row, &mut b);
        assert_eq!(a, b);
    }
}
