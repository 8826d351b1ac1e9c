//! The converted on-disk format (specified byte by byte in `formats/README.md`): a directory of
//! shard files holding aligned tensors and per-expert chunks, and `manifest.json`, written last,
//! which says where everything is and what its sha256 is.

pub mod checksum;
pub mod inspect;
pub mod manifest;
pub mod reader;
pub mod verify;
pub mod writer;

pub use manifest::{ChunkTensor, DenseEntry, ExpertChunk, Manifest, ShardEntry, ShardKind};
pub use reader::ConvertedModel;
pub use verify::{verify, Problem, VerifyReport};

/// Name of the format, stored in every manifest.
pub const FORMAT_NAME: &str = "grok1-chunked";
/// Version of the format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Every tensor of a dense shard and every expert chunk starts at a multiple of this many bytes,
/// so a cold expert can be read with one aligned (O_DIRECT-capable) read.
pub const CHUNK_ALIGN: u64 = 4096;
/// Tensors inside an expert chunk start at multiples of this (a cache line / AVX-512 register).
pub const TENSOR_ALIGN: u64 = 64;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const TOKENIZER_FILE: &str = "tokenizer.model";
/// Where an interrupted conversion keeps the records of its finished shards.
pub const PARTIAL_DIR: &str = ".partial";

pub fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

pub fn dense_shard_name(i: usize) -> String {
    format!("dense-{i:05}.bin")
}

pub fn expert_shard_name(i: usize) -> String {
    format!("experts-{i:05}.bin")
}
