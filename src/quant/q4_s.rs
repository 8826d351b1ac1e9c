//! q4_s: our int4 for rows that are whole multiples of 256, 4.5 bits per weight. A super-block
//! of 256 weights is 16 sub-blocks of 16; weight `e` of sub-block `j` is
//! `d * 2^-13 * s[j] * GRID[n]`, with `d` the super-block's f16 scale, `s[j]` a signed 7-bit
//! integer (-64..=63) and `n` a nibble into iq4_nl's non-uniform grid. The fixed factor 2^-13
//! (about 1 / (63 * 127)) makes the stored `d` about the super-block's largest weight, so it is
//! a normal f16, with all 11 bits of precision, for weights from 6.1e-5 to 65,000; without it,
//! `d` would be an f16 subnormal (losing precision, then vanishing) for any block whose weights
//! are all below about 0.5. Two things make its error lower than q4_k's and
//! iq4_nl's at the same size: a scale per 16 weights instead of per 32 (a sub-block's range
//! follows its own largest weight), and the non-uniform grid, which fits bell-shaped weights
//! better than evenly spaced levels. The sub-scale is signed because the grid is not symmetric
//! (-127 .. 113): a sub-block whose largest weight is negative uses the long end.
//!
//! Byte layout (144 bytes):
//!
//! ```text
//! 0..2     d      f16 LE (the scale is d * 2^-13)
//! 2..10    low 4 bits of s[j] + 64: byte 2 + j/2, low nibble for even j
//! 10..16   high 3 bits of s[j] + 64: a 48-bit LE integer, bits 3j..3j+3
//! 16..144  nibbles: 8 blocks of 16 bytes; byte l of block b holds weight 32b + l in its low
//!          nibble and weight 32b + 16 + l in its high nibble
//! ```
//!
//! So sub-block 2b is the low nibbles of block b and sub-block 2b + 1 its high nibbles; each
//! 32-weight block is laid out as an iq4_nl block, which the kernels exploit.
//!
//! The quantizer: each sub-block's best real scale (iq4_nl's search: the largest weight tried at
//! several grid positions, least-squares scale for each, then re-assignment and refit); `d` from
//! the largest of them (trying both ends of the signed range), each `s[j]` the better of the two
//! integers either side of `a[j] / d`, then `d` refit by least squares over the super-block and the
//! integers chosen again while the squared error falls.

use super::bytes::block_scale;
use super::iq4_nl::{evaluate2, nearest_indices, search_scales};
use super::{f16_round, f16_scale, IQ4_NL_GRID};

/// Weights per super-block.
pub const QK_S: usize = 256;
/// Weights per sub-block (one scale each).
pub const SUB: usize = 16;
const NSUB: usize = QK_S / SUB;
pub const BLOCK_BYTES: usize = 2 + 8 + 6 + QK_S / 2;
/// The sub-scale range.
pub const S_MIN: i32 = -64;
pub const S_MAX: i32 = 63;
/// The unit of the stored `d`: 2^-13. Multiplying by it is exact in f32.
pub const D_UNIT: f32 = 1.0 / 8192.0;
/// Below this a scale would underflow f16; such sub-blocks and super-blocks are zeros.
const TINY: f32 = 1e-30;

/// `d` rounded to what a block can store (an f16 multiple of `D_UNIT`).
#[inline(always)]
fn round_d(d: f32) -> f32 {
    f16_round(d / D_UNIT) * D_UNIT
}

/// The 16 sub-scales from a block's bytes 2..16.
#[inline(always)]
pub fn unpack_scales(s: &[u8]) -> [i8; NSUB] {
    let mut hi = [0u8; 8];
    hi[..6].copy_from_slice(&s[8..14]);
    let hi = u64::from_le_bytes(hi);
    let mut out = [0i8; NSUB];
    for j in 0..NSUB {
        let lo = (s[j / 2] >> (4 * (j % 2))) & 0x0f;
        let h = ((hi >> (3 * j)) & 7) as u8;
        out[j] = ((lo | (h << 4)) as i32 + S_MIN) as i8;
    }
    out
}

