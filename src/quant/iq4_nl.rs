//! iq4_nl: our int4 for rows that are not a whole number of q4_K super-blocks. 32 weights share an
//! f16 scale `d`; weight = d * GRID[n] for a nibble n, where GRID is ggml's non-uniform 16-level
//! grid (denser near zero, where most weights lie). Nibble placement as q4_0: byte j holds weight
//! j (low) and weight j + 16 (high). Identical to ggml's `block_iq4_nl`.
//!
//! The quantizer is ours. For a fixed `d` the best nibbles are the nearest grid points, so only
//! `d` is searched. The grid is asymmetric (-127 .. 113), so both signs of `d` matter: the
//! block's largest-magnitude weight is tried at 6 positions near the negative end and 6 near the
//! positive end of the grid (the windows where the exact optimum lies for > 95% of blocks of
//! Gaussian and heavy-tailed data), each assignment gets its least-squares scale, the best wins,
//! and it is polished by re-assigning at the f16-rounded scale and refitting. This lands within
//! 0.3% of the exhaustive optimum's squared error (measured against a sweep over every
//! assignment breakpoint) at a small fraction of its cost.
//!
//! Nearest-grid lookup is one table load: every grid midpoint is a multiple of 0.5, so cells of
//! width 0.5 never straddle one.

use super::{f16_round, f16_scale, hsum, QK};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// Whether the AVX-512 loops may run: the CPU has AVX-512F and the blocks are whole vectors.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn use_avx512<const N: usize>() -> bool {
    N.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f")
}

pub const BLOCK_BYTES: usize = 2 + QK / 2;

pub const IQ4_NL_GRID: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Grid positions tried for the block's largest-magnitude weight (see the module comment).
const CANDIDATES: [f32; 12] = [
    -137.0, -131.0, -125.0, -119.0, -113.0, -107.0, 94.8, 100.5, 106.2, 111.8, 117.5, 123.2,
];
const NC: usize = CANDIDATES.len();

/// Cells of width 0.5 covering grid positions [-160, 160); positions beyond clamp to the ends,
/// whose nearest grid point is the end point anyway.
const NCELLS: usize = 640;
const CELL_OFFSET: f32 = 320.0;

const fn nearest_index_of_cell(c: usize) -> u8 {
    // Compare in quarter units so the cell centre (c / 2 - 160 + 0.25) is an integer.
    let centre4 = 2 * c as i32 - 639;
    let mut best = 0usize;
    let mut k = 1usize;
    while k < 16 {
        let dk = (centre4 - 4 * IQ4_NL_GRID[k] as i32).abs();
        let db = (centre4 - 4 * IQ4_NL_GRID[best] as i32).abs();
        if dk < db {
            best = k;
        }
        k += 1;
    }
    best as u8
}

const CELL_INDEX: [u8; NCELLS] = {
    let mut t = [0u8; NCELLS];
    let mut c = 0;
    while c < NCELLS {
        t[c] = nearest_index_of_cell(c);
        c += 1;
    }
    t
};

const CELL_VALUE: [f32; NCELLS] = {
    let mut t = [0f32; NCELLS];
    let mut c = 0;
    while c < NCELLS {
        t[c] = IQ4_NL_GRID[CELL_INDEX[c] as usize] as f32;
        c += 1;
    }
    t
};

/// The table cell of grid position `u` (NaN maps to cell 0).
#[inline(always)]
pub(crate) fn nearest_cell(u: f32) -> usize {
    // Clamp in f32 (max/min also turn NaN into 0), then a plain truncating conversion: the
    // saturating `as` casts and 64-bit conversions do not vectorize.
    let c = (u * 2.0 + CELL_OFFSET).max(0.0).min((NCELLS - 1) as f32);
    // SAFETY: c is finite and in [0, NCELLS - 1], so it fits an i32.
    let c = unsafe { c.to_int_unchecked::<i32>() } as u32;
    c.min(NCELLS as u32 - 1) as usize
}

/// Nearest-grid nibble for grid position `u`.
#[inline(always)]
pub fn nearest_index(u: f32) -> u8 {
    CELL_INDEX[nearest_cell(u)]
}

