//! Activations quantized for the integer kernels: per block of 32, an f32 scale `d = amax / 127`
//! and int8 values `round_half_even(x * 127 / amax)`. An f32 scale (ggml's q8 activations carry
//! f16) keeps the only error of the integer paths the int8 rounding itself.
//!
//! Every ISA uses this one quantizer, so all paths see the same integers and differ only in the
//! order of float additions.

use super::buf::AlignedBuf;
use crate::quant::QK;

/// `n` quantized activation vectors, each padded to `nbp` blocks with zeros.
pub(crate) struct QActs {
    pub n: usize,
    pub nbp: usize,
    xq: AlignedBuf,
    d: Vec<f32>,
    /// `-128 * sum(q)` per block: what the `q + 128` bias of tiled q8 weights adds, negated.
    c: Vec<i32>,
    /// The exact (f32) sum of each block of `x`, for the offset term of q4_k.
    s: Vec<f32>,
    /// `c` split into the block's two halves of 16 (`[lo, hi]` per block), for q4_s, whose
    /// halves have scales of their own.
    h: Vec<i32>,
    /// `c` split into quarters of 8 (four per block), for q2_s's 8-weight sub-blocks.
    e: Vec<i32>,
}

impl QActs {
    pub(crate) fn new() -> QActs {
        QActs { n: 0, nbp: 0, xq: AlignedBuf::zeroed(0), d: Vec::new(), c: Vec::new(), s: Vec::new(), h: Vec::new(), e: Vec::new() }
    }

    /// Quantize `xs` (`[n, cols]`) into `nbp` (>= cols / 32) blocks per vector.
    pub(crate) fn quantize(&mut self, xs: &[f32], n: usize, cols: usize, nbp: usize) {
        debug_assert_eq!(xs.len(), n * cols);
        debug_assert!(cols.is_multiple_of(QK) && nbp * QK >= cols);
        let need = n * nbp * QK;
        if self.xq.len() < need {
            self.xq = AlignedBuf::zeroed(need.next_power_of_two());
        }
        self.n = n;
        self.nbp = nbp;
        self.d.clear();
        self.d.resize(n * nbp, 0.0);
        self.c.clear();
        self.c.resize(n * nbp, 0);
        self.s.clear();
        self.s.resize(n * nbp, 0.0);
        self.h.clear();
        self.h.resize(2 * n * nbp, 0);
        self.e.clear();
        self.e.resize(4 * n * nbp, 0);
        let nb = cols / QK;
        let xq = &mut self.xq.as_mut_slice()[..need];
        for t in 0..n {
            let x = &xs[t * cols..(t + 1) * cols];
            let q = &mut xq[t * nbp * QK..(t + 1) * nbp * QK];
            let blocks = t * nbp..t * nbp + nb;
            quantize_row(
                x,
                &mut q[..nb * QK],
                &mut self.d[blocks.clone()],
                &mut self.c[blocks.clone()],
                &mut self.s[blocks.clone()],
                &mut self.h[2 * blocks.start..2 * blocks.end],
                &mut self.e[4 * blocks.start..4 * blocks.end],
            );
            q[nb * QK..].fill(0);
        }
    }

    /// The 32 int8 values of block `b` of vector `t`.
    #[inline(always)]
    pub(crate) fn q_ptr(&self, t: usize, b: usize) -> *const i8 {
        debug_assert!(t < self.n && b < self.nbp);
        unsafe { self.xq.as_ptr().add((t * self.nbp + b) * QK) as *const i8 }
    }

    #[inline(always)]
    pub(crate) fn q(&self, t: usize, b: usize) -> &[i8] {
        unsafe { std::slice::from_raw_parts(self.q_ptr(t, b), QK) }
    }

    /// Block scales of vector `t`.
    #[inline(always)]
    pub(crate) fn d_ptr(&self, t: usize) -> *const f32 {
        self.d[t * self.nbp..].as_ptr()
    }

