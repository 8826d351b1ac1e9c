//! Matrix kernels over the quantized block types. `Matrix` owns one weight matrix `[rows, cols]`
//! (rows = output channels, blocks along `cols`) and multiplies it by activations.
//!
//! This first version is the scalar reference: dequantize a row, dot it in f32.

use crate::error::{Error, Result};
use crate::quant::QuantType;
use rayon::prelude::*;

pub struct Matrix {
    pub qtype: QuantType,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u8>,
}

impl Matrix {
    /// Take a matrix in the on-disk byte layout (`rows` rows of `qtype.row_bytes(cols)` bytes).
    pub fn from_bytes(qtype: QuantType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Matrix> {
        let rb = qtype.row_bytes(cols).ok_or_else(|| {
            Error::Invalid(format!("{cols} columns is not a whole number of {qtype} blocks"))
        })?;
        if bytes.len() != rb * rows {
            return Err(Error::Invalid(format!(
                "{qtype} matrix [{rows}, {cols}] needs {} bytes, got {}",
                rb * rows,
                bytes.len()
            )));
        }
        Ok(Matrix { qtype, rows, cols, data: bytes.to_vec() })
    }

    /// Bytes of weights read by one full matrix-vector product.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.qtype.row_bytes(self.cols).unwrap()
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        self.qtype.dequantize_row(&self.data[r * rb..(r + 1) * rb], out);
    }

    /// y = W x
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        self.matmul(x, 1, y)
    }

    /// ys[t] = W xs[t] for t in 0..n; xs is `[n, cols]`, ys is `[n, rows]`, both row-major.
    pub fn matmul(&self, xs: &[f32], n: usize, ys: &mut [f32]) {
        assert_eq!(xs.len(), n * self.cols);
        assert_eq!(ys.len(), n * self.rows);
        let rb = self.row_bytes();
        let cols = self.cols;
        let rows = self.rows;
        // Each task dequantizes a band of rows once and applies it to all n inputs.
        let band = 16usize;
        let results: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(band))
            .into_par_iter()
            .map(|bi| {
                let r0 = bi * band;
                let r1 = (r0 + band).min(rows);
                let mut w = vec![0f32; cols];
                let mut out = vec![0f32; (r1 - r0) * n];
                for r in r0..r1 {
                    self.qtype.dequantize_row(&self.data[r * rb..(r + 1) * rb], &mut w);
                    for t in 0..n {
                        let x = &xs[t * cols..(t + 1) * cols];
                        out[(r - r0) * n + t] = w.iter().zip(x).map(|(a, b)| a * b).sum();
                    }
                }
                (r0, out)
            })
            .collect();
        for (r0, out) in results {
            let nr = out.len() / n;
            for i in 0..nr {
                for t in 0..n {
                    ys[t * rows + r0 + i] = out[i * n + t];
                }
            }
        }
    }
}

static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
}

pub fn threads() -> usize {
    match THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => rayon::current_num_threads(),
        n => n,
    }
}

pub fn describe() -> String {
    "scalar".into()
}

pub fn measure_read_bandwidth(_threads: usize) -> f64 {
    let buf = vec![1u64; 64 << 20];
    let t = std::time::Instant::now();
    let s: u64 = buf.iter().sum();
    std::hint::black_box(s);
    (buf.len() * 8) as f64 / t.elapsed().as_secs_f64()
}