/// `nearest_index(x[l] * id)` for every weight.
#[inline(always)]
pub(crate) fn nearest_indices<const N: usize>(x: &[f32; N], id: f32) -> [u8; N] {
    #[cfg(target_arch = "x86_64")]
    if use_avx512::<N>() {
        // SAFETY: the CPU supports AVX-512F, as just checked.
        return unsafe { avx512::nearest_indices(x, id) };
    }
    let mut out = [0u8; N];
    for l in 0..N {
        out[l] = nearest_index(x[l] * id);
    }
    out
}

/// Squared error, sum(g * x) and sum(g * g) of the nearest-grid assignment at scale `d` (nonzero)
/// of `N` weights, `N` a multiple of 8.
#[inline(always)]
pub(crate) fn evaluate<const N: usize>(x: &[f32; N], d: f32) -> (f32, f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if use_avx512::<N>() {
        // SAFETY: the CPU supports AVX-512F, as just checked.
        return unsafe { avx512::evaluate_m(x, [d])[0] };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, as just checked.
        return unsafe { avx2::evaluate(x, d) };
    }
    evaluate_scalar(x, d)
}

/// `evaluate` at two scales (both nonzero) in one pass over the weights: the same values as two
/// calls, with the loads shared and the two chains of lookups side by side.
#[inline(always)]
pub(crate) fn evaluate2<const N: usize>(x: &[f32; N], d0: f32, d1: f32) -> [(f32, f32, f32); 2] {
    #[cfg(target_arch = "x86_64")]
    if use_avx512::<N>() {
        // SAFETY: the CPU supports AVX-512F, as just checked.
        return unsafe { avx512::evaluate_m(x, [d0, d1]) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, as just checked.
        return unsafe { avx2::evaluate2(x, d0, d1) };
    }
    [evaluate_scalar(x, d0), evaluate_scalar(x, d1)]
}

/// The reference for `evaluate` (and its version on CPUs without AVX2).
#[inline(always)]
fn evaluate_scalar<const N: usize>(x: &[f32; N], d: f32) -> (f32, f32, f32) {
    let id = 1.0 / d;
    // Eight independent lanes so the sums vectorize; the order is fixed, so every build agrees.
    let mut e = [0f32; 8];
    let mut gx = [0f32; 8];
    let mut gg = [0f32; 8];
    for c in x.chunks_exact(8) {
        for l in 0..8 {
            let g = CELL_VALUE[nearest_cell(c[l] * id)];
            let r = c[l] - d * g;
            e[l] += r * r;
            gx[l] += g * c[l];
            gg[l] += g * g;
        }
    }
    (hsum(&e), hsum(&gx), hsum(&gg))
}

/// Below this the f16 scale would underflow; such blocks are stored as zeros.
const TINY: f32 = 1e-30;

/// The scale for one block (already f16-exact), 0 for a block stored as zeros.
#[inline(always)]
fn choose_scale(x: &[f32; QK]) -> f32 {
    // Plain loops here and below rather than closures (iterator adaptors, array::from_fn): a
    // closure that is not inlined loses the AVX2 build.
    let mut finite = true;
    for &v in x {
        finite &= v.is_finite();
    }
    if !finite {
        // Rare and outside what the hot loop may see: search on a cleaned copy.
        let mut clean = *x;
        for v in clean.iter_mut() {
            *v = if v.is_nan() {
                0.0
            } else {
                v.clamp(f32::MIN, f32::MAX)
            };
        }
        return search_scale::<QK, true>(&clean);
    }
    search_scale::<QK, true>(x)
}

/// `sum(g * v)` and `sum(g * g)` in weight order for each candidate, g the grid value of cell
/// `v * ids2[k] + CELL_OFFSET`, which must lie in the table.
#[inline(always)]
fn candidate_sums<const N: usize>(x: &[f32; N], ids2: &[f32; NC]) -> ([f32; NC], [f32; NC]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, as just checked.
        return unsafe { avx512::candidate_sums(x, ids2) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, as just checked; the cells are in the table (caller).
        return unsafe { avx2::candidate_sums(x, ids2) };
    }
    candidate_sums_scalar(x, ids2)
}

/// The reference for `candidate_sums`.
#[inline(always)]
fn candidate_sums_scalar<const N: usize>(x: &[f32; N], ids2: &[f32; NC]) -> ([f32; NC], [f32; NC]) {
    let mut sgx = [0f32; NC];
    let mut sgg = [0f32; NC];
    for &v in x {
        for k in 0..NC {
            let c = v * ids2[k] + CELL_OFFSET;
            // SAFETY: c is a valid cell (the caller's bound), so also a valid i32.
            let g = unsafe { *CELL_VALUE.get_unchecked(c.to_int_unchecked::<i32>() as usize) };
            sgx[k] += g * v;
            sgg[k] += g * g;
        }
    }
    (sgx, sgg)
}

#[inline(always)]
fn round_if<const F16: bool>(d: f32) -> f32 {
    if F16 {
        f16_round(d)
    } else {
        d
    }
}

/// The least-squares scale of `N` finite weights on the grid, 0 when they are all but zero:
/// rounded to f16 at every step when `F16` (a block that stores it so), exact otherwise (q4_s's
/// sub-blocks, whose scales are integers under a shared one).
#[inline(always)]
pub(crate) fn search_scale<const N: usize, const F16: bool>(x: &[f32; N]) -> f32 {
    let [d] = search_scales::<N, F16, 1>(std::array::from_ref(x));
    d
}

/// `search_scale` of each of `B` blocks, the same value for each, the searches interleaved: one
/// block's search is a chain of dependent steps (lookups, sums, a division, the next lookups), so
/// running several side by side keeps the CPU busy, and the data-dependent choices are selects
/// rather than branches (a mispredicted branch throws the other blocks' work away).
#[inline(always)]
pub(crate) fn search_scales<const N: usize, const F16: bool, const B: usize>(
    xs: &[[f32; N]; B],
) -> [f32; B] {
    let mut out = [0f32; B];
    // The largest magnitude and the first weight that has it (what a scan keeping the first
    // strictly larger one finds), found without a branch per weight.
    let mut max = [0f32; B];
    let mut live = [false; B];
    for j in 0..B {
        let mut amax = 0f32;
        for &v in &xs[j] {
            amax = amax.max(v.abs());
        }
        for &v in xs[j].iter().rev() {
            max[j] = if v.abs() == amax { v } else { max[j] };
        }
        live[j] = amax >= TINY;
    }
    let mut sgx = [[0f32; NC]; B];
    let mut sgg = [[0f32; NC]; B];
    for j in 0..B {
        if !live[j] {
            continue; // rare: all but zero, stored as zeros
        }
        // Candidate k maps the largest weight to grid position CANDIDATES[k]; every other weight
        // lands within that in magnitude, so cells 2u + 320 stay inside the table.
        let inv = 1.0 / max[j];
        let mut ids2 = [0f32; NC];
        for k in 0..NC {
            ids2[k] = 2.0 * CANDIDATES[k] * inv;
        }
        // |v * ids2[k]| <= 2 * 137 (1 + 2^-22) and the values are finite (callers guarantee
        // it), so every cell v * ids2[k] + CELL_OFFSET is in [45, 595]: a valid i32 and cell.
        (sgx[j], sgg[j]) = candidate_sums(&xs[j], &ids2);
    }
    // The least-squares scale sgx / sgg leaves error sum(x^2) - sgx^2 / sgg: maximise the ratio,
    // comparing `sgx[k] * sgx[k] * sgg[best] > sgx[best] * sgx[best] * sgg[k]` in a scan, so
    // ties go to the first candidate.
    let mut d = [0f32; B];
    for j in 0..B {
        let mut sq = [0f32; NC];
        for k in 0..NC {
            sq[k] = sgx[j][k] * sgx[j][k];
        }
        let (mut best, mut sq_best, mut sgg_best) = (0, sq[0], sgg[j][0]);
        for k in 1..NC {
            let better = sq[k] * sgg_best > sq_best * sgg[j][k];
            best = if better { k } else { best };
            sq_best = if better { sq[k] } else { sq_best };
            sgg_best = if better { sgg[j][k] } else { sgg_best };
        }
        d[j] = round_if::<F16>(sgx[j][best] / sgg[j][best]);
        live[j] &= d[j] != 0.0 && d[j].is_finite();
    }
    // Polish: re-assign at the scale and refit, at most twice, while the error falls.
    let mut err = [0f32; B];
    let mut gx = [0f32; B];
    let mut gg = [0f32; B];
    for j in 0..B {
        if live[j] {
            (err[j], gx[j], gg[j]) = evaluate(&xs[j], d[j]);
        }
    }
    let mut polishing = live;
    for _ in 0..2 {
        for j in 0..B {
            if !polishing[j] {
                continue;
            }
            let dn = round_if::<F16>(gx[j] / gg[j]);
            if dn == d[j] || dn == 0.0 || !dn.is_finite() {
                polishing[j] = false;
                continue;
            }
            let (en, gxn, ggn) = evaluate(&xs[j], dn);
            if en >= err[j] {
                polishing[j] = false;
                continue;
            }
            (d[j], err[j], gx[j], gg[j]) = (dn, en, gxn, ggn);
        }
    }
    for j in 0..B {
        out[j] = if live[j] { d[j] } else { 0.0 };
    }
    out
}

#[inline(always)]
fn quantize_block(x: &[f32], b: &mut [u8]) {
    let x: &[f32; QK] = x.try_into().unwrap();
    let d = choose_scale(x);
    b[..2].copy_from_slice(&f16_scale(d).to_le_bytes());
    if d == 0.0 {
        b[2..BLOCK_BYTES].fill(0);
        return;
    }
    let n = nearest_indices(x, 1.0 / d);
    for j in 0..QK / 2 {
        b[2 + j] = n[j] | (n[j + QK / 2] << 4);
    }
}

#[inline(always)]
fn quantize_row_generic(row: &[f32], out: &mut [u8]) {
    for (x, b) in row.chunks_exact(QK).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        quantize_block(x, b);
    }
}

