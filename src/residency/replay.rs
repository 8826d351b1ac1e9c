//! Replaying a routing trace through cache policies, for experts of one size: which policy keeps
//! the experts a run will ask for, at a budget of `capacity` experts.
//!
//! The input is the run's fetches in order (per pass and layer, the distinct experts it used, as
//! `RoutingTrace::fetches` lists them). A fetch's experts are all needed at once; a hit is an
//! expert resident when its fetch starts. Policies:
//! * LRU: evict the least recently used.
//! * ARC (Megiddo and Modha, 2003): a recency list and a frequency list whose split adapts,
//!   steered by ghost lists of what each evicted recently.
//! * The store's decayed frequency (`policy::Policy`, called, not copied), with its admission
//!   guard, replayed as `ExpertStore::fetch` and the store's admission count it: one clock tick of
//!   `1/n_layers` per fetch, every needed expert touched, then the misses admitted in order,
//!   the fetch's own experts never victims (the model holds them while it computes).
//! * Belady's MIN: evict the resident expert whose next use is farthest, or do not admit the
//!   newcomer when its own next use is farther still. For pages of one size this is the most
//!   hits any policy can get, online or not, so it bounds what a better online policy could win.

use super::policy::Policy;
use std::collections::{HashMap, VecDeque};

/// Hits and misses of one replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub hits: u64,
    pub misses: u64,
}

impl Counts {
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }

    fn count(&mut self, hit: bool) {
        if hit {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
    }
}

/// The policies the replay compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ReplayPolicy {
    Lru,
    Arc,
    DecayedFrequency,
    Min,
}

impl ReplayPolicy {
    pub const ALL: [ReplayPolicy; 4] = [ReplayPolicy::Lru, ReplayPolicy::Arc, ReplayPolicy::DecayedFrequency, ReplayPolicy::Min];

    pub fn name(self) -> &'static str {
        match self {
            ReplayPolicy::Lru => "LRU",
            ReplayPolicy::Arc => "ARC",
            ReplayPolicy::DecayedFrequency => "decayed-frequency",
            ReplayPolicy::Min => "MIN (offline)",
        }
    }
}

/// What the decayed-frequency replay needs to tick its clock as the store does.
#[derive(Debug, Clone, Copy)]
pub struct StoreClock {
    pub n_layers: usize,
    pub half_life_steps: f64,
}

/// Replay `fetches` (slot ids out of `n_slots`) with `policy` at `capacity` experts.
pub fn replay(policy: ReplayPolicy, fetches: &[Vec<usize>], n_slots: usize, capacity: usize, clock: StoreClock) -> Counts {
    match policy {
        ReplayPolicy::Lru => lru(fetches, capacity),
        ReplayPolicy::Arc => arc(fetches, capacity),
        ReplayPolicy::DecayedFrequency => decayed_frequency(fetches, n_slots, capacity, clock),
        ReplayPolicy::Min => min(fetches, capacity),
    }
}

/// Least recently used, over the fetches' experts in order.
pub fn lru(fetches: &[Vec<usize>], capacity: usize) -> Counts {
    let mut c = Counts::default();
    let mut last_use: HashMap<usize, u64> = HashMap::new();
    let mut t = 0u64;
    for f in fetches {
        for &s in f {
            t += 1;
            let hit = last_use.contains_key(&s);
            c.count(hit);
            if !hit && capacity > 0 && last_use.len() >= capacity {
                let (&victim, _) = last_use.iter().min_by_key(|(_, &u)| u).unwrap();
                last_use.remove(&victim);
            }
            if hit || capacity > 0 {
                last_use.insert(s, t);
            }
        }
    }
    c
}

/// Adaptive replacement cache. `t1`/`t2` hold residents (seen once recently / at least twice),
/// `b1`/`b2` the ghosts of what each evicted; `p` is `t1`'s target size. Lists are LRU first.
pub fn arc(fetches: &[Vec<usize>], capacity: usize) -> Counts {
    let mut a = ArcCache::new(capacity);
    let mut c = Counts::default();
    for f in fetches {
        for &s in f {
            c.count(a.access(s));
        }
    }
    c
}

struct ArcCache {
    c: usize,
    p: f64,
    t1: VecDeque<usize>,
    t2: VecDeque<usize>,
    b1: VecDeque<usize>,
    b2: VecDeque<usize>,
}

