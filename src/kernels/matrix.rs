//! `Matrix`: one weight matrix in its runtime layout, and the products the model asks of it.

use super::act::QActs;
use super::pack::{self, AlignedBuf, FloatTiles, Tiled, TILE};
use super::k4::{self, K4Job, K4Tiles};
use super::s4::{self, S4Job};
use super::{float_tiles, int_tiles, k4_tiles, pool, s4_tiles, selected, FloatJob, IntJob, Isa};
use crate::error::{Error, Result};
use crate::quant::{QuantType, QK};
use std::cell::RefCell;

/// Below this much work (weight bytes times vectors) a product runs on the calling thread: waking
/// the pool would cost more than it saves.
const SERIAL_WORK: usize = 96 << 10;
/// Chunks of work per thread.
const CHUNKS_PER_THREAD: usize = 4;

pub struct Matrix {
    pub qtype: QuantType,
    pub rows: usize,
    pub cols: usize,
    store: Store,
}

enum Store {
    Float(FloatTiles, AlignedBuf),
    K4(K4Tiles, AlignedBuf),
    /// q4_s: q4_k's super-block geometry, its own contents (`s4`).
    S4(K4Tiles, AlignedBuf),
    Tiled(Tiled, AlignedBuf),
}

thread_local! {
    static ACTS: RefCell<QActs> = RefCell::new(QActs::new());
}

impl Matrix {
    /// Take a matrix in the on-disk byte layout (`rows` rows of `qtype.row_bytes(cols)` bytes).
    pub fn from_bytes(qtype: QuantType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Matrix> {
        let store = match qtype {
            QuantType::F32 | QuantType::Bf16 => {
                let f = FloatTiles::new(qtype == QuantType::Bf16, rows, cols);
                let len = f.tiles * f.tile_bytes();
                Store::Float(f, AlignedBuf::zeroed(len))
            }
            QuantType::Q4K => {
                let k = K4Tiles::new(rows, cols);
                let len = k.tiles * k.tile_bytes();
                Store::K4(k, AlignedBuf::zeroed(len))
            }
            QuantType::Q4S => {
                let k = K4Tiles::new(rows, cols);
                let len = k.tiles * k.tile_bytes();
                Store::S4(k, AlignedBuf::zeroed(len))
            }
            _ => {
                let t = Tiled::new(qtype, rows, cols);
                let len = t.tiles * t.tile_bytes();
                Store::Tiled(t, AlignedBuf::zeroed(len))
            }
        };
        let mut m = Matrix { qtype, rows, cols, store };
        m.reload(bytes)?;
        Ok(m)
    }

    /// Replace the weights with another matrix of the same type and shape (on-disk layout),
    /// reusing this one's memory: cheaper than `from_bytes` for weights streamed in and out.
    pub fn reload(&mut self, bytes: &[u8]) -> Result<()> {
        let (qtype, rows, cols) = (self.qtype, self.rows, self.cols);
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
        match &mut self.store {
            Store::Float(f, buf) => {
                let f = *f;
                let tb = f.tile_bytes();
                let out = SyncPtr(buf.as_mut_slice().as_mut_ptr());
                let chunks = f.tiles.min(4 * pool::threads());
                let job = |i: usize| {
                    let (a, b) = (f.tiles * i / chunks, f.tiles * (i + 1) / chunks);
                    // Threads write disjoint whole tiles of the buffer.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(a * tb), (b - a) * tb) };
                    pack::pack_float_tiles(&f, rows, cols, bytes, a, dst);
                };
                if bytes.len() < SERIAL_WORK {
                    (0..chunks).for_each(job)
                } else {
                    pool::run(chunks, &job)
                }
            }
            Store::K4(k, buf) | Store::S4(k, buf) => {
                let k = *k;
                let pack = if qtype == QuantType::Q4S { s4::pack } else { k4::pack };
                let tb = k.tile_bytes();
                let out = SyncPtr(buf.as_mut_slice().as_mut_ptr());
                let chunks = k.tiles.min(4 * pool::threads());
                let job = |i: usize| {
                    let (a, b) = (k.tiles * i / chunks, k.tiles * (i + 1) / chunks);
                    // Threads write disjoint whole tiles of the buffer.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(a * tb), (b - a) * tb) };
                    pack(&k, rows, bytes, a, dst);
                };
                if bytes.len() < SERIAL_WORK {
                    (0..chunks).for_each(job)
                } else {
                    pool::run(chunks, &job)
                }
            }
            Store::Tiled(t, buf) => {
                let t = *t;
                let tb = t.tile_bytes();
                let out = SyncPtr(buf.as_mut_slice().as_mut_ptr());
                let chunks = t.tiles.min(4 * pool::threads());
                let job = |i: usize| {
                    let (a, b) = (t.tiles * i / chunks, t.tiles * (i + 1) / chunks);
                    // Threads write disjoint whole tiles of the buffer.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(a * tb), (b - a) * tb) };
                    pack::pack_tiles(&t, qtype, rows, cols, bytes, a, dst);
                };
                if bytes.len() < SERIAL_WORK {
                    (0..chunks).for_each(job)
                } else {
                    pool::run(chunks, &job)
                }
            }
        }
        Ok(())
    }

    /// Bytes of weights in the on-disk layout: what one matrix-vector product must read (the
    /// runtime layout adds only padding, for row counts that are not a multiple of 16 and odd
    /// block counts).
    pub fn nbytes(&self) -> usize {
        self.qtype.row_bytes(self.cols).unwrap() * self.rows
    }

    /// Bytes of memory the runtime layout holds (padding included; q4_k and q4_s keep their
    /// sub-block scales as bytes, 4.625 bits per weight against 4.5 on disk).
    pub fn resident_bytes(&self) -> usize {
        match &self.store {
            Store::Float(_, b) | Store::Tiled(_, b) | Store::K4(_, b) | Store::S4(_, b) => b.len(),
        }
    }

    /// Row `r` as f32 (embedding lookup); `out.len()` must be `cols`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} of a matrix with {} rows", self.rows);
        assert_eq!(out.len(), self.cols, "row_f32 output length");
        match &self.store {
            Store::Float(f, buf) => pack::unpack_float_row(f, buf.as_slice(), r, out),
            Store::K4(k, buf) => k4::unpack_row(k, buf.as_slice(), r, out),
            Store::S4(k, buf) => s4::unpack_row(k, buf.as_slice(), r, out),
            Store::Tiled(t, buf) => pack::unpack_row(t, buf.as_slice(), r, self.cols, out),
        }
    }

