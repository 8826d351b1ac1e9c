//! Which experts deserve RAM: use frequency with exponential decay.
//!
//! Every (layer, expert) has a score, kept whether or not it is resident:
//! `score(t) = sum over past uses u of 2^(-(t - t_u) / half_life)`, where `t` counts forward
//! steps (one step = one pass through all layers). A recently and often used expert scores high;
//! one that was hot long ago fades. Recency alone (LRU) would be wrong for MoE routing: with top-2
//! of 8, an LRU cache smaller than the working set cycles through experts and misses on nearly
//! every request, while frequency keeps the experts the router actually favours.
//!
//! The cache admits a newly read expert only if the experts it would displace score no higher
//! than it does, so a one-off request cannot flush a hot expert. Pinned experts are never
//! candidates (the caller leaves them out).

/// Decayed use count of one expert; the value is as of step `at`.
#[derive(Debug, Clone, Copy, Default)]
struct Score {
    value: f64,
    at: f64,
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// ln of the per-step decay factor (negative; 0 means no decay: plain LFU).
    ln_decay: f64,
    scores: Vec<Score>,
}

impl Policy {
    /// `half_life_steps`: after this many steps without use an expert's score halves.
    /// `f64::INFINITY` gives plain frequency counting.
    pub fn new(n_slots: usize, half_life_steps: f64) -> Policy {
        assert!(half_life_steps > 0.0, "half-life must be positive");
        let ln_decay = if half_life_steps.is_finite() { -std::f64::consts::LN_2 / half_life_steps } else { 0.0 };
        Policy { ln_decay, scores: vec![Score::default(); n_slots] }
    }

    /// Record one use of `slot` at step `now`.
    pub fn touch(&mut self, slot: usize, now: f64) {
        let s = self.score(slot, now);
        self.scores[slot] = Score { value: s + 1.0, at: now };
    }

    /// The decayed score of `slot` as of step `now`.
    pub fn score(&self, slot: usize, now: f64) -> f64 {
        let s = self.scores[slot];
        s.value * (self.ln_decay * (now - s.at).max(0.0)).exp()
    }

    /// Slots ordered from hottest to coldest as of `now` (ties: lower slot first).
    pub fn ranking(&self, now: f64) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.scores.len()).collect();
        v.sort_by(|&a, &b| self.score(b, now).total_cmp(&self.score(a, now)).then(a.cmp(&b)));
        v
    }

    /// Which resident `candidates` (slot, bytes) to evict so that `need` more bytes fit in
    /// `free` bytes, for a newcomer scoring `newcomer`. Coldest first. `None` when the newcomer
    /// should not be admitted: not enough evictable bytes, or a victim scores higher than it.
    pub fn victims(
        &self,
        candidates: &[(usize, u64)],
        free: u64,
        need: u64,
        newcomer: f64,
        now: f64,
    ) -> Option<Vec<usize>> {
        if need <= free {
            return Some(Vec::new());
        }
        let mut c: Vec<(f64, usize, u64)> =
            candidates.iter().map(|&(s, b)| (self.score(s, now), s, b)).collect();
        c.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut freed = free;
        let mut out = Vec::new();
        for (score, slot, bytes) in c {
            if score > newcomer {
                return None;
            }
            out.push(slot);
            freed += bytes;
            if freed >= need {
                return Some(out);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_decay_by_half_life() {
        let mut p = Policy::new(2, 10.0);
        p.touch(0, 0.0);
        p.touch(0, 0.0);
        assert!((p.score(0, 10.0) - 1.0).abs() < 1e-12);
        assert!((p.score(0, 20.0) - 0.5).abs() < 1e-12);
        p.touch(1, 20.0);
        // Two uses long ago weigh less than one use now.
        assert!(p.score(1, 20.0) > p.score(0, 20.0));
        assert_eq!(p.ranking(20.0), vec![1, 0]);
    }

    #[test]
    fn frequency_beats_recency() {
        let mut p = Policy::new(3, 100.0);
        for t in 0..10 {
            p.touch(0, t as f64);
        }
        p.touch(1, 10.0);
        assert_eq!(p.ranking(10.0), vec![0, 1, 2]);
    }

    #[test]
    fn victims_are_coldest_and_admission_is_guarded() {
        let mut p = Policy::new(4, f64::INFINITY);
        for (slot, uses) in [(0, 5), (1, 1), (2, 3)] {
            for _ in 0..uses {
                p.touch(slot, 0.0);
            }
        }
        let cands = [(0, 10), (1, 10), (2, 10)];
        assert_eq!(p.victims(&cands, 20, 10, 0.0, 0.0), Some(vec![]));
        assert_eq!(p.victims(&cands, 5, 10, 2.0, 0.0), Some(vec![1]));
        assert_eq!(p.victims(&cands, 0, 20, 3.0, 0.0), Some(vec![1, 2]));
        // Would need to displace slot 2 (score 3) for a newcomer scoring 2: refused.
        assert_eq!(p.victims(&cands, 0, 20, 2.0, 0.0), None);
        // Not enough evictable bytes at all.
        assert_eq!(p.victims(&cands, 0, 31, 100.0, 0.0), None);
    }
}
