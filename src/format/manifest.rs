//! `manifest.json`: the model's config and the placement and checksum of every byte.

use crate::checkpoint::Proj;
use crate::config::GrokConfig;
use crate::error::{Error, IoContext, Result};
use crate::quant::QuantType;
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::{FORMAT_NAME, FORMAT_VERSION};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardKind {
    Dense,
    Experts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub kind: ShardKind,
    pub bytes: u64,
    pub sha256: String,
}

/// A dense tensor: stored uncompressed at `offset` in shard `shard`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenseEntry {
    /// Canonical name, e.g. `blk.3.attn_q` (see `checkpoint::names`).
    pub name: String,
    pub qtype: QuantType,
    /// `[rows, cols]` for matrices (rows = output channels), `[n]` for vectors.
    pub shape: Vec<usize>,
    pub shard: usize,
    pub offset: u64,
    pub bytes: u64,
    pub sha256: String,
    /// XXH3-64 of the stored bytes (see `format::checksum`); absent in older models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<String>,
}

/// One tensor inside an expert chunk; `offset` is relative to the start of the raw
/// (decompressed) chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkTensor {
    pub proj: ProjName,
    pub qtype: QuantType,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub bytes: u64,
    /// sha256 of the raw tensor bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjName {
    Gate,
    Up,
    Down,
}

impl From<Proj> for ProjName {
    fn from(p: Proj) -> Self {
        match p {
            Proj::Gate => ProjName::Gate,
            Proj::Up => ProjName::Up,
            Proj::Down => ProjName::Down,
        }
    }
}

impl ProjName {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjName::Gate => "gate",
            ProjName::Up => "up",
            ProjName::Down => "down",
        }
    }
}

/// All weights of one (layer, expert): gate, up and down, contiguous so that one read fetches
/// the expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertChunk {
    pub layer: usize,
    pub expert: usize,
    pub shard: usize,
    pub offset: u64,
    /// Bytes stored in the shard (after compression, if any).
    pub bytes: u64,
    /// Bytes of the raw chunk (the three tensors with their alignment padding).
    pub raw_bytes: u64,
    pub compression: Compression,
    /// sha256 of the stored bytes.
    pub sha256: String,
    /// XXH3-64 of the stored bytes, checked on every read (see `format::checksum`); absent in
    /// older models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<String>,
    pub tensors: Vec<ChunkTensor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantChoice {
    pub dense: QuantType,
    pub experts: QuantType,
    pub compression: Compression,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub config: GrokConfig,
    pub quant: QuantChoice,
    /// What the model was converted from, for the user's information.
    pub source: String,
    pub chunk_align: u64,
    pub shards: Vec<ShardEntry>,
    pub dense: Vec<DenseEntry>,
    pub experts: Vec<ExpertChunk>,
    pub tokenizer: Option<FileEntry>,
    /// The calibration the expert quantizers were given, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationUsed>,
    /// Set when the experts' types were chosen per expert to a size target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_mix: Option<ExpertMix>,
}

/// Which calibration a conversion used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationUsed {
    /// The file's name (without its directory) and the sha256 of its bytes.
    pub file: String,
    pub sha256: String,
    /// `grok1` (recorded by `grok1-run calibrate`) or `imatrix` (llama.cpp's).
    pub kind: String,
    /// The text it was recorded on, as its file names it.
    pub dataset: String,
    /// Whether it supplied routing frequencies for the choice of expert types.
    pub routing: bool,
}

/// How the experts' types were chosen to a size target (each tensor records its type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertMix {
    /// The target for the shards' bytes (dense + experts).
    pub target_bytes: u64,
    /// The types offered, most precise first.
    pub candidates: Vec<QuantType>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).at(path)?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not a valid manifest: {e}")))?;
        if m.format != FORMAT_NAME {
            return Err(Error::bad_file(
                path,
                format!("format `{}`, expected `{FORMAT_NAME}`", m.format),
            ));
        }
        if m.version != FORMAT_VERSION {
            return Err(Error::bad_file(
                path,
                format!("format version {}, this build reads version {FORMAT_VERSION}", m.version),
            ));
        }
        m.check_consistent().map_err(|msg| Error::bad_file(path, msg))?;
        Ok(m)
    }

    /// Structural checks: every placement points into a listed shard of the right kind and
    /// inside its length; every expert of every layer is present once.
    pub fn check_consistent(&self) -> std::result::Result<(), String> {
        self.config.validate()?;
        let within = |shard: usize, off: u64, len: u64, kind: ShardKind, what: &str| {
            let s = self.shards.get(shard).ok_or(format!("{what}: shard {shard} not listed"))?;
            if s.kind != kind {
                return Err(format!("{what}: shard {} is a {:?} shard", s.file, s.kind));
            }
            if off.checked_add(len).map_or(true, |end| end > s.bytes) {
                return Err(format!("{what}: bytes {off}..{} past the end of {}", off + len, s.file));
            }
            Ok(())
        };
        for d in &self.dense {
            within(d.shard, d.offset, d.bytes, ShardKind::Dense, &d.name)?;
        }
        let mut seen = vec![false; self.config.n_layers * self.config.n_experts];
        for c in &self.experts {
            let what = format!("expert chunk (layer {}, expert {})", c.layer, c.expert);
            within(c.shard, c.offset, c.bytes, ShardKind::Experts, &what)?;
            if c.layer >= self.config.n_layers || c.expert >= self.config.n_experts {
                return Err(format!("{what}: outside the model's {} layers x {} experts",
                    self.config.n_layers, self.config.n_experts));
            }
            let i = c.layer * self.config.n_experts + c.expert;
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("{what}: listed twice"));
            }
            for t in &c.tensors {
                if t.offset + t.bytes > c.raw_bytes {
                    return Err(format!("{what}: tensor {} past the chunk's end", t.proj.as_str()));
                }
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(format!(
                "expert chunk (layer {}, expert {}) missing",
                i / self.config.n_experts,
                i % self.config.n_experts
            ));
        }
        Ok(())
    }

    pub fn dense_entry(&self, name: &str) -> Option<&DenseEntry> {
        self.dense.iter().find(|d| d.name == name)
    }

    pub fn expert_chunk(&self, layer: usize, expert: usize) -> Option<&ExpertChunk> {
        self.experts.iter().find(|c| c.layer == layer && c.expert == expert)
    }
}
