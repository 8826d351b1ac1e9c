//! Recording a calibration from a running model: an observer of the MoE that sums, per expert,
//! the squares of its input and hidden columns and counts its routing.

use super::{Calibration, Origin};
use crate::config::GrokConfig;
use std::sync::Mutex;

pub use crate::observe::MoeObserver;

/// Sums in f64: a long text adds millions of rows into each column.
struct Sums {
    routed: u64,
    prob_sum: f64,
    input_rows: u64,
    hidden_rows: u64,
    input_sq: Vec<f64>,
    hidden_sq: Vec<f64>,
}

/// Observer that accumulates a calibration; `finish` turns the sums into means.
pub struct Recorder {
    config: GrokConfig,
    sums: Mutex<Vec<Sums>>,
}

impl Recorder {
    pub fn new(c: &GrokConfig) -> Recorder {
        let sums = (0..c.n_layers * c.n_experts)
            .map(|_| Sums {
                routed: 0,
                prob_sum: 0.0,
                input_rows: 0,
                hidden_rows: 0,
                input_sq: vec![0.0; c.d_model],
                hidden_sq: vec![0.0; c.ffn_size],
            })
            .collect();
        Recorder { config: c.clone(), sums: Mutex::new(sums) }
    }

    /// The calibration so far, over `tokens` tokens of `dataset`.
    pub fn finish(&self, tokens: u64, dataset: &str) -> Calibration {
        let mut cal = Calibration::empty(&self.config, Origin::Recorded);
        cal.tokens = tokens;
        cal.dataset = dataset.to_string();
        let sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        for (out, s) in cal.experts.iter_mut().zip(sums.iter()) {
            out.routed = s.routed;
            out.prob_sum = s.prob_sum;
            out.input_rows = s.input_rows;
            out.hidden_rows = s.hidden_rows;
            let mean = |sum: &[f64], rows: u64, out: &mut [f32]| {
                for (o, &x) in out.iter_mut().zip(sum) {
                    *o = if rows > 0 { (x / rows as f64) as f32 } else { 0.0 };
                }
            };
            mean(&s.input_sq, s.input_rows, &mut out.input_sq);
            mean(&s.hidden_sq, s.hidden_rows, &mut out.hidden_sq);
        }
        cal
    }
}

impl MoeObserver for Recorder {
    fn routed(&self, layer: usize, probs: &[f32], chosen: &[(usize, f32)]) {
        let n = self.config.n_experts;
        let mut sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let layer_sums = &mut sums[layer * n..][..n];
        for (s, &p) in layer_sums.iter_mut().zip(probs) {
            s.prob_sum += p as f64;
        }
        for &(e, _) in chosen {
            layer_sums[e].routed += 1;
        }
    }

    fn expert_ran(&self, layer: usize, expert: usize, xn: &[f32], members: &[(usize, f32)], hidden: &[f32]) {
        let (d, f) = (self.config.d_model, self.config.ffn_size);
        let mut sums = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut sums[layer * self.config.n_experts + expert];
        for (i, &(t, _)) in members.iter().enumerate() {
            for (acc, &x) in s.input_sq.iter_mut().zip(&xn[t * d..][..d]) {
                *acc += (x as f64) * (x as f64);
            }
            for (acc, &h) in s.hidden_sq.iter_mut().zip(&hidden[i * f..][..f]) {
                *acc += (h as f64) * (h as f64);
            }
        }
        s.input_rows += members.len() as u64;
        s.hidden_rows += members.len() as u64;
    }
}