    /// y = W x
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        self.matmul_on(selected(), x, 1, y)
    }

    /// ys[t] = W xs[t] for t in 0..n; xs is `[n, cols]`, ys is `[n, rows]`, both row-major.
    pub fn matmul(&self, xs: &[f32], n: usize, ys: &mut [f32]) {
        self.matmul_on(selected(), xs, n, ys)
    }

    /// `matmul` on a given path, for tests and benchmarks.
    ///
    /// # Panics
    /// If the CPU cannot run `isa`, or the lengths do not match the shape.
    pub fn matmul_on(&self, isa: Isa, xs: &[f32], n: usize, ys: &mut [f32]) {
        Matrix::products(isa, &mut [(self, ys)], xs, n)
    }

    /// `ya = A x` and `yb = B x` in one pass over the pool, quantizing `x` once: for pairs of
    /// matrices that share an input, like an expert's gate and up projections.
    pub fn matvec_pair(a: &Matrix, b: &Matrix, x: &[f32], ya: &mut [f32], yb: &mut [f32]) {
        Matrix::products(selected(), &mut [(a, ya), (b, yb)], x, 1)
    }

    /// Products of several matrices with the same `cols` and the same `n` inputs `xs`.
    fn products(isa: Isa, outs: &mut [(&Matrix, &mut [f32])], xs: &[f32], n: usize) {
        assert!(isa.is_available(), "kernel path {} is not supported by this CPU", isa.name());
        let cols = outs[0].0.cols;
        assert_eq!(xs.len(), n * cols, "input length for {n} vectors of {cols}");
        for (m, y) in outs.iter() {
            assert_eq!(m.cols, cols, "matrices multiplied by one input must have equal columns");
            assert_eq!(y.len(), n * m.rows, "output length for {n} vectors of {}", m.rows);
        }
        if n == 0 {
            return;
        }
        let needs_acts = outs.iter().any(|(m, _)| matches!(m.store, Store::Tiled(..) | Store::K4(..) | Store::S4(..)));
        ACTS.with(|cell| {
            let mut acts = cell.borrow_mut();
            if needs_acts {
                acts.quantize(xs, n, cols, (cols / QK).div_ceil(2) * 2);
            }
            let parts: Vec<Part> = outs
                .iter_mut()
                .map(|(m, y)| m.part(&acts, xs, n, y.as_mut_ptr()))
                .collect();
            run_parts(isa, &parts, n);
        });
    }

    fn part<'a>(&'a self, acts: &'a QActs, xs: &'a [f32], n: usize, y: *mut f32) -> Part<'a> {
        match &self.store {
            Store::Tiled(t, buf) => Part::Int(IntJob {
                t,
                data: buf.as_ptr(),
                rows: self.rows,
                acts,
                y,
                ystride: self.rows,
            }),
            Store::Float(f, buf) => Part::Float(FloatJob {
                f,
                data: buf.as_ptr(),
                rows: self.rows,
                cols: self.cols,
                xs,
                n,
                y,
                ystride: self.rows,
            }),
            Store::K4(k, buf) => Part::K4(K4Job {
                k,
                data: buf.as_ptr(),
                rows: self.rows,
                acts,
                y,
                ystride: self.rows,
            }),
            Store::S4(k, buf) => Part::S4(S4Job {
                k,
                data: buf.as_ptr(),
                rows: self.rows,
                acts,
                y,
                ystride: self.rows,
            }),
        }
    }
}

