//! `Matrix`: one weight matrix in its runtime layout, and the products the model asks of it.

use super::act::QActs;
use super::buf::AlignedBuf;
use super::float::FloatTiles;
use super::k4::K4Tiles;
use super::layout::{Job, Layout};
use super::pack::Tiled;
use super::s2::S2Tiles;
use super::s3::S3Tiles;
use super::s4::S4Tiles;
use super::pack::TILE;
use super::{pool, selected, Isa};
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
    /// The runtime layout of `qtype` (`layout_for`), and the tiles it packed.
    layout: Box<dyn Layout>,
    tiles: AlignedBuf,
}

thread_local! {
    static ACTS: RefCell<QActs> = RefCell::new(QActs::new());
}

impl Matrix {
    /// Take a matrix in the on-disk byte layout (`rows` rows of `qtype.row_bytes(cols)` bytes).
    pub fn from_bytes(qtype: QuantType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Matrix> {
        let layout = layout_for(qtype, rows, cols);
        let tiles = AlignedBuf::zeroed(layout.tiles() * layout.tile_bytes());
        let mut m = Matrix { qtype, rows, cols, layout, tiles };
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
        let layout = &*self.layout;
        let (tiles, tb) = (layout.tiles(), layout.tile_bytes());
        let out = SyncPtr(self.tiles.as_mut_slice().as_mut_ptr());
        let chunks = tiles.min(4 * pool::threads());
        let job = |i: usize| {
            let (a, b) = (tiles * i / chunks, tiles * (i + 1) / chunks);
            // Threads write disjoint whole tiles of the buffer.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(a * tb), (b - a) * tb) };
            layout.pack(rows, cols, bytes, a, dst);
        };
        if bytes.len() < SERIAL_WORK {
            (0..chunks).for_each(job)
        } else {
            pool::run(chunks, &job)
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
        self.tiles.len()
    }

    /// Row `r` as f32 (embedding lookup); `out.len()` must be `cols`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} of a matrix with {} rows", self.rows);
        assert_eq!(out.len(), self.cols, "row_f32 output length");
        self.layout.unpack_row(self.tiles.as_slice(), r, out)
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
        let needs_acts = outs.iter().any(|(m, _)| m.layout.int8_acts());
        ACTS.with(|cell| {
            let mut acts = cell.borrow_mut();
            if needs_acts {
                acts.quantize(xs, n, cols, (cols / QK).div_ceil(2) * 2);
            }
            let jobs: Vec<Job<dyn Layout>> = outs
                .iter_mut()
                .map(|(m, y)| m.job(&acts, xs, n, y.as_mut_ptr()))
                .collect();
            run_jobs(isa, &jobs, n);
        });
    }

    fn job<'a>(&'a self, acts: &'a QActs, xs: &'a [f32], n: usize, y: *mut f32) -> Job<'a, dyn Layout> {
        Job {
            layout: &*self.layout,
            data: self.tiles.as_ptr(),
            rows: self.rows,
            cols: self.cols,
            acts,
            xs,
            n,
            y,
            ystride: self.rows,
        }
    }
}

/// Work units (tiles) of a product and the weight bytes of each.
fn work_units(j: &Job<dyn Layout>) -> (usize, usize) {
    // A matrix without columns still has rows to write (zeros): cost them a byte.
    (j.layout.tiles(), j.layout.tile_bytes().max(1))
}

/// Split the jobs' units into chunks of about equal weight bytes, each a contiguous run, a few
/// per thread so that a busy machine's late threads leave their share to the others.
fn run_jobs(isa: Isa, jobs: &[Job<dyn Layout>], n: usize) {
    let total: usize = jobs.iter().map(|p| work_units(p).0 * work_units(p).1).sum();
    let units: usize = jobs.iter().map(|p| work_units(p).0).sum();
    let chunks = if total.saturating_mul(n) < SERIAL_WORK { 1 } else { units.min(CHUNKS_PER_THREAD * pool::threads()) };
    let job = |c: usize| {
        let (lo, hi) = (total * c / chunks, total * (c + 1) / chunks);
        let mut off = 0;
        for p in jobs {
            let (units, cost) = work_units(p);
            // Unit u starts at byte off + u * cost; this thread takes those starting in [lo, hi).
            let first = lo.saturating_sub(off).div_ceil(cost).min(units);
            let end = hi.saturating_sub(off).div_ceil(cost).min(units);
            if first < end {
                // Safety: `products` checked that the CPU runs `isa` and that `y` is large enough.
                unsafe { p.layout.run(isa, p, first..end) };
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

/// The runtime layout of a `[rows, cols]` matrix of `qtype`: the one place a block type is
/// matched to its layout. (Here rather than in `layout`, which the layouts themselves import.)
fn layout_for(qtype: QuantType, rows: usize, cols: usize) -> Box<dyn Layout> {
    match qtype {
        QuantType::F32 => Box::new(FloatTiles::new(false, rows, cols)),
        QuantType::Bf16 => Box::new(FloatTiles::new(true, rows, cols)),
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Iq4Nl => Box::new(Tiled::new(qtype, rows, cols)),
        QuantType::Q4K => Box::new(K4Tiles::new(rows, cols)),
        QuantType::Q4S => Box::new(S4Tiles::new(rows, cols)),
        QuantType::Q3S => Box::new(S3Tiles::new(rows, cols)),
        QuantType::Q2S => Box::new(S2Tiles::new(rows, cols)),
    }
}
