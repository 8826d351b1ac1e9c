//! `verify`: recompute every checksum of a converted model and name everything that is wrong.
//! Each shard is read once, sequentially; its hash and the hashes of the tensors and chunks
//! inside it are computed in the same pass. Shards are checked in parallel.
//!
//! The manifest holds the checksums, so it cannot vouch for itself; what verify checks of it is
//! that it parses, that every placement is consistent (`Manifest::check_consistent`), and that
//! each tensor's shape is the one its config gives it and its byte count the one its type and
//! shape give it. An edit of the manifest that moves or retypes a tensor is found that way or by
//! the hashes; an edit of a config value that changes no shape (a norm epsilon, the RoPE base) is
//! not, as the format records no checksum of the manifest itself.

use super::checksum::FastHasher;
use super::manifest::{Compression, Manifest, ShardKind};
use super::{MANIFEST_FILE, PARTIAL_DIR, TOKENIZER_FILE};
use crate::checkpoint::Tensor;
use crate::error::Result;
use crate::quant::QuantType;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    Manifest { file: String, error: String },
    MissingShard { file: String },
    ShardSize { file: String, expected: u64, found: u64 },
    ShardChecksum { file: String },
    DenseTensor { file: String, tensor: String },
    ExpertChunk { file: String, layer: usize, expert: usize, tensors: Vec<String> },
    /// A compressed chunk whose stored bytes match their hash but do not decompress to the
    /// tensors the manifest records.
    ChunkContent { file: String, layer: usize, expert: usize, error: String },
    Tokenizer { file: String, error: String },
    UnexpectedFile { file: String },
    Io { file: String, error: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Manifest { file, error } => write!(f, "{file}: {error}"),
            Problem::MissingShard { file } => write!(f, "{file}: shard missing"),
            Problem::ShardSize { file, expected, found } => {
                let what = if found < expected { "truncated" } else { "too long" };
                write!(f, "{file}: {what}: {found} bytes, expected {expected}")
            }
            Problem::ShardChecksum { file } => write!(f, "{file}: shard sha256 mismatch"),
            Problem::DenseTensor { file, tensor } => {
                write!(f, "{file}: tensor {tensor}: sha256 mismatch")
            }
            Problem::ExpertChunk { file, layer, expert, tensors } => {
                write!(f, "{file}: expert chunk (layer {layer}, expert {expert}): sha256 mismatch")?;
                if !tensors.is_empty() {
                    write!(f, " in tensor(s) {}", tensors.join(", "))?;
                }
                Ok(())
            }
            Problem::ChunkContent { file, layer, expert, error } => {
                write!(f, "{file}: expert chunk (layer {layer}, expert {expert}): {error}")
            }
            Problem::Tokenizer { file, error } => write!(f, "{file}: {error}"),
            Problem::UnexpectedFile { file } => write!(f, "{file}: unexpected file"),
            Problem::Io { file, error } => write!(f, "{file}: {error}"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub shards: usize,
    pub dense_tensors: usize,
    pub expert_chunks: usize,
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
}

/// One region of a shard whose hash the manifest records.
struct Region {
    start: u64,
    end: u64,
    expected: String,
    hasher: Sha256,
    /// The region's `xxh3`, where the manifest has one, and its hasher.
    fast: Option<(String, FastHasher)>,
    what: RegionKind,
}

#[derive(Clone)]
enum RegionKind {
    Dense(String),
    Chunk { index: usize },
    ChunkTensor { index: usize, proj: &'static str },
}

/// Verify the model in `dir`. `progress` receives byte counts as they are hashed.
pub fn verify(dir: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<VerifyReport> {
    let mpath = dir.join(MANIFEST_FILE);
    let manifest = match Manifest::load(&mpath) {
        Ok(m) => m,
        Err(e) => {
            return Ok(VerifyReport {
                ok: false,
                shards: 0,
                dense_tensors: 0,
                expert_chunks: 0,
                bytes_checked: 0,
                problems: vec![Problem::Manifest { file: MANIFEST_FILE.into(), error: e.to_string() }],
            })
        }
    };
    let mut problems: Vec<Problem> = manifest_shapes(&manifest)
        .into_iter()
        .map(|error| Problem::Manifest { file: MANIFEST_FILE.into(), error })
        .collect();
    problems.extend(unexpected_files(dir, &manifest));

    let per_shard: Vec<(u64, Vec<Problem>)> = (0..manifest.shards.len())
        .into_par_iter()
        .map(|i| check_shard(dir, &manifest, i, progress))
        .collect();
    let mut bytes_checked = 0;
    for (b, p) in per_shard {
        bytes_checked += b;
        problems.extend(p);
    }
    if let Some(t) = &manifest.tokenizer {
        let p = dir.join(&t.file);
        match std::fs::read(&p) {
            Ok(bytes) => {
                bytes_checked += bytes.len() as u64;
                if bytes.len() as u64 != t.bytes {
                    let error = format!("{} bytes, the manifest says {}", bytes.len(), t.bytes);
                    problems.push(Problem::Tokenizer { file: t.file.clone(), error });
                } else if super::writer::sha256_hex(&bytes) != t.sha256 {
                    problems.push(Problem::Tokenizer { file: t.file.clone(), error: "sha256 mismatch".into() });
                }
            }
            Err(e) => problems.push(Problem::Tokenizer { file: t.file.clone(), error: e.to_string() }),
        }
    }
    Ok(VerifyReport {
        ok: problems.is_empty(),
        shards: manifest.shards.len(),
        dense_tensors: manifest.dense.len(),
        expert_chunks: manifest.experts.len(),
        bytes_checked,
        problems,
    })
}

/// Bytes a tensor of `shape` takes in `qtype`, or None when its rows do not fit the type's blocks.
fn tensor_bytes(qtype: QuantType, shape: &[usize]) -> Option<u64> {
    let (rows, cols) = match *shape {
        [n] => (1, n),
        [rows, cols] => (rows, cols),
        _ => return None,
    };
    Some(qtype.row_bytes(cols)? as u64 * rows as u64)
}

/// What the manifest says of each tensor's shape and size against its own config: every dense
/// tensor of the config once, named and shaped as the config gives it; every expert tensor
/// shaped so, each projection once per chunk, inside the chunk without overlap; sizes those of
/// the type and shape; an uncompressed chunk as long as its tensors.
fn manifest_shapes(m: &Manifest) -> Vec<String> {
    let c = &m.config;
    let mut out = Vec::new();
    let size_of = |what: &str, qtype: QuantType, shape: &[usize], bytes: u64, out: &mut Vec<String>| {
        match tensor_bytes(qtype, shape) {
            Some(b) if b == bytes => {}
            Some(b) => out.push(format!("{what}: {bytes} bytes, but {qtype} {shape:?} takes {b}")),
            None => out.push(format!("{what}: shape {shape:?} cannot be stored as {qtype}")),
        }
    };
    let mut wanted: Vec<(String, Vec<usize>)> = Tensor::dense(c).iter().map(|t| (t.to_string(), t.shape(c))).collect();
    for d in &m.dense {
        let what = format!("tensor {}", d.name);
        match wanted.iter().position(|(n, _)| *n == d.name) {
            Some(i) => {
                let (_, shape) = wanted.swap_remove(i);
                if d.shape != shape {
                    out.push(format!("{what}: shape {:?}, the config gives {shape:?}", d.shape));
                }
            }
            None => out.push(format!("{what}: not a dense tensor of this config, or listed twice")),
        }
        size_of(&what, d.qtype, &d.shape, d.bytes, &mut out);
    }
    for (name, _) in wanted {
        out.push(format!("tensor {name}: missing"));
    }
    for ch in &m.experts {
        let chunk = format!("expert chunk (layer {}, expert {})", ch.layer, ch.expert);
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for proj in [crate::checkpoint::Proj::Gate, crate::checkpoint::Proj::Up, crate::checkpoint::Proj::Down] {
            let name: super::manifest::ProjName = proj.into();
            let found: Vec<_> = ch.tensors.iter().filter(|t| t.proj == name).collect();
            if found.len() != 1 {
                out.push(format!("{chunk}: {} {} tensors, expected one", found.len(), name.as_str()));
                continue;
            }
            let t = found[0];
            let what = format!("{chunk}: tensor {}", name.as_str());
            let shape = Tensor::Expert { layer: ch.layer, expert: ch.expert, proj }.shape(c);
            if t.shape != shape {
                out.push(format!("{what}: shape {:?}, the config gives {shape:?}", t.shape));
            }
            size_of(&what, t.qtype, &t.shape, t.bytes, &mut out);
            spans.push((t.offset, t.offset + t.bytes));
        }
        if ch.tensors.len() != 3 {
            out.push(format!("{chunk}: {} tensors, expected gate, up and down", ch.tensors.len()));
        }
        spans.sort();
        if spans.windows(2).any(|w| w[0].1 > w[1].0) {
            out.push(format!("{chunk}: its tensors overlap"));
        }
        if ch.compression == Compression::None && ch.bytes != ch.raw_bytes {
            out.push(format!("{chunk}: stored uncompressed in {} bytes, but raw_bytes is {}", ch.bytes, ch.raw_bytes));
        }
    }
    out
}

fn unexpected_files(dir: &Path, m: &Manifest) -> Vec<Problem> {
    let mut known: Vec<&str> = m.shards.iter().map(|s| s.file.as_str()).collect();
    known.push(MANIFEST_FILE);
    if m.tokenizer.is_some() {
        known.push(TOKENIZER_FILE);
    }
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&name.as_str()) && name != PARTIAL_DIR {
                out.push(Problem::UnexpectedFile { file: name });
            }
        }
    }
    out.sort_by_key(|p| p.to_string());
    out
}

