//! The scale search shared by the low-bit super-block types (q3_s, q2_s). A super-block is `NP`
//! pieces of `N` weights; `h` consecutive pieces form a unit sharing one signed integer scale
//! `s[k]` under the super-block's real scale `d`, and each piece picks one of the type's `NG`
//! grids of `L` int8 levels: piece `j` decodes as `d * s[j / h] * grid[sel[j]][n]`. (q3_s:
//! pieces of 16, units of 32, two grids; q2_s: pieces and units of 8, one grid.)
//!
//! The error minimised is `sum_i w_i (x_i - q_i)^2`, `w_i` the importance of weight `i` (ones
//! when the caller has none). For a fixed scale the best index of each weight is its nearest
//! grid level whatever its importance, and the best grid of a piece is the one with the least
//! error at that scale, so only the scales are searched:
//!
//! 1. each unit gets its best real scale: its largest weight is placed at a few positions near
//!    both ends of the first grid (the grids are not symmetric, so the sign of the scale
//!    matters), each piece takes its best grid at each such scale, each assignment gets its
//!    weighted least-squares scale, the best is re-assigned and refit while the error falls;
//! 2. `d` starts at the largest real scale over the integer range, each `s[k]` is the better of
//!    the two integers either side of `a[k] / d` (each piece on its best grid at that scale),
//!    `d` is refit by weighted least squares over the super-block for those integers and the
//!    integers chosen again, while the error falls.
//!
//! Everything is plain f32 arithmetic in a fixed order (eight lanes, summed pairwise), so the
//! AVX2 build and the portable build give the same bytes.

use super::hsum;

/// Below this a scale would vanish in f16; such sub-blocks and super-blocks are zeros.
pub(crate) const TINY: f32 = 1e-30;

/// Fractions of each grid end at which a sub-block's largest weight is tried. Below 1 the
/// largest weight lands inside the grid; above 1 it is clipped to the end level, which pays when
/// one weight stands far out from the rest.
const FRACTIONS: [f32; 6] = [0.6, 0.75, 0.86, 0.95, 1.05, 1.2];
const NPOS: usize = 2 * FRACTIONS.len();

/// `NG` grids of `L` ascending levels, with the midpoints between neighbours (nearest-level
/// lookup is `L - 1` comparisons, which vectorize) and the candidate positions of step 1.
pub(crate) struct Grids<const L: usize, const NG: usize> {
    pub values: [[f32; L]; NG],
    /// `mids[g][k]` lies between levels `k` and `k + 1`; the last entry is unused.
    pub mids: [[f32; L]; NG],
    positions: [[f32; NPOS]; NG],
}

impl<const L: usize, const NG: usize> Grids<L, NG> {
    pub(crate) const fn new(levels: &[[i8; L]; NG]) -> Self {
        let mut f = [[0f32; L]; NG];
        let mut g = 0;
        while g < NG {
            let mut k = 0;
            while k < L {
                f[g][k] = levels[g][k] as f32;
                k += 1;
            }
            g += 1;
        }
        Self::from_levels(&f)
    }

    /// Grids of real levels (the stored types use integers: `new`).
    pub(crate) const fn from_levels(levels: &[[f32; L]; NG]) -> Self {
        let mut values = [[0f32; L]; NG];
        let mut mids = [[f32::INFINITY; L]; NG];
        let mut positions = [[0f32; NPOS]; NG];
        let mut g = 0;
        while g < NG {
            let mut k = 0;
            while k < L {
                values[g][k] = levels[g][k];
                if k > 0 {
                    assert!(levels[g][k] > levels[g][k - 1], "grid levels must ascend");
                    mids[g][k - 1] = (levels[g][k] + levels[g][k - 1]) * 0.5;
                }
                k += 1;
            }
            let mut f = 0;
            while f < FRACTIONS.len() {
                positions[g][2 * f] = values[g][0] * FRACTIONS[f];
                positions[g][2 * f + 1] = values[g][L - 1] * FRACTIONS[f];
                f += 1;
            }
            g += 1;
        }
        Grids { values, mids, positions }
    }
}

/// The level nearest grid position `u` (ties and NaN go to the lower level).
#[inline(always)]
fn snap<const L: usize>(u: f32, v: &[f32; L], m: &[f32; L]) -> f32 {
    let mut g = v[0];
    for k in 1..L {
        g = if u > m[k - 1] { v[k] } else { g };
    }
    g
}

