//! Calibration: what a model's experts see on real text, for quantizers and for the choice of
//! a type per expert.
//!
//! Per (layer, expert) it holds the mean squared activation of each input column of the three
//! projections (gate and up share their input, the pre-MoE norm output of the rows routed to
//! the expert; down's input is the GeGLU hidden) and how often the router chose the expert.
//! Those means are what llama.cpp's importance matrix records, so its files read into the same
//! struct (`imatrix`), without the routing counts it does not keep.
//!
//! It sits below `model` and `convert`: the MoE calls its observer, the converter its
//! importances. `record` collects one from a running model, `file` stores it (`formats/calibration.md`),
//! `allocate` turns routing frequencies into a type per expert under a byte budget.

pub mod allocate;
pub mod file;
pub mod imatrix;
pub mod record;

pub use record::{MoeObserver, Recorder};

use crate::checkpoint::Proj;
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use crate::format::writer::sha256_hex;
use crate::quant::QuantType;
use std::path::Path;

/// What one expert saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertStats {
    /// Tokens whose top-k included this expert.
    pub routed: u64,
    /// Router probability given to this expert, summed over every token (chosen or not).
    pub prob_sum: f64,
    /// Rows behind `input_sq` (the rows routed here) and behind `hidden_sq`.
    pub input_rows: u64,
    pub hidden_rows: u64,
    /// Mean over those rows of each input column squared: `[d_model]` for gate and up,
    /// `[ffn_size]` for down.
    pub input_sq: Vec<f32>,
    pub hidden_sq: Vec<f32>,
}

/// Where a calibration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `grok1-run calibrate`: routing counts included.
    Recorded,
    /// A llama.cpp imatrix: column importances only, routing unknown.
    Imatrix,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub origin: Origin,
    pub n_layers: usize,
    pub n_experts: usize,
    pub d_model: usize,
    pub ffn_size: usize,
    /// sha256 of the config JSON of the model it was recorded on (empty for imatrix files,
    /// which carry no config).
    pub config_sha256: String,
    /// Tokens run through the model.
    pub tokens: u64,
    /// The text it was recorded on, as the user named it.
    pub dataset: String,
    /// Layer-major: `experts[layer * n_experts + expert]`.
    pub experts: Vec<ExpertStats>,
}

/// Quantize one row, each column's error weighted by `importance` (its mean squared input) in
/// the types whose quantizers take one; the others quantize unweighted. Adding importance to a
/// quantizer is one arm here.
pub fn quantize_row(q: QuantType, row: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
    match (q, importance) {
        (QuantType::Q3S, imp) => crate::quant::q3_s::quantize_row(row, imp, out),
        (QuantType::Q2S, imp) => crate::quant::q2_s::quantize_row(row, imp, out),
        _ => q.quantize_row(row, out),
    }
}

/// sha256 of a config as the calibration file names it: its JSON in field order.
pub fn config_sha256(c: &GrokConfig) -> String {
    sha256_hex(serde_json::to_string(c).expect("config serializes").as_bytes())
}

impl Calibration {
    /// An empty calibration for a model of config `c`.
    pub fn empty(c: &GrokConfig, origin: Origin) -> Calibration {
        let stats = ExpertStats {
            routed: 0,
            prob_sum: 0.0,
            input_rows: 0,
            hidden_rows: 0,
            input_sq: vec![0.0; c.d_model],
            hidden_sq: vec![0.0; c.ffn_size],
        };
        Calibration {
            origin,
            n_layers: c.n_layers,
            n_experts: c.n_experts,
            d_model: c.d_model,
            ffn_size: c.ffn_size,
            config_sha256: config_sha256(c),
            tokens: 0,
            dataset: String::new(),
            experts: vec![stats; c.n_layers * c.n_experts],
        }
    }

    pub fn expert(&self, layer: usize, expert: usize) -> &ExpertStats {
        &self.experts[layer * self.n_experts + expert]
    }

    /// The importance of each input column of one projection: its mean squared activation.
    /// `None` when the expert saw no rows (a quantizer then weighs columns equally).
    pub fn importance(&self, layer: usize, expert: usize, proj: Proj) -> Option<&[f32]> {
        let s = self.expert(layer, expert);
        match proj {
            Proj::Gate | Proj::Up => (s.input_rows > 0).then_some(&s.input_sq[..]),
            Proj::Down => (s.hidden_rows > 0).then_some(&s.hidden_sq[..]),
        }
    }

    /// Whether it knows how often each expert was routed to.
    pub fn has_routing(&self) -> bool {
        self.origin == Origin::Recorded
    }

    /// Each expert's share of its layer's routing (top-k counts), layer-major; uniform when the
    /// routing is unknown or a layer saw no tokens.
    pub fn routing_frequencies(&self) -> Vec<f64> {
        let n = self.n_experts;
        let mut out = Vec::with_capacity(self.experts.len());
        for layer in self.experts.chunks(n) {
            let total: u64 = layer.iter().map(|s| s.routed).sum();
            for s in layer {
                out.push(if self.has_routing() && total > 0 { s.routed as f64 / total as f64 } else { 1.0 / n as f64 });
            }
        }
        out
    }

    /// Check that it describes a model of config `c`; `what` names the calibration's file.
    pub fn check_fits(&self, c: &GrokConfig, what: &Path) -> Result<()> {
        let ours = (self.n_layers, self.n_experts, self.d_model, self.ffn_size);
        let theirs = (c.n_layers, c.n_experts, c.d_model, c.ffn_size);
        if ours != theirs {
            return Err(Error::bad_file(
                what,
                format!(
                    "calibration is for {} layers x {} experts, d_model {}, ffn {}; the model has {} x {}, d_model {}, ffn {}",
                    ours.0, ours.1, ours.2, ours.3, theirs.0, theirs.1, theirs.2, theirs.3
                ),
            ));
        }
        if self.origin == Origin::Recorded && self.config_sha256 != config_sha256(c) {
            return Err(Error::bad_file(
                what,
                format!(
                    "calibration was recorded on a model with config sha256 {}, this model's is {}",
                    self.config_sha256,
                    config_sha256(c)
                ),
            ));
        }
        Ok(())
    }
}

/// Read a calibration: ours (`formats/calibration.md`) or a llama.cpp imatrix, told apart by
/// their first bytes; `c` gives the shapes an imatrix file does not carry.
pub fn load(path: &Path, c: &GrokConfig) -> Result<Calibration> {
    use crate::error::IoContext;
    let bytes = std::fs::read(path).at(path)?;
    let cal = if bytes.starts_with(file::MAGIC) {
        file::decode(&bytes, path)?
    } else {
        imatrix::decode(&bytes, path, c)?
    };
    cal.check_fits(c, path)?;
    Ok(cal)
}