fn check_shard(dir: &Path, m: &Manifest, shard: usize, progress: &(dyn Fn(u64) + Sync)) -> (u64, Vec<Problem>) {
    let entry = &m.shards[shard];
    let path = dir.join(&entry.file);
    let file_name = entry.file.clone();
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return (0, vec![Problem::MissingShard { file: file_name }])
        }
        Err(e) => return (0, vec![Problem::Io { file: file_name, error: e.to_string() }]),
    };
    let found = file.metadata().map(|md| md.len()).unwrap_or(0);
    let mut problems = Vec::new();
    if found != entry.bytes {
        problems.push(Problem::ShardSize { file: file_name.clone(), expected: entry.bytes, found });
    }

    // The regions whose hashes the manifest records, in file order.
    let mut regions = Vec::new();
    match entry.kind {
        ShardKind::Dense => {
            for d in m.dense.iter().filter(|d| d.shard == shard) {
                regions.push(Region {
                    start: d.offset,
                    end: d.offset + d.bytes,
                    expected: d.sha256.clone(),
                    hasher: Sha256::new(),
                    fast: d.xxh3.clone().map(|x| (x, FastHasher::new())),
                    what: RegionKind::Dense(d.name.clone()),
                });
            }
        }
        ShardKind::Experts => {
            for (index, c) in m.experts.iter().enumerate().filter(|(_, c)| c.shard == shard) {
                regions.push(Region {
                    start: c.offset,
                    end: c.offset + c.bytes,
                    expected: c.sha256.clone(),
                    hasher: Sha256::new(),
                    fast: c.xxh3.clone().map(|x| (x, FastHasher::new())),
                    what: RegionKind::Chunk { index },
                });
                if c.compression == Compression::None {
                    for t in &c.tensors {
                        regions.push(Region {
                            start: c.offset + t.offset,
                            end: c.offset + t.offset + t.bytes,
                            expected: t.sha256.clone(),
                            hasher: Sha256::new(),
                            fast: None,
                            what: RegionKind::ChunkTensor { index, proj: t.proj.as_str() },
                        });
                    }
                }
            }
        }
    }
    regions.sort_by_key(|r| r.start);

    let mut shard_hasher = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut pos = 0u64;
    let mut first_open = 0usize;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                problems.push(Problem::Io { file: file_name.clone(), error: e.to_string() });
                break;
            }
        };
        let block = &buf[..n];
        shard_hasher.update(block);
        let (b0, b1) = (pos, pos + n as u64);
        while first_open < regions.len() && regions[first_open].end <= b0 {
            first_open += 1;
        }
        for r in regions[first_open..].iter_mut() {
            if r.start >= b1 {
                break;
            }
            let s = r.start.max(b0);
            let e = r.end.min(b1);
            if s < e {
                r.hasher.update(&block[(s - b0) as usize..(e - b0) as usize]);
                if let Some((_, h)) = &mut r.fast {
                    h.update(&block[(s - b0) as usize..(e - b0) as usize]);
                }
            }
        }
        pos = b1;
        progress(n as u64);
    }
    if hex::encode(shard_hasher.finalize()) != entry.sha256 {
        problems.push(Problem::ShardChecksum { file: file_name.clone() });
    }

    // Name the bad dense tensors, and the bad expert chunks with the tensors inside them.
    let mut bad_chunks: Vec<(usize, Vec<String>)> = Vec::new();
    for r in regions {
        let fast_ok = r.fast.as_ref().is_none_or(|(x, h)| h.finish_hex() == *x);
        let ok = r.end <= pos && hex::encode(r.hasher.finalize()) == r.expected && fast_ok;
        if ok {
            continue;
        }
        match r.what {
            RegionKind::Dense(name) => {
                problems.push(Problem::DenseTensor { file: file_name.clone(), tensor: name })
            }
            RegionKind::Chunk { index } => {
                if !bad_chunks.iter().any(|(i, _)| *i == index) {
                    bad_chunks.push((index, Vec::new()));
                }
            }
            RegionKind::ChunkTensor { index, proj } => {
                match bad_chunks.iter_mut().find(|(i, _)| *i == index) {
                    Some((_, v)) => v.push(proj.to_string()),
                    None => bad_chunks.push((index, vec![proj.to_string()])),
                }
            }
        }
    }
    bad_chunks.sort_by_key(|(i, _)| *i);
    // A compressed chunk's hash covers what is stored; the tensors' hashes cover what it
    // decompresses to, so intact stored bytes are read once more and decompressed.
    for (index, c) in m.experts.iter().enumerate().filter(|(_, c)| c.shard == shard) {
        if c.compression == Compression::None || bad_chunks.iter().any(|(i, _)| *i == index) || c.offset + c.bytes > pos {
            continue;
        }
        match decompressed_tensors(&file, c) {
            Ok(bad) if bad.is_empty() => {}
            Ok(bad) => bad_chunks.push((index, bad)),
            Err(error) => {
                problems.push(Problem::ChunkContent { file: file_name.clone(), layer: c.layer, expert: c.expert, error })
            }
        }
    }
    bad_chunks.sort_by_key(|(i, _)| *i);
    for (index, tensors) in bad_chunks {
        let c = &m.experts[index];
        problems.push(Problem::ExpertChunk { file: file_name.clone(), layer: c.layer, expert: c.expert, tensors });
    }
    (pos, problems)
}