/// The index of the level nearest grid position `u`, as `snap` picks it.
#[inline(always)]
pub(crate) fn nearest<const L: usize>(u: f32, m: &[f32; L]) -> u8 {
    let mut n = 0u8;
    for &mk in &m[..L - 1] {
        n += (u > mk) as u8;
    }
    n
}

/// Weighted squared error, sum(w g x) and sum(w g g) of the nearest-level assignment of `N`
/// weights (`N` a multiple of 8) at scale `c` (nonzero).
#[inline(always)]
pub(crate) fn evaluate<const L: usize, const N: usize>(
    x: &[f32; N],
    w: &[f32; N],
    v: &[f32; L],
    m: &[f32; L],
    c: f32,
) -> (f32, f32, f32) {
    let ic = 1.0 / c;
    let (mut e, mut gx, mut gg) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for (xc, wc) in x.chunks_exact(8).zip(w.chunks_exact(8)) {
        for l in 0..8 {
            let g = snap(xc[l] * ic, v, m);
            let r = xc[l] - c * g;
            e[l] += wc[l] * (r * r);
            gx[l] += wc[l] * (g * xc[l]);
            gg[l] += wc[l] * (g * g);
        }
    }
    (hsum(&e), hsum(&gx), hsum(&gg))
}

/// Weighted sum of squares: the error of storing zeros.
#[inline(always)]
pub(crate) fn energy<const N: usize>(x: &[f32; N], w: &[f32; N]) -> f32 {
    let mut e = [0f32; 8];
    for (xc, wc) in x.chunks_exact(8).zip(w.chunks_exact(8)) {
        for l in 0..8 {
            e[l] += wc[l] * (xc[l] * xc[l]);
        }
    }
    hsum(&e)
}

/// The best grid for a piece at scale `c` (nonzero): its error, sum(w g x), sum(w g g) and
/// the grid (the lower one on ties).
#[inline(always)]
fn best_grid<const L: usize, const NG: usize, const N: usize>(
    x: &[f32; N],
    w: &[f32; N],
    grids: &Grids<L, NG>,
    c: f32,
) -> (f32, f32, f32, u8) {
    let mut best = (f32::INFINITY, 0f32, 0f32, 0u8);
    for g in 0..NG {
        let (e, gx, gg) = evaluate(x, w, &grids.values[g], &grids.mids[g], c);
        if g == 0 || e < best.0 {
            best = (e, gx, gg, g as u8);
        }
    }
    best
}

/// The pieces `j0 .. j0 + h` of a super-block, which share one scale, at scale `c`: total
/// error, sum(w g x), sum(w g g), each piece on its best grid (written to `sel`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn unit_at<const L: usize, const NG: usize, const N: usize, const NP: usize>(
    x: &[[f32; N]; NP],
    w: &[[f32; N]; NP],
    grids: &Grids<L, NG>,
    j0: usize,
    h: usize,
    c: f32,
    sel: &mut [u8; NP],
) -> (f32, f32, f32) {
    let (mut e, mut gx, mut gg) = (0f32, 0f32, 0f32);
    for j in j0..j0 + h {
        let (ej, gxj, ggj, g) = best_grid(&x[j], &w[j], grids, c);
        e += ej;
        gx += gxj;
        gg += ggj;
        sel[j] = g;
    }
    (e, gx, gg)
}

