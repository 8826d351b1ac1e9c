//! Reading checkpoints. Every input layout becomes a `TensorSource`: canonical tensor names,
//! canonical `[out, in]` shapes, and rows of f32 read on demand from memory maps, so the
//! converter streams and never holds the model.

pub mod ckpt0;
pub mod names;
pub mod pickle;
mod safetensors;
pub mod strided;
pub mod torch_bin;
mod zip;

pub use self::ckpt0::Ckpt0Source;
pub use self::safetensors::SafetensorsSource;
pub use self::torch_bin::TorchBinSource;
pub use names::{Naming, Proj, Tensor};

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
    /// For tensors stored as int8 with per-group scales (ckpt-0's quantized weights): the
    /// original int8 values of rows `row0 .. row0 + q.len() / cols` in the canonical `[out, in]`
    /// orientation, and `scales[r * G + g]`, the scale of row `r` for inputs
    /// `g * cols / G .. (g + 1) * cols / G` (`G` = `int8_groups`). The value is `q * scale`
    /// exactly; `read_rows` gives it rounded to bf16, as the release's model code does.
    ///
    /// This lets a q8_0 target keep the release's int8 values without re-rounding: when
    /// `cols / G` is a multiple of 32, each 32-block lies in one group and its block scale is that
    /// group's scale. The block scale is f16, while these scales are bf16 (8 significant bits,
    /// f32's exponent range): one is exact in f16 whenever it lies in f16's normal range
    /// (2^-14 ..= 65504), overflows above it, and may lose bits to f16 subnormals below it. So
    /// check `half::f16::from_f32(s).to_f32() == s` per group, and where it fails requantize
    /// those blocks from `read_rows` instead of copying their int8 values.
    ///
    /// Returns `Ok(false)` (and leaves the buffers alone) for tensors that are not stored so.
    fn read_rows_int8(
        &self,
        t: Tensor,
        row0: usize,
        q: &mut [i8],
        scales: &mut [f32],
    ) -> Result<bool> {
        let _ = (t, row0, q, scales);
        Ok(false)
    }

    /// The number of scale groups `G` along the input axis of an int8-stored tensor.
    fn int8_groups(&self, t: Tensor) -> Option<usize> {
        let _ = t;
        None
    }

    fn tensor(&self, t: Tensor) -> Option<&SourceTensor> {
        self.tensors().iter().find(|s| s.tensor == t)
    }
}

/// Open a checkpoint directory, detecting its layout: Hugging Face safetensors, the release's
/// ckpt-0 pickles, or PyTorch `.bin` shards. `config_override` replaces the hyper-parameters of a
/// ckpt-0 or `.bin` checkpoint (ckpt-0 otherwise uses a `config.json` beside the pickles, else
/// Grok-1's); a safetensors checkpoint always uses its own `config.json`.
pub fn open(dir: &Path, config_override: Option<&Path>) -> Result<Box<dyn TensorSource>> {
    if !dir.is_dir() {
        return Err(Error::bad_file(dir, "not a directory (expected a checkpoint directory)"));
    }
    let entries: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    if entries.iter().any(|n| n.ends_with(".safetensors")) {
        if let Some(p) = config_override {
            return Err(Error::bad_file(
                p,
                "a config override applies to ckpt-0 and .bin checkpoints; this safetensors \
                 checkpoint uses its own config.json",
            ));
        }
        return Ok(Box::new(SafetensorsSource::open(dir)?));
    }
    if entries.iter().any(|n| n == "tensor00000_000") {
        return Ok(Box::new(Ckpt0Source::open(dir, config_override)?));
    }
    if entries.iter().any(|n| n.starts_with("pytorch_model") && n.ends_with(".bin")) {
        return Ok(Box::new(TorchBinSource::open(dir, config_override)?));
    }
    Err(Error::bad_file(
        dir,
        "no checkpoint found: expected model*.safetensors, ckpt-0's tensor00000_000 .., or \
         pytorch_model*.bin",
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
