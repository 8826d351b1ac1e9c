//! Choosing the next token from logits: temperature, top-k, top-p (nucleus), and a seeded
//! generator so a run can be repeated exactly.

/// SplitMix64: tiny, fast, and good enough to draw one uniform number per token.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    /// 0 = no limit.
    top_k: usize,
    /// 1.0 = no limit.
    top_p: f32,
    rng: Rng,
    /// (probability, token), reused between calls.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// `temperature` 0 means greedy; `top_k` 0 and `top_p` >= 1 switch those filters off.
    pub fn new(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler {
            temperature: temperature.max(0.0),
            top_k,
            top_p: if top_p > 0.0 { top_p } else { 1.0 },
            rng: Rng::new(seed),
            candidates: Vec::new(),
        }
    }

    pub fn greedy() -> Sampler {
        Sampler::new(0.0, 0, 1.0, 0)
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        assert!(!logits.is_empty(), "sampling from an empty logit vector");
        if self.temperature == 0.0 || self.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (((l - max) * inv_t).exp(), i as u32)));
        // Highest probability first; equal ones by token id, so results do not depend on the sort.
        let by_prob = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.top_k > 0 && self.top_k < c.len() {
            c.select_nth_unstable_by(self.top_k - 1, by_prob);
            c.truncate(self.top_k);
        }
        c.sort_unstable_by(by_prob);
        let total: f32 = c.iter().map(|x| x.0).sum();
        if self.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let target = self.top_p * total;
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += x.0;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        let total: f64 = c.iter().map(|x| x.0 as f64).sum();
        let mut r = self.rng.next_f64() * total;
        for &(p, tok) in c.iter() {
            r -= p as f64;
            if r < 0.0 {
                return tok;
            }
        }
        c.last().unwrap().1
    }
}

/// Index of the largest logit; the lowest index wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let l = [0.1, 3.0, -2.0, 3.0];
        assert_eq!(Sampler::greedy().sample(&l), 1);
        assert_eq!(Sampler::new(5.0, 1, 1.0, 9).sample(&l), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let n = 200_000;
        let c = counts(&mut Sampler::new(1.0, 0, 1.0, 42), &logits, n);
        for (i, &l) in logits.iter().enumerate() {
            let p = (l as f64).exp() / z;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            let f = c[i] as f64 / n as f64;
            assert!((f - p).abs() < 5.0 * sd, "token {i}: freq {f}, expected {p}");
        }
        // Temperature 0.5 squares the odds between tokens 2 and 1 (e^2 instead of e).
        let c = counts(&mut Sampler::new(0.5, 0, 1.0, 7), &logits, n);
        let ratio = c[2] as f64 / c[1] as f64;
        assert!((ratio / 2f64.exp() - 1.0).abs() < 0.05, "ratio {ratio}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, -5.0];
        let c = counts(&mut Sampler::new(1.0, 2, 1.0, 1), &logits, 20_000);
        assert!(c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&x| x == 0), "{c:?}");
        // Probabilities are ~0.64, 0.24, 0.09, ...: top_p 0.8 keeps exactly the first two.
        let c = counts(&mut Sampler::new(1.0, 0, 0.8, 2), &logits, 20_000);
        assert!(c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&x| x == 0), "{c:?}");
        // A tiny top_p still leaves the most likely token.
        let c = counts(&mut Sampler::new(1.0, 0, 1e-6, 3), &logits, 1000);
        assert_eq!(c[0], 1000);
    }

    #[test]
    fn the_seed_decides_the_sequence() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(1.0, 0, 0.95, seed);
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }
}
