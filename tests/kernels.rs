//! Kernels against their references.
//!
//! * Every SIMD path against the scalar path on random shapes, odd ones included. The integer
//!   paths share one activation quantizer, so their per-block integer sums are exact and equal;
//!   only the float accumulation over blocks may differ in order. Two sums of the same `m` terms
//!   in any order each lie within `gamma(m) * S` of the exact sum (S = sum of |terms|,
//!   gamma(m) = m u / (1 - m u), u = 2^-24), so they differ by at most `2 gamma(m) S`.
//! * The integer paths against the exact (f64) product of the dequantized weights: the only
//!   error beyond float rounding is the int8 rounding of activations, at most half a step
//!   `d = amax / 127` per element, so `|err| <= sum_i |w_i| d_b(i) / 2` plus rounding.
//! * The float paths against f64: `gamma(cols) * sum |w x|`.

use grok1::kernels::{self, Isa, Matrix};
use grok1::quant::{q2_s, q3_s, q4_k, q4_s, QuantType};
use proptest::prelude::*;

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(m: usize) -> f64 {
    let mu = m as f64 * U;
    mu / (1.0 - mu)
}

/// splitmix64: reproducible data from one proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Roughly normal, with an occasional outlier ten times larger, as in real activations.
    fn value(&mut self) -> f32 {
        let s: f64 = (0..4).map(|_| self.uniform()).sum::<f64>() - 2.0;
        let big = if self.next().is_multiple_of(97) { 10.0 } else { 1.0 };
        (s * big) as f32
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
    /// Without outliers.
    fn plain_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| ((0..4).map(|_| self.uniform()).sum::<f64>() - 2.0) as f32).collect()
    }
}

struct Case {
    qtype: QuantType,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
    /// Dequantized weights, row-major.
    w: Vec<f32>,
    /// Each weight's `scale * q` part, which meets the int8 activations, and its offset
    /// (`w = scaled - offset`; q4_k's kernels use `d*sc*(q - 8)` and `dmin*m - 8*d*sc`; zero
    /// offsets for the other types, q4_s included: its `d * s * GRID[n]` is the weight itself).
    scaled: Vec<f32>,
    offset: Vec<f32>,
    m: Matrix,
}

/// q4_k weights split into `d*sc*(q - 8)` and `dmin*m - 8*d*sc`, from the raw blocks.
fn k4_parts(bytes: &[u8], cols: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut scaled, mut offset) = (Vec::new(), Vec::new());
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    for blk in bytes.chunks_exact(q4_k::BLOCK_BYTES) {
        let (d, dmin) = (f16(&blk[0..2]), f16(&blk[2..4]));
        for j in 0..8 {
            let (sc, m) = q4_k::scale_min(j, &blk[4..16]);
            for l in 0..32 {
                let q = (blk[16 + 32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f;
                let dsc = d * sc as f32;
                scaled.push(dsc * (q as f32 - 8.0));
                offset.push(dmin * m as f32 - 8.0 * dsc);
            }
        }
    }
    assert_eq!(scaled.len() % cols.max(1), 0);
    (scaled, offset)
}

fn case(qtype: QuantType, rows: usize, cols: usize, rng: &mut Rng) -> Case {
    let rb = qtype.row_bytes(cols).unwrap();
    let mut bytes = vec![0u8; rows * rb];
    let mut w = vec![0f32; rows * cols];
    for r in 0..rows {
        // Vary the row's magnitude so that scales differ between rows of a tile.
        let scale = 0.01 * (1 + r % 7) as f32;
        let row: Vec<f32> = rng.vec(cols).iter().map(|v| v * scale).collect();
        qtype.quantize_row(&row, &mut bytes[r * rb..(r + 1) * rb]);
        qtype.dequantize_row(&bytes[r * rb..(r + 1) * rb], &mut w[r * cols..(r + 1) * cols]);
    }
    let m = Matrix::from_bytes(qtype, rows, cols, &bytes).unwrap();
    let (scaled, offset) = if qtype == QuantType::Q4K {
        k4_parts(&bytes, cols)
    } else {
        (w.clone(), vec![0.0; w.len()])
    };
    Case { qtype, rows, cols, bytes, w, scaled, offset, m }
}

fn is_int(q: QuantType) -> bool {
    matches!(
        q,
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Iq4Nl | QuantType::Q4K | QuantType::Q4S | QuantType::Q3S | QuantType::Q2S
    )
}

/// The types with 256-weight super-blocks.
fn is_super(q: QuantType) -> bool {
    matches!(q, QuantType::Q4K | QuantType::Q4S | QuantType::Q3S | QuantType::Q2S)
}

/// The activation quantizer's step `amax / 127` for each block of `x`.
fn steps(x: &[f32]) -> Vec<f64> {
    x.chunks(32).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0).collect()
}