enum Part<'a> {
    Int(IntJob<'a>),
    Float(FloatJob<'a>),
    K4(K4Job<'a>),
    S4(S4Job<'a>),
}

impl Part<'_> {
    /// Work units (tiles) and the weight bytes of each.
    fn units(&self) -> (usize, usize) {
        match self {
            // A matrix without columns still has rows to write (zeros): cost them a byte.
            Part::Int(j) => (j.t.tiles, j.t.tile_bytes().max(1)),
            Part::Float(j) => (j.f.tiles, j.f.tile_bytes().max(1)),
            Part::K4(j) => (j.k.tiles, j.k.tile_bytes().max(1)),
            Part::S4(j) => (j.k.tiles, j.k.tile_bytes().max(1)),
        }
    }

    unsafe fn run(&self, isa: Isa, units: std::ops::Range<usize>) {
        match self {
            Part::Int(j) => int_tiles(isa, j, units),
            Part::Float(j) => float_tiles(isa, j, units),
            Part::K4(j) => k4_tiles(isa, j, units),
            Part::S4(j) => s4_tiles(isa, j, units),
        }
    }
}

/// Split the parts' units into chunks of about equal weight bytes, each a contiguous run, a few
/// per thread so that a busy machine's late threads leave their share to the others.
fn run_parts(isa: Isa, parts: &[Part], n: usize) {
    let total: usize = parts.iter().map(|p| p.units().0 * p.units().1).sum();
    let units: usize = parts.iter().map(|p| p.units().0).sum();
    let chunks = if total.saturating_mul(n) < SERIAL_WORK { 1 } else { units.min(CHUNKS_PER_THREAD * pool::threads()) };
    let job = |c: usize| {
        let (lo, hi) = (total * c / chunks, total * (c + 1) / chunks);
        let mut off = 0;
        for p in parts {
            let (units, cost) = p.units();
            // Unit u starts at byte off + u * cost; this thread takes those starting in [lo, hi).
            let first = lo.saturating_sub(off).div_ceil(cost).min(units);
            let end = hi.saturating_sub(off).div_ceil(cost).min(units);
            if first < end {
                // Safety: `products` checked that the CPU runs `isa` and that `y` is large enough.
                unsafe { p.run(isa, first..end) };
            }
            off += units * cost;
        }
    };
    pool::run(chunks, &job)
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut u8);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut u8 {
        self.0
    }
}

const _: () = assert!(TILE == 16);