fn take(list: &mut VecDeque<usize>, s: usize) -> bool {
    match list.iter().position(|&x| x == s) {
        Some(i) => {
            list.remove(i);
            true
        }
        None => false,
    }
}

impl ArcCache {
    fn new(c: usize) -> ArcCache {
        ArcCache { c, p: 0.0, t1: VecDeque::new(), t2: VecDeque::new(), b1: VecDeque::new(), b2: VecDeque::new() }
    }

    /// Evict one resident into its ghost list, `t1`'s LRU if `t1` is over its target.
    fn replace(&mut self, in_b2: bool) {
        let t1 = self.t1.len() as f64;
        if !self.t1.is_empty() && (t1 > self.p || (in_b2 && t1 == self.p)) {
            let v = self.t1.pop_front().unwrap();
            self.b1.push_back(v);
        } else if let Some(v) = self.t2.pop_front() {
            self.b2.push_back(v);
        } else if let Some(v) = self.t1.pop_front() {
            self.b1.push_back(v);
        }
    }

    fn full(&self) -> bool {
        self.t1.len() + self.t2.len() >= self.c
    }

    /// Whether `s` hit; then update the lists.
    fn access(&mut self, s: usize) -> bool {
        if self.c == 0 {
            return false;
        }
        if take(&mut self.t1, s) || take(&mut self.t2, s) {
            self.t2.push_back(s);
            return true;
        }
        let (n1, n2) = (self.b1.len() as f64, self.b2.len() as f64);
        if take(&mut self.b1, s) {
            self.p = (self.p + (n2 / n1).max(1.0)).min(self.c as f64);
            if self.full() {
                self.replace(false);
            }
            self.t2.push_back(s);
            return false;
        }
        if take(&mut self.b2, s) {
            self.p = (self.p - (n1 / n2).max(1.0)).max(0.0);
            if self.full() {
                self.replace(true);
            }
            self.t2.push_back(s);
            return false;
        }
        let l1 = self.t1.len() + self.b1.len();
        let total = l1 + self.t2.len() + self.b2.len();
        if l1 == self.c {
            if self.t1.len() < self.c {
                self.b1.pop_front();
                self.replace(false);
            } else {
                self.t1.pop_front();
            }
        } else if total >= self.c {
            if total >= 2 * self.c {
                self.b2.pop_front();
            }
            if self.full() {
                self.replace(false);
            }
        }
        self.t1.push_back(s);
        false
    }
}

/// The store's policy, replayed as the store applies it.
pub fn decayed_frequency(fetches: &[Vec<usize>], n_slots: usize, capacity: usize, clock: StoreClock) -> Counts {
    let mut policy = Policy::new(n_slots, clock.half_life_steps);
    let mut cached = vec![false; n_slots];
    let mut n_cached = 0usize;
    let mut now = 0.0f64;
    let mut c = Counts::default();
    let mut missed = Vec::new();
    for f in fetches {
        now += 1.0 / clock.n_layers as f64;
        missed.clear();
        for &s in f {
            policy.touch(s, now);
            c.count(cached[s]);
            if !cached[s] {
                missed.push(s);
            }
        }
        for &s in &missed {
            let candidates: Vec<(usize, u64)> =
                (0..n_slots).filter(|&i| cached[i] && !f.contains(&i)).map(|i| (i, 1)).collect();
            let free = capacity.saturating_sub(n_cached) as u64;
            if let Some(victims) = policy.victims(&candidates, free, 1, policy.score(s, now), now) {
                for v in victims {
                    cached[v] = false;
                    n_cached -= 1;
                }
                cached[s] = true;
                n_cached += 1;
            }
        }
    }
    c
}

/// Belady's MIN with bypass.
pub fn min(fetches: &[Vec<usize>], capacity: usize) -> Counts {
    let seq: Vec<usize> = fetches.iter().flatten().copied().collect();
    // next[i]: the position of the next request for seq[i] after i (usize::MAX: never).
    let mut next = vec![usize::MAX; seq.len()];
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for i in (0..seq.len()).rev() {
        next[i] = seen.get(&seq[i]).copied().unwrap_or(usize::MAX);
        seen.insert(seq[i], i);
    }
    // Resident slot -> its next use.
    let mut resident: HashMap<usize, usize> = HashMap::new();
    let mut c = Counts::default();
    for (i, &s) in seq.iter().enumerate() {
        let hit = resident.contains_key(&s);
        c.count(hit);
        if hit {
            resident.insert(s, next[i]);
            continue;
        }
        if capacity == 0 || next[i] == usize::MAX {
            continue;
        }
        if resident.len() >= capacity {
            let (&victim, &far) = resident.iter().max_by_key(|(&v, &u)| (u, v)).unwrap();
            if far <= next[i] {
                continue;
            }
            resident.remove(&victim);
        }
        resident.insert(s, next[i]);
    }
    c
}