/// Per output (token-major like `ys`): (bound on |simd - scalar|, bound on |y - exact|, exact).
fn bounds(c: &Case, xs: &[f32], n: usize) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::with_capacity(n * c.rows);
    for t in 0..n {
        let x = &xs[t * c.cols..(t + 1) * c.cols];
        let st = steps(x);
        for r in 0..c.rows {
            let w = &c.w[r * c.cols..(r + 1) * c.cols];
            let exact: f64 = w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
            if is_int(c.qtype) {
                let nb = c.cols / 32;
                let scaled = &c.scaled[r * c.cols..(r + 1) * c.cols];
                let offset = &c.offset[r * c.cols..(r + 1) * c.cols];
                // |scale * q| * amax of x's block bounds each term of the integer block sums,
                // |offset| * |x| the offset terms (two float steps per block for q4_k).
                let s: f64 = (0..c.cols)
                    .map(|i| scaled[i].abs() as f64 * st[i / 32] * 127.0 + (offset[i] as f64 * x[i] as f64).abs())
                    .sum();
                let half_steps: f64 = (0..c.cols).map(|i| scaled[i].abs() as f64 * st[i / 32] * 0.5).sum();
                // The f32 block sums of x that offsets multiply are the same on every path.
                let xsums: f64 = (0..c.cols).map(|i| (offset[i] as f64 * x[i] as f64).abs()).sum::<f64>() * gamma(32);
                let order = 2.0 * gamma(2 * nb + 4) * s + 1e-30;
                out.push((order, half_steps * (1.0 + 1e-5) + order + xsums, exact));
            } else {
                let s: f64 = w.iter().zip(x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                let order = 2.0 * gamma(c.cols + 2) * s + 1e-30;
                out.push((order, order, exact));
            }
        }
    }
    out
}

/// The paths this CPU can run, each checked against the scalar reference. The others cannot be
/// tested here: they are named on stderr (once per test binary, written to the stream itself so
/// that the test harness's capture of `eprintln!` does not hide it), not skipped in silence; the
/// NEON ones run under qemu (`.ci/neon.sh`).
fn paths() -> Vec<Isa> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let missing: Vec<&str> = Isa::ALL.into_iter().filter(|i| !i.is_available()).map(|i| i.name()).collect();
        if !missing.is_empty() {
            use std::io::Write;
            let line = format!("kernels: not tested on this CPU (it cannot run them): {}\n", missing.join(", "));
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    });
    Isa::available()
}

fn check_case(c: &Case, n: usize, rng: &mut Rng) -> Result<(), TestCaseError> {
    let xs = rng.vec(n * c.cols);
    check_case_with(c, n, &xs)
}

fn check_case_with(c: &Case, n: usize, xs: &[f32]) -> Result<(), TestCaseError> {
    let mut reference = vec![0f32; n * c.rows];
    c.m.matmul_on(Isa::Scalar, xs, n, &mut reference);
    let b = bounds(c, xs, n);
    for (i, (&y, &(_, tol, exact))) in reference.iter().zip(&b).enumerate() {
        prop_assert!(
            (y as f64 - exact).abs() <= tol,
            "{} [{}x{}] n={n}: scalar output {i} = {y}, exact {exact}, bound {tol}",
            c.qtype, c.rows, c.cols
        );
    }
    for isa in paths() {
        let mut ys = vec![f32::NAN; n * c.rows];
        c.m.matmul_on(isa, xs, n, &mut ys);
        for (i, ((&y, &r), &(tol, _, _))) in ys.iter().zip(&reference).zip(&b).enumerate() {
            prop_assert!(
                (y as f64 - r as f64).abs() <= tol,
                "{} [{}x{}] n={n} on {}: output {i} = {y}, scalar {r}, bound {tol}",
                c.qtype, c.rows, c.cols, isa.name()
            );
        }
        if isa == kernels::selected() {
            // The public entry points take the selected path.
            let mut y1 = vec![f32::NAN; n * c.rows];
            if n == 1 {
                c.m.matvec(xs, &mut y1);
            } else {
                c.m.matmul(xs, n, &mut y1);
            }
            prop_assert_eq!(&y1, &ys);
        }
    }
    Ok(())
}

