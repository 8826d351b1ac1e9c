//! Measuring quantization error: seeded weight distributions and error statistics, shared by the
//! tests, the benchmark and the converter's reporting. The generator is a small splitmix64 so the
//! numbers in `formats/blocks.md` reproduce on any machine without extra dependencies.

use super::QuantType;

/// A weight distribution to measure on. All have zero mean; scales are those of the textbook
/// distributions (unit-variance Gaussian, Student-t with `dof` degrees of freedom, Laplace with
/// scale 1), which does not matter: every block type is scale-invariant up to f16 rounding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Gaussian,
    StudentT(u32),
    Laplace,
}

impl Dist {
    pub fn name(self) -> String {
        match self {
            Dist::Gaussian => "gaussian".into(),
            Dist::StudentT(k) => format!("student-t({k})"),
            Dist::Laplace => "laplace".into(),
        }
    }
}

/// Deterministic random numbers (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1), never 0 or 1.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    pub fn sample(&mut self, dist: Dist) -> f64 {
        match dist {
            Dist::Gaussian => self.gaussian(),
            Dist::StudentT(k) => {
                let z = self.gaussian();
                let chi2: f64 = (0..k).map(|_| self.gaussian().powi(2)).sum();
                z / (chi2 / k as f64).sqrt()
            }
            Dist::Laplace => {
                let u = self.uniform() - 0.5;
                -u.signum() * (1.0 - 2.0 * u.abs()).ln()
            }
        }
    }
}

/// `n` weights from `dist`, reproducible from `seed`.
pub fn sample(dist: Dist, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.sample(dist) as f32).collect()
}

/// Squared-error totals of quantizing some weights; add several with `merge`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ErrorStats {
    pub n: u64,
    /// Sum of squared quantization errors.
    pub sq_err: f64,
    /// Sum of squared weights.
    pub sq_weight: f64,
    /// Largest absolute error of one weight.
    pub max_abs: f64,
}

impl ErrorStats {
    pub fn rmse(&self) -> f64 {
        (self.sq_err / self.n.max(1) as f64).sqrt()
    }
    /// RMSE relative to the RMS of the weights.
    pub fn relative_rmse(&self) -> f64 {
        (self.sq_err / self.sq_weight).sqrt()
    }
    pub fn merge(&mut self, o: &ErrorStats) {
        self.n += o.n;
        self.sq_err += o.sq_err;
        self.sq_weight += o.sq_weight;
        self.max_abs = self.max_abs.max(o.max_abs);
    }
}

/// Quantize `rows` (each `cols` long) with `qtype`, dequantize, and compare with the originals.
/// `cols` must be a whole number of `qtype` blocks.
pub fn measure(qtype: QuantType, weights: &[f32], cols: usize) -> ErrorStats {
    let rb = qtype.row_bytes(cols).expect("cols must be a whole number of blocks");
    let mut bytes = vec![0u8; rb];
    let mut back = vec![0f32; cols];
    let mut s = ErrorStats::default();
    for row in weights.chunks_exact(cols) {
        qtype.quantize_row(row, &mut bytes);
        qtype.dequantize_row(&bytes, &mut back);
        for (&x, &y) in row.iter().zip(&back) {
            let e = (x as f64 - y as f64).abs();
            s.sq_err += e * e;
            s.sq_weight += x as f64 * x as f64;
            s.max_abs = s.max_abs.max(e);
        }
        s.n += cols as u64;
    }
    s
}