/// A budget as a fraction of the experts: `1/8`, `0.25`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let (a, b): (f64, f64) = (a.trim().parse().map_err(|_| format!("`{s}`: bad numerator"))?, b.trim().parse().map_err(|_| format!("`{s}`: bad denominator"))?);
            a / b
        }
        None => s.parse().map_err(|_| format!("`{s}` is not a fraction like 1/8 or 0.25"))?,
    };
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("budget `{s}` must be a fraction in (0, 1]"));
    }
    Ok(v)
}

/// One cell of the replay table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub policy: &'static str,
    pub budget: String,
    pub capacity: usize,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
}

/// Every policy at every budget (`(label, fraction of n_slots)`).
pub fn table(fetches: &[Vec<usize>], n_slots: usize, budgets: &[(String, f64)], clock: StoreClock) -> Vec<Row> {
    let mut rows = Vec::new();
    for (label, frac) in budgets {
        let capacity = ((frac * n_slots as f64).floor() as usize).max(1);
        for p in ReplayPolicy::ALL {
            let c = replay(p, fetches, n_slots, capacity, clock);
            rows.push(Row { policy: p.name(), budget: label.clone(), capacity, hits: c.hits, misses: c.misses, hit_rate: c.hit_rate() });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn singles(seq: &[usize]) -> Vec<Vec<usize>> {
        seq.iter().map(|&s| vec![s]).collect()
    }

    #[test]
    fn lru_by_hand() {
        // Capacity 2: a b a c b a -> miss miss hit miss(evict b) miss(evict a) miss(evict c).
        let c = lru(&singles(&[0, 1, 0, 2, 1, 0]), 2);
        assert_eq!(c, Counts { hits: 1, misses: 5 });
        // Capacity 3 holds all three: only the first uses miss.
        assert_eq!(lru(&singles(&[0, 1, 0, 2, 1, 0]), 3), Counts { hits: 3, misses: 3 });
    }

    #[test]
    fn arc_by_hand() {
        // Capacity 2. a a: a moves to T2. b: T1=[b]. c: full, |T1|=1 > p=0, so b goes to B1;
        // T1=[c], T2=[a]. b again: ghost hit in B1, p -> 1, replace: |T1|=1 not > 1, so a
        // (T2's LRU) goes to B2; T2=[b]. a: ghost hit in B2, p -> 0, replace: T1's c goes to B1.
        // Then a and b both hit.
        let seq = [0, 0, 1, 2, 1, 0, 0, 1];
        assert_eq!(arc(&singles(&seq), 2), Counts { hits: 3, misses: 5 });
        // LRU: a a b c(evicts a) b a(evicts c) a b: four hits.
        assert_eq!(lru(&singles(&seq), 2), Counts { hits: 4, misses: 4 });
        // A scan (each once) after a reused pair: ARC keeps b in T2 through it and hits it at
        // the end; LRU has flushed both.
        let scan = [0, 1, 0, 1, 2, 3, 4, 5, 0, 1];
        assert_eq!(arc(&singles(&scan), 2), Counts { hits: 3, misses: 7 });
        assert_eq!(lru(&singles(&scan), 2), Counts { hits: 2, misses: 8 });
    }

    #[test]
    fn min_by_hand() {
        // Capacity 2: a b c a b: at c, a is next used at 3, b at 4: MIN evicts b... or bypasses c
        // (never used again): a and b stay, both hit.
        assert_eq!(min(&singles(&[0, 1, 2, 0, 1]), 2), Counts { hits: 2, misses: 3 });
        // The textbook sequence 1 2 3 4 1 2 5 1 2 3 4 5 with 3 frames: 7 faults (4 and 5 are
        // bypassed: their next uses are farther than every resident's).
        let seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5];
        assert_eq!(min(&singles(&seq), 3), Counts { hits: 5, misses: 7 });
    }
}