fn qtype_strategy() -> impl Strategy<Value = QuantType> {
    prop::sample::select(QuantType::ALL.to_vec())
}

/// A width for `qtype` from the strategies' numbers: any for floats, whole blocks otherwise (one
/// to three super-blocks for q4_k and q4_s).
fn width(qtype: QuantType, blocks: usize, extra: usize) -> usize {
    match qtype {
        q if is_super(q) => 256 * (1 + blocks % 3),
        q if is_int(q) => blocks * 32,
        _ => blocks * 32 - extra,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn simd_paths_match_scalar_and_exact(
        qtype in qtype_strategy(),
        rows in 1usize..=53,
        blocks in 1usize..=9,
        extra in 0usize..32,
        n in 1usize..=9,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let cols = width(qtype, blocks, extra);
        let c = case(qtype, rows, cols, &mut rng);
        check_case(&c, n, &mut rng)?;
    }

    #[test]
    fn row_f32_is_dequantize_row(
        qtype in qtype_strategy(),
        rows in 1usize..=40,
        blocks in 1usize..=5,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let c = case(qtype, rows, width(qtype, blocks, 0), &mut rng);
        let mut out = vec![0f32; c.cols];
        for r in 0..rows {
            c.m.row_f32(r, &mut out);
            let want = &c.w[r * c.cols..(r + 1) * c.cols];
            prop_assert!(out.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "row {}", r);
        }
    }

    /// More cases for the super-block types, whose kernels have the most steps (sub-scales per
    /// half block for q4_s, per quarter for q2_s, grid bits for q3_s, offsets for q4_k): odd row counts across tile boundaries, one to
    /// four super-blocks, one to nine tokens.
    #[test]
    fn super_block_paths_match_scalar_and_exact(
        qtype in prop::sample::select(vec![QuantType::Q4K, QuantType::Q4S, QuantType::Q3S, QuantType::Q2S]),
        rows in 1usize..=53,
        sbs in 1usize..=4,
        n in 1usize..=9,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let c = case(qtype, rows, 256 * sbs, &mut rng);
        check_case(&c, n, &mut rng)?;
    }

    /// q4_s blocks of any bytes (random d, sub-scales across the whole -64..=63, nibbles), with
    /// activations from random down to all at one magnitude, which makes every int8 activation
    /// +-127: the largest integer sums a kernel can meet (|s * sum| up to 64 * 127 * 127 * 16).
    /// q3_s and q2_s blocks of any bytes (d across three decades), activations random or flat.
    #[test]
    fn lowbit_any_bytes_match_scalar_and_exact(
        qtype in prop::sample::select(vec![QuantType::Q3S, QuantType::Q2S]),
        rows in 1usize..=40,
        sbs in 1usize..=3,
        n in 1usize..=5,
        flat in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let c = lowbit_raw_case(qtype, rows, 256 * sbs, &mut rng, None, |rng| (1e-4 * 10f64.powf(3.0 * rng.uniform())) as f32);
        let xs: Vec<f32> = if flat {
            (0..n * c.cols).map(|_| if rng.next().is_multiple_of(2) { 1.5 } else { -1.5 }).collect()
        } else {
            rng.vec(n * c.cols)
        };
        check_case_with(&c, n, &xs)?;
    }

    #[test]
    fn q4_s_any_bytes_match_scalar_and_exact(
        rows in 1usize..=40,
        sbs in 1usize..=3,
        n in 1usize..=5,
        flat in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let c = q4_s_raw_case(rows, 256 * sbs, &mut rng, |rng| {
            let d = half::f16::from_f32((1e-4 * 10f64.powf(3.0 * rng.uniform())) as f32);
            let s = (rng.next() % 128) as i8 - 64;
            (d, s, (rng.next() % 16) as u8)
        });
        let xs: Vec<f32> = if flat {
            (0..n * c.cols).map(|_| if rng.next().is_multiple_of(2) { 1.5 } else { -1.5 }).collect()
        } else {
            rng.vec(n * c.cols)
        };
        check_case_with(&c, n, &xs)?;
    }
}

/// A q3_s or q2_s case from random bytes: every index, grid bit and sub-scale anywhere in its
/// range (-16..=15 for q3_s, -8..=7 for q2_s), `d` from `d_of` (the block's f16 `d`, in units of
/// 2^-11 or 2^-10). `extreme` replaces the random bytes by one of four fixed patterns: every
/// sub-scale at its most negative or most positive value, every index at the grid's long end
/// (index 0) or alternating between the two ends.
fn lowbit_raw_case(qtype: QuantType, rows: usize, cols: usize, rng: &mut Rng, extreme: Option<u8>, d_of: impl Fn(&mut Rng) -> f32) -> Case {
    let rb = qtype.row_bytes(cols).unwrap();
    let bb = qtype.block_bytes();
    let mut bytes: Vec<u8> = (0..rows * rb).map(|_| rng.next() as u8).collect();
    for blk in bytes.chunks_exact_mut(bb) {
        blk[0..2].copy_from_slice(&half::f16::from_f32(d_of(rng)).to_le_bytes());
        if let Some(e) = extreme {
            let (negative, ends) = (e & 1 == 0, e & 2 != 0);
            // Scales: u = s - S_MIN, all bits 0 (most negative) or all 1 (most positive); then
            // indices: 0 (grid's -127) or alternating 0 and the top level.
            let fill = if negative { 0x00 } else { 0xff };
            let (scales, idx) = if qtype == QuantType::Q3S { (2..7, 9..bb) } else { (2..18, 18..bb) };
            blk[scales].fill(fill);
            if qtype == QuantType::Q3S {
                blk[7..9].fill(0); // grid 0: -127 and 100
            }
            for (k, b) in blk[idx].iter_mut().enumerate() {
                *b = if ends && k % 2 == 1 { 0xff } else { 0x00 };
            }
        }
    }
    let mut w = vec![0f32; rows * cols];
    for (r, out) in w.chunks_exact_mut(cols).enumerate() {
        qtype.dequantize_row(&bytes[r * rb..(r + 1) * rb], out);
    }
    let m = Matrix::from_bytes(qtype, rows, cols, &bytes).unwrap();
    Case { qtype, rows, cols, bytes, scaled: w.clone(), offset: vec![0.0; w.len()], w, m }
}

/// The extremes of q3_s's and q2_s's integer sums on every path (see `lowbit_raw_case`), with
/// activations all 1 (every int8 127) or alternating +-1: |s * sum| reaches 16 * 127 * 127 * 32.
#[test]
fn lowbit_extreme_blocks_match_scalar() {
    let mut rng = Rng(23);
    for qtype in [QuantType::Q3S, QuantType::Q2S] {
        for e in 0..4u8 {
            let c = lowbit_raw_case(qtype, 21, 512, &mut rng, Some(e), |_| 0.5);
            for xs in [vec![1f32; 2 * 512], (0..2 * 512).map(|k| if k % 2 == 0 { 1.0 } else { -1.0 }).collect()] {
                check_case_with(&c, 2, &xs).unwrap();
            }
        }
    }
}

/// `Matrix::row_f32` (the tile decoder) is the reference decoder bit for bit on random bytes,
/// and the tile layout keeps every field: each weight's grid bit, index and sub-scale.
#[test]
fn lowbit_unpack_row_is_dequantize_row_on_any_bytes() {
    let mut rng = Rng(29);
    for qtype in [QuantType::Q3S, QuantType::Q2S] {
        for rows in [1, 16, 19, 37] {
            let c = lowbit_raw_case(qtype, rows, 768, &mut rng, None, |rng| (1e-3 * (1.0 + rng.uniform())) as f32);
            let mut out = vec![0f32; c.cols];
            for r in 0..rows {
                c.m.row_f32(r, &mut out);
                let want = &c.w[r * c.cols..(r + 1) * c.cols];
                assert!(out.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{qtype} row {r}");
            }
        }
    }
    // The constants the tile layouts read on-disk blocks with.
    assert_eq!((q3_s::BLOCK_BYTES, q2_s::BLOCK_BYTES), (105, 82));
}

/// A q4_s case from raw blocks: `gen` gives each super-block's d (the first call's value is
/// kept per super-block), each sub-block's scale and each nibble, in that order of use.
fn q4_s_raw_case(rows: usize, cols: usize, rng: &mut Rng, mut gen: impl FnMut(&mut Rng) -> (half::f16, i8, u8)) -> Case {
    let qtype = QuantType::Q4S;
    let rb = qtype.row_bytes(cols).unwrap();
    let mut bytes = vec![0u8; rows * rb];
    for blk in bytes.chunks_exact_mut(q4_s::BLOCK_BYTES) {
        let (d, _, _) = gen(rng);
        let mut sc = [0i8; 16];
        for s in sc.iter_mut() {
            *s = gen(rng).1;
        }
        blk[0..2].copy_from_slice(&d.to_le_bytes());
        blk[2..16].copy_from_slice(&q4_s::pack_scales(&sc));
        for b in blk[16..].iter_mut() {
            *b = gen(rng).2 | (gen(rng).2 << 4);
        }
    }
    let mut w = vec![0f32; rows * cols];
    for (r, out) in w.chunks_exact_mut(cols.max(1)).enumerate() {
        qtype.dequantize_row(&bytes[r * rb..(r + 1) * rb], out);
    }
    let m = Matrix::from_bytes(qtype, rows, cols, &bytes).unwrap();
    Case { qtype, rows, cols, bytes, scaled: w.clone(), offset: vec![0.0; w.len()], w, m }
}

/// The extremes of q4_s's integer sums, on every path: sub-scales -64 and 63; nibbles all at
/// one end of the grid (-127 or 113), or each block's first half at one end and its second half
/// at the other; activations all 1 (int8 127), or alternating +-1.
#[test]
fn q4_s_extreme_blocks_match_scalar() {
    let mut rng = Rng(17);
    for (s, nib) in [(-64i8, 0u8), (63, 0), (-64, 15), (63, 15), (-64, 255), (63, 255)] {
        let mut i = 0usize;
        let c = q4_s_raw_case(21, 512, &mut rng, |_| {
            i += 1;
            // 255: nibbles alternate between the two ends.
            let n = if nib == 255 { if i.is_multiple_of(2) { 0 } else { 15 } } else { nib };
            (half::f16::from_f32(0.5), s, n)
        });
        for xs in [vec![1f32; 2 * 512], (0..2 * 512).map(|k| if k % 2 == 0 { 1.0 } else { -1.0 }).collect()] {
            check_case_with(&c, 2, &xs).unwrap();
        }
    }
}

/// Big enough to go through the thread pool (and every thread count gives the same bits, since
/// each row is computed whole by one thread).
#[test]
fn pooled_products_match_scalar() {
    let mut rng = Rng(7);
    for qtype in QuantType::ALL {
        let c = case(qtype, 301, 1024, &mut rng);
        for n in [1, 9] {
            check_case(&c, n, &mut rng).unwrap();
        }
    }
}

#[test]
fn matvec_pair_equals_two_matvecs() {
    let mut rng = Rng(11);
    for (qa, qb) in [
        (QuantType::Q8_0, QuantType::Q8_0),
        (QuantType::Iq4Nl, QuantType::Bf16),
        (QuantType::Q4S, QuantType::Q4K),
        (QuantType::Q4S, QuantType::Q4S),
        (QuantType::Q3S, QuantType::Q2S),
    ] {
        let a = case(qa, 200, 512, &mut rng);
        let b = case(qb, 77, 512, &mut rng);
        let x = rng.vec(512);
        let (mut ya, mut yb) = (vec![0f32; 200], vec![0f32; 77]);
        Matrix::matvec_pair(&a.m, &b.m, &x, &mut ya, &mut yb);
        let (mut ra, mut rb) = (vec![0f32; 200], vec![0f32; 77]);
        a.m.matvec(&x, &mut ra);
        b.m.matvec(&x, &mut rb);
        assert_eq!(ya, ra);
        assert_eq!(yb, rb);
    }
}

#[test]
fn reload_replaces_weights() {
    let mut rng = Rng(3);
    for qtype in QuantType::ALL {
        let a = case(qtype, 37, 256, &mut rng);
        let b = case(qtype, 37, 256, &mut rng);
        let mut m = Matrix::from_bytes(qtype, 37, 256, &a.bytes).unwrap();
        m.reload(&b.bytes).unwrap();
        let x = rng.vec(256);
        let (mut y, mut want) = (vec![0f32; 37], vec![0f32; 37]);
        m.matvec(&x, &mut y);
        b.m.matvec(&x, &mut want);
        assert_eq!(y, want, "{qtype}");
        assert!(m.reload(&b.bytes[1..]).is_err());
        // 37 rows pad to 48; q4_k's and q4_s's tile super-blocks (2368 bytes for 16 rows of 256
        // weights, 144 bytes each on disk) take 1/36 more than on disk, q3_s's (1728 bytes, 105
        // on disk) 1/35 more, q2_s's (1344 bytes, 82 on disk) 1/41 more.
        let (num, den) = match qtype {
            QuantType::Q3S => (36, 35),
            QuantType::Q2S => (42, 41),
            q if is_super(q) => (37, 36),
            _ => (1, 1),
        };
        let want = b.bytes.len() / 37 * 48 * num / den;
        assert_eq!(m.resident_bytes(), want, "{qtype}");
    }
}

#[test]
fn shape_errors_are_reported() {
    let e = Matrix::from_bytes(QuantType::Q8_0, 2, 64, &[0u8; 10]).err().unwrap();
    assert!(e.to_string().contains("needs 136 bytes, got 10"), "{e}");
    let e = Matrix::from_bytes(QuantType::Iq4Nl, 2, 40, &[0u8; 10]).err().unwrap();
    assert!(e.to_string().contains("40 columns"), "{e}");
}

/// Quantization error of the integer paths on a realistic shape, measured against the exact
/// product of the dequantized weights. Rounding activations to steps `d` adds independent errors
/// uniform on [-d/2, d/2], so the predicted RMS error of output r is `sqrt(sum_i s_ri^2 d_i^2 / 12)`
/// with `s` the part of each weight that meets the int8 activations (`Case::scaled`: the weight
/// itself, or q4_k's `d*sc*(q - 8)`). The measured error must match it, and for activations without
/// outliers stay under 1% of the output's RMS (amax of 32 such values is about 2.3 sigma,
/// predicting about 0.5%); under 1.5% for q4_k, whose `d*sc*(q - 8)` is larger than the weight
/// wherever a sub-block's zero is far from q = 8 (measured about 1.0%). q4_s applies its
/// sub-scales to exact integer sums, so rounding x multiplies `d * s * GRID[n]`, the weight
/// itself, as for iq4_nl: the same 1%. So do q3_s and q2_s, whose sub-scales meet exact integer
/// sums too.
#[test]
fn int_paths_error_matches_rounding_model() {
    let mut rng = Rng(5);
    for qtype in [
        QuantType::Q8_0,
        QuantType::Iq4Nl,
        QuantType::Q4_0,
        QuantType::Q4K,
        QuantType::Q4S,
        QuantType::Q3S,
        QuantType::Q2S,
    ] {
        let c = case(qtype, 256, 2048, &mut rng);
        for outliers in [false, true] {
            let x = if outliers { rng.vec(2048) } else { rng.plain_vec(2048) };
            let st = steps(&x);
            let mut y = vec![0f32; 256];
            c.m.matvec(&x, &mut y);
            let b = bounds(&c, &x, 1);
            let (mut err2, mut pred2, mut sig2) = (0f64, 0f64, 0f64);
            for (r, (&y, &(_, tol, exact))) in y.iter().zip(&b).enumerate() {
                assert!((y as f64 - exact).abs() <= tol, "{qtype} row {r}: {y} vs {exact} (bound {tol})");
                err2 += (y as f64 - exact).powi(2);
                sig2 += exact * exact;
                // Rounding x multiplies the `scale * q` part of each weight (q4_k's offsets meet
                // the exact sums of x).
                let w = &c.scaled[r * 2048..(r + 1) * 2048];
                pred2 += w.iter().enumerate().map(|(i, a)| (*a as f64 * st[i / 32]).powi(2) / 12.0).sum::<f64>();
            }
            let (rel, ratio) = ((err2 / sig2).sqrt(), (err2 / pred2).sqrt());
            eprintln!(
                "{qtype} (activation outliers: {outliers}): relative RMS error {rel:.5}, measured / predicted {ratio:.3}"
            );
            assert!((0.75..1.25).contains(&ratio), "{qtype}: error {ratio} x the rounding model");
            let limit = if qtype == QuantType::Q4K { 0.015 } else { 0.01 };
            if !outliers {
                assert!(rel < limit, "{qtype}: relative RMS error {rel}");
            }
        }
    }
}

#[test]
fn describe_names_the_path() {
    let d = kernels::describe();
    eprintln!("kernels: {d}");
    assert!(d.starts_with(kernels::selected().name()), "{d}");
    assert!(Isa::available().contains(&Isa::Scalar));
    assert!(Isa::available().contains(&kernels::selected()));
}

#[test]
fn read_bandwidth_is_plausible() {
    let bw = kernels::measure_read_bandwidth(1);
    // Between 100 MB/s and 10 TB/s: a number, not an artifact of timing nothing.
    assert!(bw > 1e8 && bw < 1e13, "{bw}");
}

#[test]
fn parallel_for_runs_every_chunk_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    for chunks in [0, 1, 2, 7, 100] {
        let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
        kernels::parallel_for(chunks, &|c| {
            hits[c].fetch_add(1, Ordering::SeqCst);
            // A job that itself asks for the pool gets its chunks run inline.
            let inner = AtomicUsize::new(0);
            kernels::parallel_for(3, &|_| {
                inner.fetch_add(1, Ordering::SeqCst);
            });
            assert_eq!(inner.load(Ordering::SeqCst), 3);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1), "{chunks} chunks");
    }
}

/// Callers on several threads at once (one gets the pool, the others run alone) and any thread
/// count all give the same bits: every row is computed whole by one thread in a fixed order.
#[test]
fn concurrent_callers_and_thread_counts_agree() {
    let mut rng = Rng(13);
    let c = case(QuantType::Q8_0, 1000, 1024, &mut rng);
    let x = rng.vec(1024);
    let mut want = vec![0f32; 1000];
    c.m.matvec(&x, &mut want);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..20 {
                    let mut y = vec![0f32; 1000];
                    c.m.matvec(&x, &mut y);
                    assert_eq!(y, want);
                }
            });
        }
    });
    for t in [1, 3, 2] {
        kernels::set_threads(t);
        let mut y = vec![0f32; 1000];
        c.m.matvec(&x, &mut y);
        assert_eq!(y, want, "{t} threads");
    }
    kernels::set_threads(0);
}

#[test]
fn empty_shapes() {
    for qtype in QuantType::ALL {
        for (rows, cols) in [(0, 2 * qtype.block_len().max(32)), (5, 0), (0, 0)] {
            let m = Matrix::from_bytes(qtype, rows, cols, &[]).unwrap();
            let x = vec![1f32; 3 * cols];
            for isa in paths() {
                let mut y = vec![f32::NAN; 3 * rows];
                m.matmul_on(isa, &x, 3, &mut y);
                assert!(y.iter().all(|v| *v == 0.0), "{qtype} [{rows}x{cols}] on {}", isa.name());
            }
        }
    }
}

/// Weights are shared between threads (the model's, the residency layer's).
#[test]
fn matrix_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Matrix>();
}