/// Inverse of `unpack_scales`; values must be in `S_MIN..=S_MAX`.
pub fn pack_scales(sc: &[i8; NSUB]) -> [u8; 14] {
    let mut s = [0u8; 14];
    let mut hi = 0u64;
    for j in 0..NSUB {
        let u = (sc[j] as i32 - S_MIN) as u8;
        s[j / 2] |= (u & 0x0f) << (4 * (j % 2));
        hi |= ((u >> 4) as u64) << (3 * j);
    }
    s[8..14].copy_from_slice(&hi.to_le_bytes()[..6]);
    s
}

/// Integer sub-scales for super-block scale `d`, each the better of the two integers either
/// side of `a[j] / d`; returns them with the total squared error and the least-squares sums for `d`.
/// `sq[j]` is sub-block j's sum of squares in weight order: its error at scale 0 (stored zeros).
#[inline(always)]
fn choose_ints(
    x: &[[f32; SUB]; NSUB],
    sq: &[f32; NSUB],
    a: &[f32; NSUB],
    d: f32,
) -> ([i8; NSUB], f32, f32, f32) {
    let mut s = [0i8; NSUB];
    let (mut err, mut num, mut den) = (0f32, 0f32, 0f32);
    for j in 0..NSUB {
        let u = (a[j] / d).clamp(S_MIN as f32, S_MAX as f32);
        let lo = u.floor() as i32;
        let t = [lo, lo + 1];
        // Both integers' errors in one pass; a scale of 0 (or an integer out of range, whose
        // result is ignored) is evaluated at 1 and its result replaced, without a branch.
        let c = [d * t[0] as f32, d * t[1] as f32];
        let pass = evaluate2(
            &x[j],
            if c[0] == 0.0 { 1.0 } else { c[0] },
            if c[1] == 0.0 { 1.0 } else { c[1] },
        );
        let mut best = (f32::MAX, 0f32, 0f32, 0i32);
        for i in 0..2 {
            let (e, gx, gg) = if c[i] == 0.0 {
                (sq[j], 0.0, 0.0)
            } else {
                pass[i]
            };
            let better = (S_MIN..=S_MAX).contains(&t[i]) && e < best.0;
            best = if better { (e, gx, gg, t[i]) } else { best };
        }
        let (e, gx, gg, t) = best;
        s[j] = t as i8;
        err += e;
        let tf = t as f32;
        num += tf * gx;
        den += tf * tf * gg;
    }
    (s, err, num, den)
}

#[inline(always)]
fn quantize_block(x: &[f32], b: &mut [u8]) {
    let mut subs = [[0f32; SUB]; NSUB];
    for (j, s) in subs.iter_mut().enumerate() {
        s.copy_from_slice(&x[SUB * j..SUB * (j + 1)]);
    }
    // iq4_nl's search, without rounding the scale: it becomes an integer under `d`.
    let a = search_scales::<SUB, false, NSUB>(&subs);
    let mut sq = [0f32; NSUB];
    for j in 0..NSUB {
        for &v in &subs[j] {
            sq[j] += v * v;
        }
    }
    let mut amax = 0f32;
    for &aj in &a {
        amax = amax.max(aj.abs());
    }
    b.fill(0);
    if amax < TINY {
        return;
    }
    // d > 0; the largest sub-scale maps to 63, or to -64 when it is negative (the wider end).
    let mut best: Option<(f32, [i8; NSUB], f32)> = None;
    let amax_signed = a
        .iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let starts = [amax / S_MAX as f32, amax / -S_MIN as f32];
    for &d0 in &starts[..if amax_signed < 0.0 { 2 } else { 1 }] {
        let mut d = round_d(d0);
        for _ in 0..3 {
            if d <= 0.0 || !d.is_finite() {
                break;
            }
            let (s, err, num, den) = choose_ints(&subs, &sq, &a, d);
            if best.is_none_or(|(_, _, e)| err < e) {
                best = Some((d, s, err));
            } else {
                break;
            }
            if den <= 0.0 {
                break;
            }
            let dn = round_d(num / den);
            if dn == d {
                break;
            }
            d = dn;
        }
    }
    let Some((d, s, _)) = best else { return };
    b[..2].copy_from_slice(&f16_scale(d / D_UNIT).to_le_bytes());
    b[2..16].copy_from_slice(&pack_scales(&s));
    for j in 0..NSUB {
        let c = d * s[j] as f32;
        if c == 0.0 {
            continue; // nibbles stay 0; the scale makes them zeros
        }
        let n = nearest_indices(&subs[j], 1.0 / c);
        let (blk, shift) = (j / 2, 4 * (j % 2));
        for l in 0..SUB {
            b[16 + 16 * blk + l] |= n[l] << shift;
        }
    }
}