/// Step 1 for one scale unit (pieces `j0 .. j0 + h`): its best real scale, 0 for zeros.
#[inline(always)]
fn search_unit<const L: usize, const NG: usize, const N: usize, const NP: usize>(
    x: &[[f32; N]; NP],
    w: &[[f32; N]; NP],
    zero: f32,
    grids: &Grids<L, NG>,
    j0: usize,
    h: usize,
) -> f32 {
    let mut xm = 0f32;
    for piece in &x[j0..j0 + h] {
        for &v in piece {
            if v.abs() > xm.abs() {
                xm = v;
            }
        }
    }
    if xm.abs() < TINY {
        return 0.0;
    }
    let mut sel = [0u8; NP];
    // The least-squares scale gx / gg of an assignment leaves error sum(w x^2) - gx^2 / gg
    // (or less, after re-assignment): the best assignment has the largest gx^2 / gg.
    // Near ties (a constant sub-block fits any level exactly) go to the smaller scale, the
    // outer level: an inner level would need a scale many times larger, which could overflow
    // the f16 `d` and would coarsen the other sub-blocks' integer scales.
    let (mut bgx, mut bgg) = (0f32, 0f32);
    for g in 0..NG.min(1) {
        for &p in &grids.positions[g] {
            let (_, gx, gg) = unit_at(x, w, grids, j0, h, xm / p, &mut sel);
            if gg <= 0.0 {
                continue;
            }
            let (score, best) = (gx * gx * bgg, bgx * bgx * gg);
            let better = score > best * (1.0 + 1e-6)
                || (score >= best * (1.0 - 1e-6) && (gx * bgg).abs() < (bgx * gg).abs());
            if bgg == 0.0 || better {
                (bgx, bgg) = (gx, gg);
            }
        }
    }
    if bgg == 0.0 {
        return 0.0;
    }
    let mut c = bgx / bgg;
    if c == 0.0 || !c.is_finite() {
        return 0.0;
    }
    let (mut err, mut gx, mut gg) = unit_at(x, w, grids, j0, h, c, &mut sel);
    for _ in 0..2 {
        if gg <= 0.0 {
            break;
        }
        let cn = gx / gg;
        if cn == c || cn == 0.0 || !cn.is_finite() {
            break;
        }
        let (en, gxn, ggn) = unit_at(x, w, grids, j0, h, cn, &mut sel);
        if en >= err {
            break;
        }
        (c, err, gx, gg) = (cn, en, gxn, ggn);
    }
    if err >= zero {
        return 0.0;
    }
    c
}

/// A super-block's scales: `d` (as the block stores it), one integer scale per unit of `h`
/// pieces (`s[k]` for pieces `h k .. h k + h`) and each piece's grid.
pub(crate) struct Fit<const NP: usize> {
    pub d: f32,
    pub s: [i8; NP],
    pub sel: [u8; NP],
}

