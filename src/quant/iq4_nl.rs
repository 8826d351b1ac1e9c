//! iq4_nl: our int4. 32 weights share an f16 scale `d`; weight = d * GRID[n] for a nibble n, where
//! GRID is ggml's non-uniform 16-level grid (denser near zero, where most weights lie). Nibble
//! placement as q4_0: byte j holds weight j (low) and weight j + 16 (high). Identical to ggml's
//! `block_iq4_nl`.

use super::{block_scale, QK};
use half::f16;

pub const IQ4_NL_GRID: [i8; 16] =
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Index of the grid value nearest to `v` (in grid units).
#[inline]
fn nearest(v: f32) -> usize {
    // The grid is sorted: binary search, then pick the closer neighbour.
    let mut lo = 0usize;
    let mut hi = 15usize;
    if v <= IQ4_NL_GRID[0] as f32 {
        return 0;
    }
    if v >= IQ4_NL_GRID[15] as f32 {
        return 15;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if v < IQ4_NL_GRID[mid] as f32 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if v - IQ4_NL_GRID[lo] as f32 <= IQ4_NL_GRID[hi] as f32 - v {
        lo
    } else {
        hi
    }
}

/// Quantize one block: try scales around the max-magnitude guess, assign nearest grid points,
/// refit the scale by least squares, and keep the best by squared error.
fn quantize_block(x: &[f32], q: &mut [u8; QK]) -> f32 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(8);
        return 0.0;
    }
    let base = -max / IQ4_NL_GRID[0] as f32;
    let mut best_err = f32::INFINITY;
    let mut best_d = base;
    let mut trial = [0u8; QK];
    for step in -10i32..=10 {
        let id = (-(IQ4_NL_GRID[0] as f32) + 0.1 * step as f32) / max;
        let mut sumqx = 0f32;
        let mut sumq2 = 0f32;
        for (t, &v) in trial.iter_mut().zip(x) {
            let n = nearest(v * id);
            *t = n as u8;
            let g = IQ4_NL_GRID[n] as f32;
            sumqx += g * v;
            sumq2 += g * g;
        }
        if sumq2 == 0.0 {
            continue;
        }
        // Least-squares scale for this assignment, rounded to what the block can store.
        let d = f16::from_f32(sumqx / sumq2).to_f32();
        let err: f32 = trial
            .iter()
            .zip(x)
            .map(|(&n, &v)| {
                let e = v - d * IQ4_NL_GRID[n as usize] as f32;
                e * e
            })
            .sum();
        if err < best_err {
            best_err = err;
            best_d = d;
            q.copy_from_slice(&trial);
        }
    }
    best_d
}

pub fn quantize_row(row: &[f32], out: &mut [u8]) {
    let mut q = [0u8; QK];
    for (x, b) in row.chunks_exact(QK).zip(out.chunks_exact_mut(2 + QK / 2)) {
        let d = quantize_block(x, &mut q);
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..QK / 2 {
            b[2 + j] = q[j] | (q[j + QK / 2] << 4);
        }
    }
}

pub fn dequantize_row(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(2 + QK / 2).zip(out.chunks_exact_mut(QK)) {
        let d = block_scale(b);
        for j in 0..QK / 2 {
            y[j] = d * IQ4_NL_GRID[(b[2 + j] & 0x0f) as usize] as f32;
            y[j + QK / 2] = d * IQ4_NL_GRID[(b[2 + j] >> 4) as usize] as f32;
        }
    }
}