#[inline(always)]
fn quantize_row_generic(row: &[f32], out: &mut [u8]) {
    for (x, b) in row
        .chunks_exact(QK_S)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
    {
        let mut finite = true;
        for &v in x {
            finite &= v.is_finite();
        }
        if finite {
            quantize_block(x, b);
        } else {
            // Rare: NaN becomes 0 and infinities the largest finite values.
            let mut clean = [0f32; QK_S];
            for (c, &v) in clean.iter_mut().zip(x) {
                *c = if v.is_nan() {
                    0.0
                } else {
                    v.clamp(f32::MIN, f32::MAX)
                };
            }
            quantize_block(&clean, b);
        }
    }
}

/// The reference decoder: `((d * 2^-13) * s[j]) * GRID[n]`, every product exact in f32 (11 + 7
/// + 8 significant bits, a power of two), so the decoded weights are exact.
#[inline(always)]
fn dequantize_row_generic(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK_S)) {
        let d = block_scale(b) * D_UNIT;
        let s = unpack_scales(&b[2..16]);
        for blk in 0..NSUB / 2 {
            let q = &b[16 + 16 * blk..32 + 16 * blk];
            let (c0, c1) = (d * s[2 * blk] as f32, d * s[2 * blk + 1] as f32);
            let y = &mut y[32 * blk..32 * blk + 32];
            for l in 0..SUB {
                y[l] = c0 * IQ4_NL_GRID[(q[l] & 0x0f) as usize] as f32;
                y[SUB + l] = c1 * IQ4_NL_GRID[(q[l] >> 4) as usize] as f32;
            }
        }
    }
}

/// Quantize a row: the search compiled for AVX-512 or AVX2 when the CPU has it (so that its
/// vector loops inline), else for the baseline; every copy gives the same bytes.
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
    quantize_row_generic(row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_row_avx512(row: &[f32], out: &mut [u8]) {
    quantize_row_generic(row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(row: &[f32], out: &mut [u8]) {
    quantize_row_generic(row, out)
}
super::multiversion!(dequantize_row, dequantize_row_generic, dequantize_row_avx2, (bytes: &[u8], out: &mut [f32]));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::measure::{sample, Dist};

    #[test]
    fn scale_packing_round_trips() {
        let mut sc = [0i8; NSUB];
        for (j, s) in sc.iter_mut().enumerate() {
            *s = [-64, 63, 0, -1, 1, 17, -33, 42][j % 8]
                + if j >= 8 { (j as i8 % 3) - 1 } else { 0 };
            *s = (*s).clamp(-64, 63);
        }
        assert_eq!(unpack_scales(&pack_scales(&sc)), sc);
    }

    #[test]
    fn builds_agree_bit_for_bit() {
        let mut row = sample(Dist::StudentT(3), QK_S * 16, 11);
        row[5] = f32::NAN;
        row[700] = f32::INFINITY;
        row[1024..1280].fill(0.0);
        row[1280..1536].fill(-0.25);
        row[1536..1552].fill(0.0);
        let mut a = vec![0u8; BLOCK_BYTES * 16];
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
