//! Reading checkpoints. Every input layout becomes a `TensorSource`: canonical tensor names,
//! canonical `[out, in]` shapes, and rows of f32 read on demand from memory maps, so the
//! converter streams and never holds the model.

pub mod names;
mod safetensors;

pub use names::{Naming, Proj, Tensor};
pub use self::safetensors::SafetensorsSource;

use crate::config::GrokConfig;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor of a source, after translation to the canonical name.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    pub tensor: Tensor,
    /// Canonical shape: `[out, in]` for matrices, `[n]` for vectors.
    pub shape: Vec<usize>,
    /// The stored element type, as the source names it (`bf16`, `f16`, `f32`, `int8+scales`).
    pub dtype: String,
    /// Where it came from, for error messages: `file: original name`.
    pub origin: String,
}

impl SourceTensor {
    pub fn rows(&self) -> usize {
        if self.shape.len() == 1 { 1 } else { self.shape[0] }
    }
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap()
    }
}

pub trait TensorSource: Send + Sync {
    /// A line for the user: layout, naming, number of files.
    fn describe(&self) -> String;
    fn config(&self) -> &GrokConfig;
    /// Every tensor of the model, validated against the config (see `check_tensor_set`).
    fn tensors(&self) -> &[SourceTensor];
    /// Rows `row0 .. row0 + out.len() / cols` of tensor `t` as f32 (vectors have one row).
    fn read_rows(&self, t: Tensor, row0: usize, out: &mut [f32]) -> Result<()>;
    /// `tokenizer.model` shipped with the checkpoint, if any.
    fn tokenizer_path(&self) -> Option<PathBuf>;
    /// Total bytes of tensor data in the input files.
    fn input_bytes(&self) -> u64;

    /// Hint: rows `row0 .. row0 + nrows` of `t` will be read soon (start the reads now).
    fn prefetch_rows(&self, _t: Tensor, _row0: usize, _nrows: usize) {}
    /// Hint: rows `row0 .. row0 + nrows` of `t` will not be read again (drop them from this
    /// process's memory, so peak RSS does not grow with the model).
    fn done_with_rows(&self, _t: Tensor, _row0: usize, _nrows: usize) {}

    fn tensor(&self, t: Tensor) -> Option<&SourceTensor> {
        self.tensors().iter().find(|s| s.tensor == t)
    }
}

/// Open a checkpoint directory, detecting its layout.
pub fn open(dir: &Path, _config_override: Option<&Path>) -> Result<Box<dyn TensorSource>> {
    if !dir.is_dir() {
        return Err(Error::bad_file(dir, "not a directory (expected a checkpoint directory)"));
    }
    let entries: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    if entries.iter().any(|n| n.ends_with(".safetensors")) {
        return Ok(Box::new(SafetensorsSource::open(dir)?));
    }
    Err(Error::bad_file(
        dir,
        "no checkpoint found: expected config.json with model.safetensors or model-*.safetensors",
    ))
}

/// Check that `found` is exactly the tensor set `config` describes, with canonical shapes.
pub fn check_tensor_set(config: &GrokConfig, found: &[SourceTensor]) -> Result<()> {
    let mut seen: HashMap<Tensor, &SourceTensor> = HashMap::new();
    for s in found {
        if let Some(prev) = seen.insert(s.tensor, s) {
            return Err(Error::bad_tensor(
                s.tensor.to_string(),
                format!("appears twice: {} and {}", prev.origin, s.origin),
            ));
        }
        let expect = s.tensor.shape(config);
        if s.shape != expect {
            return Err(Error::bad_tensor(
                s.tensor.to_string(),
                format!("{}: shape {:?}, expected {:?} from the config", s.origin, s.shape, expect),
            ));
        }
    }
    let expected = Tensor::all(config);
    let missing: Vec<String> =
        expected.iter().filter(|t| !seen.contains_key(t)).map(|t| t.to_string()).collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
        return Err(Error::Invalid(format!(
            "{} tensor(s) missing from the checkpoint, e.g. {}",
            missing.len(),
            shown.join(", ")
        )));
    }
    if found.len() != expected.len() {
        let extra: Vec<&str> = found
            .iter()
            .filter(|s| !expected.contains(&s.tensor))
            .map(|s| s.origin.as_str())
            .take(5)
            .collect();
        return Err(Error::Invalid(format!(
            "unexpected tensor(s) for a {}-layer, {}-expert model: {}",
            config.n_layers,
            config.n_experts,
            extra.join(", ")
        )));
    }
    Ok(())
}