    /// Bias corrections of vector `t`.
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn c_ptr(&self, t: usize) -> *const i32 {
        self.c[t * self.nbp..].as_ptr()
    }

    /// Exact block sums of vector `t`.
    #[inline(always)]
    pub(crate) fn s_ptr(&self, t: usize) -> *const f32 {
        self.s[t * self.nbp..].as_ptr()
    }

    /// Half-block bias corrections of vector `t`: `[lo, hi]` per block.
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn h_ptr(&self, t: usize) -> *const i32 {
        self.h[2 * t * self.nbp..].as_ptr()
    }

    /// Quarter-block bias corrections of vector `t`: four per block.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    pub(crate) fn e_ptr(&self, t: usize) -> *const i32 {
        self.e[4 * t * self.nbp..].as_ptr()
    }

    #[inline(always)]
    pub(crate) fn sum(&self, t: usize, b: usize) -> f32 {
        self.s[t * self.nbp + b]
    }

    #[inline(always)]
    pub(crate) fn d(&self, t: usize, b: usize) -> f32 {
        self.d[t * self.nbp + b]
    }
}

type Row<'a> = (&'a [f32], &'a mut [u8], &'a mut [f32], &'a mut [i32], &'a mut [f32], &'a mut [i32], &'a mut [i32]);

fn quantize_row(x: &[f32], q: &mut [u8], d: &mut [f32], c: &mut [i32], s: &mut [f32], h: &mut [i32], e: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // The same source compiled for wider vectors: identical results, several times faster.
        return unsafe { quantize_row_avx2((x, q, d, c, s, h, e)) };
    }
    quantize_row_generic((x, q, d, c, s, h, e))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(row: Row) {
    quantize_row_generic(row)
}

#[inline(always)]
fn quantize_row_generic((x, q, d, c, s, h, e): Row) {
    let blocks = x.chunks_exact(QK).zip(q.chunks_exact_mut(QK));
    let halves = h.chunks_exact_mut(2).zip(e.chunks_exact_mut(4));
    for (((((x, q), d), c), s), (h, e)) in blocks.zip(d).zip(c).zip(s).zip(halves) {
        let x: &[f32; QK] = x.try_into().unwrap();
        let q: &mut [u8; QK] = q.try_into().unwrap();
        let (scale, quarters) = quantize_block(x, q);
        *d = scale;
        *c = -128 * quarters.iter().sum::<i32>();
        h[0] = -128 * (quarters[0] + quarters[1]);
        h[1] = -128 * (quarters[2] + quarters[3]);
        for (e, q) in e.iter_mut().zip(quarters) {
            *e = -128 * q;
        }
        // In order, so every path sees the same value.
        *s = x.iter().fold(0f32, |a, v| a + v);
    }
}

/// Returns the block's scale and the sums of its int8 values over its four quarters of 8.
#[inline(always)]
pub(crate) fn quantize_block(x: &[f32; QK], q: &mut [u8; QK]) -> (f32, [i32; 4]) {
    let mut amax = 0f32;
    for v in x {
        amax = amax.max(v.abs());
    }
    if amax == 0.0 {
        q.fill(0);
        return (0.0, [0; 4]);
    }
    let id = 127.0 / amax;
    // Adding and removing 1.5 * 2^23 rounds to the nearest integer, ties to even, for |v| < 2^22:
    // exact, branch-free, and vectorizes, unlike a call to roundeven.
    const MAGIC: f32 = 12_582_912.0;
    let mut sums = [0i32; 4];
    for (h, sum) in sums.iter_mut().enumerate() {
        for (o, v) in q[h * QK / 4..(h + 1) * QK / 4].iter_mut().zip(&x[h * QK / 4..]) {
            let r = ((v * id) + MAGIC) - MAGIC;
            let i = r as i32;
            *sum += i;
            *o = i as i8 as u8;
        }
    }
    (amax / 127.0, sums)
}