/// Decompress chunk `c` from `file` as a stream and hash its tensors: the projections whose
/// hashes differ, or why the stored bytes do not decompress to `raw_bytes`.
fn decompressed_tensors(file: &File, c: &super::manifest::ExpertChunk) -> std::result::Result<Vec<String>, String> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone().map_err(|e| e.to_string())?;
    f.seek(SeekFrom::Start(c.offset)).map_err(|e| e.to_string())?;
    let mut decoder = zstd::stream::read::Decoder::new(f.take(c.bytes)).map_err(|e| format!("does not decompress: {e}"))?;
    let mut hashers: Vec<Sha256> = c.tensors.iter().map(|_| Sha256::new()).collect();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Err(format!("does not decompress: {e}")),
        };
        let (b0, b1) = (pos, pos + n as u64);
        for (t, h) in c.tensors.iter().zip(&mut hashers) {
            let (s, e) = (t.offset.max(b0), (t.offset + t.bytes).min(b1));
            if s < e {
                h.update(&buf[(s - b0) as usize..(e - b0) as usize]);
            }
        }
        pos = b1;
    }
    if pos != c.raw_bytes {
        return Err(format!("decompresses to {pos} bytes, the manifest says {}", c.raw_bytes));
    }
    Ok(c.tensors
        .iter()
        .zip(hashers)
        .filter(|(t, h)| hex::encode(h.clone().finalize()) != t.sha256)
        .map(|(t, _)| t.proj.as_str().to_string())
        .collect())
}