#[inline(always)]
fn dequantize_row_generic(bytes: &[u8], out: &mut [f32]) {
    super::dequantize_nibble_row(bytes, out, &IQ4_NL_GRID);
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
    fn builds_agree_bit_for_bit() {
        let mut row = sample(Dist::StudentT(4), 256 * QK, 8);
        row[7] = f32::NAN;
        row[40] = f32::NEG_INFINITY;
        row[64..96].fill(0.0);
        row[96..128].fill(-3.0);
        let mut a = vec![0u8; 256 * BLOCK_BYTES];
        let mut b = a.clone();
        quantize_row(&row, &mut a);
        quantize_row_generic(&row, &mut b);
        assert_eq!(a, b);
        let (mut ya, mut yb) = (vec![0f32; row.len()], vec![0f32; row.len()]);
        dequantize_row(&a, &mut ya);
        dequantize_row_generic(&a, &mut yb);
        assert_eq!(ya, yb);
    }

    /// Blocks of `N` weights for the kernel tests: bell-shaped and heavy-tailed, with exact
    /// zeros, ties, huge and tiny magnitudes.
    fn kernel_blocks<const N: usize>() -> Vec<[f32; N]> {
        let mut rng = crate::quant::measure::Rng::new(N as u64);
        let mut out = Vec::new();
        for i in 0..3000 {
            let mut x = [0f32; N];
            let scale = [1.0, 1e-4, 3e-7, 2e3, 1e-20][i % 5];
            for v in x.iter_mut() {
                let dist = if i % 2 == 0 {
                    Dist::Gaussian
                } else {
                    Dist::StudentT(3)
                };
                *v = rng.sample(dist) as f32 * scale;
            }
            match i % 7 {
                0 => x[i % N] = 0.0,
                1 => x[..N / 2].fill(0.0),
                2 => x[3] = -x[5],
                3 => x[i % N] *= 1e6,
                _ => {}
            }
            out.push(x);
        }
        out
    }

    /// The scales a search tries: the block's candidates and the refits' neighbours, including
    /// ones that push weights past both ends of the table.
    fn kernel_scales<const N: usize>(x: &[f32; N], i: usize) -> [f32; 3] {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        let k = CANDIDATES[i % NC];
        [amax / k, amax / (k * 0.37), -amax / (3.0 + (i % 5) as f32)]
    }

    fn bits3(v: (f32, f32, f32)) -> (u32, u32, u32) {
        (v.0.to_bits(), v.1.to_bits(), v.2.to_bits())
    }

    fn kernels_match_scalar<const N: usize>() {
        for (i, x) in kernel_blocks::<N>().iter().enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let max = *x.iter().find(|v| v.abs() == amax).unwrap();
            if amax < TINY {
                continue;
            }
            let mut ids2 = [0f32; NC];
            for k in 0..NC {
                ids2[k] = 2.0 * CANDIDATES[k] * (1.0 / max);
            }
            let reference = candidate_sums_scalar(x, &ids2);
            let [d0, d1, d2] = kernel_scales(x, i);
            let ev = [
                evaluate_scalar(x, d0),
                evaluate_scalar(x, d1),
                evaluate_scalar(x, d2),
            ];
            let ev = ev.map(bits3);
            let bits = |s: ([f32; NC], [f32; NC])| (s.0.map(f32::to_bits), s.1.map(f32::to_bits));
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 is present; the cells are in the table (the search's bound).
                    let got = unsafe { avx2::candidate_sums(x, &ids2) };
                    assert_eq!(bits(got), bits(reference), "avx2 candidate sums, block {i}");
                    let one = unsafe { avx2::evaluate(x, d0) };
                    let two = unsafe { avx2::evaluate2(x, d1, d2) };
                    assert_eq!(
                        [bits3(one), bits3(two[0]), bits3(two[1])],
                        ev,
                        "avx2, block {i}"
                    );
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F is present.
                    let got = unsafe { avx512::candidate_sums(x, &ids2) };
                    assert_eq!(
                        bits(got),
                        bits(reference),
                        "avx512 candidate sums, block {i}"
                    );
                    if N.is_multiple_of(16) {
                        for d in [d0, d1, d2] {
                            let want: Vec<u8> =
                                x.iter().map(|&v| nearest_index(v * (1.0 / d))).collect();
                            let got = unsafe { avx512::nearest_indices(x, 1.0 / d) };
                            assert_eq!(got.to_vec(), want, "avx512 nibbles, block {i}");
                        }
                        let one = unsafe { avx512::evaluate_m(x, [d0]) };
                        let two = unsafe { avx512::evaluate_m(x, [d1, d2]) };
                        let got = [bits3(one[0]), bits3(two[0]), bits3(two[1])];
                        assert_eq!(got, ev, "avx512, block {i}");
                    }
                }
            }
            let _ = (&reference, &ev);
        }
    }

    #[test]
    fn vector_kernels_match_scalar_bit_for_bit() {
        kernels_match_scalar::<16>();
        kernels_match_scalar::<32>();
        kernels_match_scalar::<8>();
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn register_lookup_matches_table() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        // Every cell's start, its middle and the last f32 below the next cell.
        let mut ts = Vec::new();
        for c in 0..NCELLS {
            let c = c as f32;
            ts.extend([c, c + 0.5, (c + 1.0).next_down().min((NCELLS - 1) as f32)]);
        }
        for chunk in ts.chunks(16) {
            let mut t = [0f32; 16];
            t[..chunk.len()].copy_from_slice(chunk);
            let mut g = [0f32; 16];
            // SAFETY: AVX-512F is present, as just checked.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(g.as_mut_ptr(), avx512::lookup(_mm512_loadu_ps(t.as_ptr())));
            }
            for l in 0..chunk.len() {
                let want = CELL_VALUE[t[l] as usize];
                assert_eq!(g[l], want, "t = {}", t[l]);
            }
        }
    }

    #[test]
    fn cell_table_is_nearest_grid_point() {
        for c in 0..NCELLS {
            let centre = c as f32 * 0.5 - 160.0 + 0.25;
            let brute = (0..16)
                .min_by(|&a, &b| {
                    let da = (centre - IQ4_NL_GRID[a] as f32).abs();
                    let db = (centre - IQ4_NL_GRID[b] as f32).abs();
                    da.partial_cmp(&db).unwrap()
                })
                .unwrap();
            assert_eq!(CELL_INDEX[c] as usize, brute, "cell {c} (centre {centre})");
            assert_eq!(nearest_cell(centre), c);
        }
    }

    #[test]
    fn nearest_index_is_nearest_everywhere() {
        // Fine steps across the whole range, including points just either side of midpoints.
        let mut u = -170.0f32;
        while u < 170.0 {
            let n = nearest_index(u) as usize;
            let err = (u - IQ4_NL_GRID[n] as f32).abs();
            let best = IQ4_NL_GRID
                .iter()
                .map(|&g| (u - g as f32).abs())
                .fold(f32::MAX, f32::min);
            // u * 2 + 320 is rounded in f32, which can move a point within ~1e-5 of a midpoint
            // to the other side; the error that costs is below that distance.
            assert!(
                err <= best + 1e-4,
                "u = {u}: picked {} at distance {err}, best {best}",
                IQ4_NL_GRID[n]
            );
            u += 0.0625 / 3.0;
        }
    }
}
