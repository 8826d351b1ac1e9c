//! The element-wise pieces of the forward pass, all in f32, and the two helpers every step of
//! it uses: growing a scratch buffer and projecting rows through a matrix.

use crate::kernels::Matrix;

/// `out = scale * x / sqrt(mean(x^2) + eps)` (Grok's RMSNorm multiplies by `scale`, not
/// `1 + scale`). The mean is accumulated in f64 so that long rows lose nothing to summation order.
pub fn rms_norm(x: &[f32], scale: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), scale.len());
    debug_assert_eq!(x.len(), out.len());
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let inv = 1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &s) in out.iter_mut().zip(x).zip(scale) {
        *o = s * (v * inv);
    }
}

/// Apply `rms_norm` to each row of `[n, d]` and add the result to `acc` (the residual stream).
pub fn add_rms_norm_rows(acc: &mut [f32], x: &[f32], scale: &[f32], eps: f32, tmp: &mut [f32]) {
    let d = scale.len();
    for (a, r) in acc.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        rms_norm(r, scale, eps, tmp);
        for (a, t) in a.iter_mut().zip(tmp.iter()) {
            *a += t;
        }
    }
}

/// `rms_norm` on each row of `[n, d]`.
pub fn rms_norm_rows(x: &[f32], scale: &[f32], eps: f32, out: &mut [f32]) {
    let d = scale.len();
    for (o, r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        rms_norm(r, scale, eps, o);
    }
}

/// The tanh form of GELU, `jax.nn.gelu`'s default and the one Grok-1 was trained with.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Rotary phases of one position: `cos` and `sin` of `pos * theta^(-2i/head_dim)` for
/// `i < head_dim / 2`. Computed in f64 and rounded once, so that long positions keep their
/// accuracy (an f32 `pos * freq` is off by ~pos * 6e-8 radians).
pub fn rope_phases(pos: usize, head_dim: usize, theta: f64, cos: &mut [f32], sin: &mut [f32]) {
    let half = head_dim / 2;
    for i in 0..half {
        let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
        let (s, c) = (pos as f64 * inv_freq).sin_cos();
        cos[i] = c as f32;
        sin[i] = s as f32;
    }
}

/// Rotate-half ("NeoX") RoPE over whole heads: lane `i` pairs with lane `i + head_dim/2`, and
/// `x' = x * cos + rotate_half(x) * sin` with `rotate_half(x) = [-x_hi, x_lo]`. `x` holds any
/// number of heads back to back; `cos`/`sin` come from `rope_phases`.
pub fn rope_in_place(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums break the dependency chain, so the compiler can vectorise.
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a * x`
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `buf[..n]`, growing `buf` if needed (never shrinking, so steady-state calls allocate nothing).
pub(crate) fn grow(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// `y = W x` for one row, `ys = W xs` for several.
pub(crate) fn project(m: &Matrix, xs: &[f32], n: usize, ys: &mut [f32]) {
    if n == 1 {
        m.matvec(xs, ys)
    } else {
        m.matmul(xs, n, ys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_the_formula() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let s = [0.5f32, 1.0, -1.0, 2.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &s, 1e-5, &mut out);
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 4.0;
        for i in 0..4 {
            let want = s[i] as f64 * x[i] as f64 / (ms + 1e-5).sqrt();
            assert!((out[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", out[i]);
        }
    }

    #[test]
    fn gelu_tanh_values() {
        // Reference values of 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))) computed in f64.
        for x in [-3.0f64, -1.0, -0.1, 0.0, 0.5, 1.0, 2.5] {
            let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!((gelu_tanh(x as f32) as f64 - want).abs() < 1e-6, "x={x}");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_survives_huge_negatives() {
        let mut x = [1.0f32, 2.0, -1e30, 3.0];
        softmax(&mut x);
        assert_eq!(x[2], 0.0);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[3] > x[1] && x[1] > x[0]);
    }

    #[test]
    fn dot_matches_naive_for_all_tails() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n={n}");
        }
    }
}
