//! Weight distributions by table lookup. Sixteen random bits pick one of 65536 equal-probability
//! quantiles of the target distribution, so a 64-bit word gives four weights for the price of a
//! few loads. The table is symmetric and rescaled to unit variance exactly, so a tensor's mean and
//! variance are what the preset asks for, and a bf16 tensor is its f32 twin rounded.
//!
//! The heavy-tailed shape mixes a narrow and a wide normal: most weights are Gaussian, a small
//! fraction comes from a component several times wider. That gives the rare large weights (up
//! to ~15 sigma) real checkpoints have and that block quantizers must absorb.

pub const TABLE_BITS: u32 = 16;
pub const TABLE_LEN: usize = 1 << TABLE_BITS;

/// The shape of a unit-variance weight distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    Normal,
    /// `(1 - fraction) * N(0, 1) + fraction * N(0, scale^2)`, rescaled to unit variance.
    Mixture {
        fraction: f64,
        scale: f64,
    },
}

/// What one tensor is drawn from: `mean + std * z`, `z` of unit variance with the given shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    pub shape: Shape,
    pub mean: f64,
    pub std: f64,
}

/// Complementary error function. Chebyshev fit from Numerical Recipes (2nd ed., 6.2): relative
/// error below 1.2e-7 everywhere, far finer than the 1/65536 spacing of the table's quantiles.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Upper tail of the standard normal, `P(Z > x)`, without cancellation for large `x`.
pub fn normal_tail(x: f64) -> f64 {
    0.5 * erfc(x / std::f64::consts::SQRT_2)
}

fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

impl Shape {
    /// `P(X > x)` before the unit-variance rescaling.
    fn tail(self, x: f64) -> f64 {
        match self {
            Shape::Normal => normal_tail(x),
            Shape::Mixture { fraction: p, scale: k } => {
                (1.0 - p) * normal_tail(x) + p * normal_tail(x / k)
            }
        }
    }

    fn pdf(self, x: f64) -> f64 {
        match self {
            Shape::Normal => normal_pdf(x),
            Shape::Mixture { fraction: p, scale: k } => {
                (1.0 - p) * normal_pdf(x) + p * normal_pdf(x / k) / k
            }
        }
    }

    /// Kurtosis `E[x^4] / E[x^2]^2` of the continuous distribution (3 for a normal).
    pub fn kurtosis(self) -> f64 {
        match self {
            Shape::Normal => 3.0,
            Shape::Mixture { fraction: p, scale: k } => {
                let m2 = (1.0 - p) + p * k * k;
                let m4 = 3.0 * ((1.0 - p) + p * k.powi(4));
                m4 / (m2 * m2)
            }
        }
    }
}

/// The 65536 quantiles at probabilities `(i + 1/2) / 65536`, ascending, symmetric about zero and
/// rescaled to unit variance.
pub fn unit_table(shape: Shape) -> Vec<f64> {
    let n = TABLE_LEN;
    let mut t = vec![0.0f64; n];
    // Upper half by Newton's method on the tail. For x > 0 the density falls, so starting left
    // of the root (the previous quantile) every step undershoots and the iteration climbs
    // monotonically onto the root.
    let mut x = 0.0f64;
    for i in n / 2..n {
        let target = (n - i) as f64 - 0.5;
        let target = target / n as f64;
        for _ in 0..100 {
            let step = (shape.tail(x) - target) / shape.pdf(x);
            x += step;
            if step.abs() < 1e-13 * (1.0 + x) {
                break;
            }
        }
        t[i] = x;
        t[n - 1 - i] = -x;
    }
    let var = t.iter().map(|v| v * v).sum::<f64>() / n as f64;
    let s = var.sqrt().recip();
    t.iter_mut().for_each(|v| *v *= s);
    t
}

/// Round to the nearest bfloat16, ties to even, as the bit pattern.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// One tensor's table, already scaled, in the stored element type.
pub enum Table {
    Bf16(Box<[u16; TABLE_LEN]>),
    F32(Box<[f32; TABLE_LEN]>),
}

impl Table {
    pub fn new(unit: &[f64], init: &Init, bf16: bool) -> Table {
        assert_eq!(unit.len(), TABLE_LEN);
        let val = |i: usize| (init.mean + init.std * unit[i]) as f32;
        if bf16 {
            let mut t = Box::new([0u16; TABLE_LEN]);
            t.iter_mut().enumerate().for_each(|(i, o)| *o = bf16_bits(val(i)));
            Table::Bf16(t)
        } else {
            let mut t = Box::new([0f32; TABLE_LEN]);
            t.iter_mut().enumerate().for_each(|(i, o)| *o = val(i));
            Table::F32(t)
        }
    }

    pub fn elem_bytes(&self) -> usize {
        match self {
            Table::Bf16(_) => 2,
            Table::F32(_) => 4,
        }
    }