/// Steps 1 and 2 for one super-block of `NP` pieces of `N` weights, `h` consecutive pieces
/// sharing one integer scale in `smin..=smax` (so `NP / h` scales). `round_d` rounds a
/// super-block scale to what the block stores. A super-block of zeros gets `d = 0`.
#[inline(always)]
pub(crate) fn fit_superblock<const L: usize, const NG: usize, const N: usize, const NP: usize>(
    x: &[[f32; N]; NP],
    w: &[[f32; N]; NP],
    grids: &Grids<L, NG>,
    h: usize,
    (smin, smax): (i32, i32),
    round_d: impl Fn(f32) -> f32,
) -> Fit<NP> {
    let nu = NP / h;
    let mut zero = [0f32; NP];
    for j in 0..NP {
        zero[j] = energy(&x[j], &w[j]);
    }
    let mut unit_zero = [0f32; NP];
    let mut a = [0f32; NP];
    let mut amax_signed = 0f32;
    for k in 0..nu {
        for j in h * k..h * k + h {
            unit_zero[k] += zero[j];
        }
        a[k] = search_unit(x, w, unit_zero[k], grids, h * k, h);
        if a[k].abs() > amax_signed.abs() {
            amax_signed = a[k];
        }
    }
    let amax = amax_signed.abs();
    let mut best: Option<(f32, [i8; NP], [u8; NP], f32)> = None;
    if amax >= TINY {
        // d > 0; the largest real scale maps to smax, or to smin when it is negative (the
        // wider end of the signed range).
        let starts = [amax / smax as f32, amax / -smin as f32];
        for &d0 in &starts[..if amax_signed < 0.0 { 2 } else { 1 }] {
            let mut d = round_d(d0);
            for _ in 0..3 {
                if d <= 0.0 || !d.is_finite() {
                    break;
                }
                // Each unit takes the better of the two integers either side of a[k] / d,
                // each of its pieces on its best grid at that scale.
                let mut s = [0i8; NP];
                let mut sel = [0u8; NP];
                let (mut err, mut num, mut den) = (0f32, 0f32, 0f32);
                for k in 0..nu {
                    let u = (a[k] / d).clamp(smin as f32, smax as f32);
                    let lo = u.floor() as i32;
                    let mut bu = (f32::INFINITY, 0f32, 0f32, 0i32);
                    let mut bsel = [0u8; NP];
                    for t in [lo, lo + 1] {
                        if !(smin..=smax).contains(&t) {
                            continue;
                        }
                        let mut tsel = [0u8; NP];
                        let (e, gx, gg) = if t == 0 {
                            (unit_zero[k], 0.0, 0.0)
                        } else {
                            unit_at(x, w, grids, h * k, h, d * t as f32, &mut tsel)
                        };
                        if e < bu.0 {
                            bu = (e, gx, gg, t);
                            bsel = tsel;
                        }
                    }
                    let (e, gx, gg, t) = bu;
                    s[k] = t as i8;
                    sel[h * k..h * k + h].copy_from_slice(&bsel[h * k..h * k + h]);
                    err += e;
                    let tf = t as f32;
                    num += tf * gx;
                    den += tf * tf * gg;
                }
                if best.is_none_or(|(.., e)| err < e) {
                    best = Some((d, s, sel, err));
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
    }
    match best {
        Some((d, s, sel, _)) => Fit { d, s, sel },
        None => Fit { d: 0.0, s: [0; NP], sel: [0; NP] },
    }
}

/// The importance of one super-block's weights as the search uses it: the caller's values
/// (non-finite or negative ones count as 0), or ones. A piece whose importance is all zero
/// gets ones, so that it still stores its nearest values rather than arbitrary ones.
#[inline(always)]
pub(crate) fn importance_of<const N: usize, const NP: usize>(imp: Option<&[f32]>) -> [[f32; N]; NP] {
    let mut w = [[1f32; N]; NP];
    if let Some(imp) = imp {
        for j in 0..NP {
            let mut total = 0f32;
            for l in 0..N {
                let v = imp[N * j + l];
                let v = if v.is_finite() && v > 0.0 { v } else { 0.0 };
                w[j][l] = v;
                total += v;
            }
            if !(total > 0.0 && total.is_finite()) {
                w[j] = [1f32; N];
            }
        }
    }
    w
}

/// One super-block's weights as `NP` pieces, NaN as 0 and infinities as the largest finite
/// values (a row must be finite to mean anything; this only keeps the blocks finite).
#[inline(always)]
pub(crate) fn split<const N: usize, const NP: usize>(x: &[f32]) -> [[f32; N]; NP] {
    let mut out = [[0f32; N]; NP];
    for j in 0..NP {
        for l in 0..N {
            let v = x[N * j + l];
            out[j][l] = if v.is_nan() { 0.0 } else { v.clamp(f32::MIN, f32::MAX) };
        }
    }
    out
}

/// How the grids of q3_s and q2_s were found (`cargo test --release --lib grid_training --
/// --ignored --nocapture`): Lloyd iterations of this search on the synthetic expert weights.
/// Each round quantizes the training weights with the current levels, moves every level to the
/// least-squares centroid of the weights assigned to it (in units of their scale), rescales
/// so the largest level is 127; the printed integer levels are then measured on other weights.
/// The argument checks of a low-bit type's `quantize_row`: whole super-blocks of `qk` weights,
/// `block_bytes` each, and one importance per weight.
pub(crate) fn check_quantize_args(name: &str, qk: usize, block_bytes: usize, row: &[f32], importance: Option<&[f32]>, out: &[u8]) {
    assert_eq!(row.len() % qk, 0, "{name}: a row of {} weights is not a whole number of {qk}-weight super-blocks", row.len());
    assert_eq!(out.len(), row.len() / qk * block_bytes, "{name}: output of {} bytes for {} weights", out.len(), row.len());
    if let Some(w) = importance {
        assert_eq!(w.len(), row.len(), "{name}: {} importance values for a row of {} weights", w.len(), row.len());
    }
}

/// The argument checks of a low-bit type's `dequantize_row`.
pub(crate) fn check_dequantize_args(name: &str, qk: usize, block_bytes: usize, bytes: &[u8], out: &[f32]) {
    assert_eq!(bytes.len(), out.len() / qk * block_bytes, "{name}: {} bytes for {} weights", bytes.len(), out.len());
    assert_eq!(out.len() % qk, 0, "{name}: {} weights is not a whole number of super-blocks", out.len());
}

#[cfg(test)]
mod grid_training {
    use super::*;
    use crate::quant::measure::{sample, Dist, Rng};

    fn mixture(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n)
            .map(|_| {
                let z = r.gaussian();
                let o = r.uniform() < 1.0 / 1024.0;
                (if o { 6.0 * z } else { z }) as f32
            })
            .collect()
    }

    fn run<const L: usize, const NG: usize, const N: usize, const NP: usize>(
        x: &[f32],
        grids: &Grids<L, NG>,
        h: usize,
        range: (i32, i32),
        sums: &mut [[(f64, f64); L]; NG],
    ) -> f64 {
        let mut se = 0f64;
        let w = [[1f32; N]; NP];
        for blk in x.chunks_exact(N * NP) {
            let xs: [[f32; N]; NP] = split(blk);
            let f = fit_superblock(&xs, &w, grids, h, range, |d| crate::quant::f16_round(d * 4096.0) / 4096.0);
            for j in 0..NP {
                let c = f.d * f.s[j / h] as f32;
                let g = f.sel[j] as usize;
                for l in 0..N {
                    let xi = xs[j][l];
                    let q = if c == 0.0 {
                        0.0
                    } else {
                        let k = nearest(xi * (1.0 / c), &grids.mids[g]) as usize;
                        sums[g][k].0 += (c * xi) as f64;
                        sums[g][k].1 += (c * c) as f64;
                        c * grids.values[g][k]
                    };
                    se += ((xi - q) as f64).powi(2);
                }
            }
        }
        se
    }

    fn train<const L: usize, const NG: usize, const N: usize, const NP: usize>(
        name: &str,
        init: [[f32; L]; NG],
        h: usize,
        range: (i32, i32),
        iters: usize,
    ) {
        let train = mixture(256 * 1024, 5);
        let mut lv = init;
        for it in 0..iters {
            let grids = Grids::<L, NG>::from_levels(&lv);
            let mut sums = [[(0f64, 0f64); L]; NG];
            let se = run::<L, NG, N, NP>(&train, &grids, h, range, &mut sums);
            let ms: f64 = train.iter().map(|v| (*v as f64).powi(2)).sum();
            if it + 1 == iters {
                eprintln!("{name} it {it}: rel rmse {:.4} levels {:?}", (se / ms).sqrt(), lv);
            }
            let mut mx = 0f32;
            for g in 0..NG {
                for k in 0..L {
                    if sums[g][k].1 > 0.0 {
                        lv[g][k] = (sums[g][k].0 / sums[g][k].1) as f32;
                    }
                    mx = mx.max(lv[g][k].abs());
                }
            }
            for g in lv.iter_mut() {
                for v in g.iter_mut() {
                    *v *= 127.0 / mx;
                }
                for k in 1..L {
                    if g[k] <= g[k - 1] {
                        g[k] = g[k - 1] + 1.0;
                    }
                }
            }
        }
        let ints = lv.map(|g| g.map(|v| v.round()));
        let grids = Grids::<L, NG>::from_levels(&ints);
        for (dname, x) in [
            ("mixture", mixture(256 * 1024, 77)),
            ("gaussian", sample(Dist::Gaussian, 256 * 1024, 78)),
            ("t5", sample(Dist::StudentT(5), 256 * 1024, 79)),
        ] {
            let mut sums = [[(0f64, 0f64); L]; NG];
            let se = run::<L, NG, N, NP>(&x, &grids, h, range, &mut sums);
            let ms: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
            eprintln!("{name} int grid {ints:?} {dname}: rel rmse {:.4}", (se / ms).sqrt());
        }
    }

    /// From evenly spaced levels (q3_s: with a second grid of doubling steps). The shipped
    /// grids came from the same iteration started at the fixed points of the other layouts
    /// `formats/blocks.md` compares; this lands within 2 of every shipped level and within
    /// 0.2% of their error (q3_s 0.1464 on the mixture, q2_s 0.2554).
    #[test]
    #[ignore]
    fn train_grids() {
        let even = [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0].map(|v: f32| v * 30.0);
        let doubling = [-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0].map(|v: f32| v * 15.0);
        train::<8, 2, 16, 16>("q3_s", [even, doubling], 2, (-16, 15), 20);
        train::<4, 1, 8, 32>("q2_s", [[-3.0, -1.0, 1.0, 3.0].map(|v: f32| v * 20.0)], 1, (-8, 7), 12);
    }
}