    /// Fill `out` (little-endian elements) from `rng`. Element `i` always uses bits
    /// `16 * (i % 4) ..` of word `i / 4`, whatever the element type.
    pub fn fill(&self, rng: &mut super::rng::Xoshiro256pp, out: &mut [u8]) {
        match self {
            Table::Bf16(t) => {
                debug_assert_eq!(out.len() % 2, 0);
                let mut chunks = out.chunks_exact_mut(8);
                for c in &mut chunks {
                    let r = rng.next_u64();
                    let w = t[r as u16 as usize] as u64
                        | (t[(r >> 16) as u16 as usize] as u64) << 16
                        | (t[(r >> 32) as u16 as usize] as u64) << 32
                        | (t[(r >> 48) as u16 as usize] as u64) << 48;
                    c.copy_from_slice(&w.to_le_bytes());
                }
                let rest = chunks.into_remainder();
                if !rest.is_empty() {
                    let r = rng.next_u64();
                    for (j, e) in rest.chunks_exact_mut(2).enumerate() {
                        e.copy_from_slice(&t[(r >> (16 * j)) as u16 as usize].to_le_bytes());
                    }
                }
            }
            Table::F32(t) => {
                debug_assert_eq!(out.len() % 4, 0);
                let mut chunks = out.chunks_exact_mut(16);
                for c in &mut chunks {
                    let r = rng.next_u64();
                    for j in 0..4 {
                        let v = t[(r >> (16 * j)) as u16 as usize];
                        c[4 * j..4 * j + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
                let rest = chunks.into_remainder();
                if !rest.is_empty() {
                    let r = rng.next_u64();
                    for (j, e) in rest.chunks_exact_mut(4).enumerate() {
                        e.copy_from_slice(&t[(r >> (16 * j)) as u16 as usize].to_le_bytes());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_known_values() {
        for (x, want) in [
            (0.0, 1.0),
            (0.5, 0.479_500_122_186_953_5),
            (1.0, 0.157_299_207_050_285_1),
            (2.0, 0.004_677_734_981_047_266),
            (4.0, 1.541_725_790_028_002e-8),
            (-1.0, 1.842_700_792_949_715),
        ] {
            let got = erfc(x);
            assert!((got - want).abs() <= 1.2e-7 * want, "erfc({x}) = {got}, want {want}");
        }
    }

    fn moments(t: &[f64]) -> (f64, f64, f64) {
        let n = t.len() as f64;
        let m1 = t.iter().sum::<f64>() / n;
        let m2 = t.iter().map(|v| v * v).sum::<f64>() / n;
        let m4 = t.iter().map(|v| v.powi(4)).sum::<f64>() / n;
        (m1, m2, m4 / (m2 * m2))
    }

    #[test]
    fn normal_table_is_the_normal_quantile_function() {
        let t = unit_table(Shape::Normal);
        assert!(t.windows(2).all(|w| w[0] < w[1]), "not strictly ascending");
        let (m1, m2, kurt) = moments(&t);
        assert!(m1.abs() < 1e-12 && (m2 - 1.0).abs() < 1e-12, "mean {m1}, var {m2}");
        assert!((kurt - 3.0).abs() < 0.02, "kurtosis {kurt}");
        // Quantile (i + 1/2)/65536 = 0.975 at i = 63896.1; interpolate around 1.959964.
        let u = |i: usize| (i as f64 + 0.5) / TABLE_LEN as f64;
        let i = (0.975 * TABLE_LEN as f64 - 0.5) as usize;
        let q = t[i] + (t[i + 1] - t[i]) * (0.975 - u(i)) / (u(i + 1) - u(i));
        assert!((q - 1.959_964).abs() < 2e-3, "0.975 quantile {q}");
        // The median quantiles straddle zero by half a step of the density at zero.
        let step = (2.0 * std::f64::consts::PI).sqrt() / TABLE_LEN as f64;
        assert!((t[TABLE_LEN / 2] - step / 2.0).abs() < 1e-3 * step);
    }

    #[test]
    fn mixture_table_has_the_mixture_tails() {
        let shape = Shape::Mixture { fraction: 1.0 / 1024.0, scale: 6.0 };
        let t = unit_table(shape);
        let (m1, m2, kurt) = moments(&t);
        assert!(m1.abs() < 1e-12 && (m2 - 1.0).abs() < 1e-12);
        let want = shape.kurtosis();
        // The table stops at the 1 - 1/131072 quantile, which trims the fourth moment a little.
        assert!(kurt < want && kurt > 0.9 * want, "kurtosis {kurt}, continuous {want}");
        let max = t[TABLE_LEN - 1];
        assert!(max > 12.0 && max < 17.0, "largest weight {max} sigma");
        // The share beyond 6 sigma matches the continuous tail.
        let sd = ((1.0 - 1.0 / 1024.0) + 36.0 / 1024.0f64).sqrt();
        let beyond = t.iter().filter(|v| v.abs() > 6.0).count() as f64 / TABLE_LEN as f64;
        let want = 2.0 * shape.tail(6.0 * sd);
        assert!((beyond - want).abs() < 0.1 * want, "{beyond} vs {want}");
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3 * 2^-8 is halfway between odd 0x3F81 and even 0x3F82.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(bf16_bits(-2.5), 0xC020);
        for x in [0.1f32, -3.3, 1e-3, 12345.0] {
            let back = f32::from_bits((bf16_bits(x) as u32) << 16);
            assert!((back - x).abs() <= x.abs() / 256.0, "{x} -> {back}");
            assert_eq!(half::bf16::from_f32(x).to_bits(), bf16_bits(x));
        }
    }
}
