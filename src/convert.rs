//! The conversion pipeline: checkpoint -> quantized blocks -> shards -> manifest.
//!
//! The model is never held in memory. Every tensor is cut into pieces of about a million weights;
//! a producer thread quantizes a window of pieces at a time on the rayon pool while this thread
//! writes the previous window in order, hashing as it goes. Peak memory is therefore a few pieces
//! per thread, whatever the model's size.
//!
//! Crash safety and resume: each shard is written under a temporary name, fsynced and renamed;
//! then a record of what it holds goes to `.partial/`. A resumed run reuses a finished shard only
//! if its record matches this run's settings and its sha256 verifies. The manifest is written
//! last, so a directory with a manifest is a finished conversion.

use crate::calib::{quantize_row, Calibration};
use crate::checkpoint::{Proj, SourceTensor, Tensor, TensorSource};
use crate::error::{Error, IoContext, Result};
use crate::format::manifest::{
    CalibrationUsed, ChunkTensor, Compression, DenseEntry, ExpertChunk, ExpertMix, FileEntry, Manifest,
    QuantChoice, ShardEntry, ShardKind,
};
use crate::format::checksum::FastHasher;
use crate::format::writer::{fsync_dir, sha256_hex, tmp_path, write_atomic, ShardWriter};
use crate::format::{
    align_up, dense_shard_name, expert_shard_name, CHUNK_ALIGN, FORMAT_NAME, FORMAT_VERSION,
    MANIFEST_FILE, PARTIAL_DIR, TENSOR_ALIGN, TOKENIZER_FILE,
};
use crate::quant::QuantType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub experts: QuantType,
    pub dense: QuantType,
    pub threads: usize,
    pub resume: bool,
    pub compression: Compression,
    /// Upper bound on a shard's size (a single chunk larger than this gets a shard of its own).
    pub shard_bytes: u64,
    /// Column importances for the expert quantizers that take them, and what the manifest
    /// records of where they came from.
    pub calibration: Option<(Arc<Calibration>, CalibrationUsed)>,
    /// A type per expert, layer-major, in place of `experts` (what `--target-size` chose), and
    /// the target it was chosen for.
    pub expert_types: Option<(Vec<QuantType>, ExpertMix)>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            experts: QuantType::Q8_0,
            dense: QuantType::Bf16,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            resume: false,
            compression: Compression::None,
            shard_bytes: 4 << 30,
            calibration: None,
            expert_types: None,
        }
    }
}

/// What the pipeline tells its caller while it runs.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Conversion starts; `input_bytes` of tensor data will be read (less what is reused).
    Start { input_bytes: u64 },
    /// A finished shard from an earlier run verified and is reused.
    Reused { file: String, input_bytes: u64 },
    /// More input has been converted.
    Advance { input_bytes: u64 },
    ShardDone { file: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ConvertSummary {
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Raw bytes of the expert chunks and bytes stored for them (differ with compression).
    pub expert_raw_bytes: u64,
    pub expert_stored_bytes: u64,
    pub shards_written: usize,
    pub shards_reused: usize,
    /// q8_0 blocks written with the source's original int8 values and scales (ckpt-0 input),
    /// and q8_0 blocks written in total; the rest were quantized from the dequantized values.
    pub int8_blocks_kept: u64,
    pub q8_blocks: u64,
}

/// The work, planned in full before anything is written, so a resumed run plans identically.
struct Plan {
    items: Vec<Item>,
    shards: Vec<PlannedShard>,
}

struct Item {
    kind: ItemKind,
    /// The item's tensors with their qtype and offset inside the item.
    parts: Vec<Part>,
    raw_bytes: u64,
}

enum ItemKind {
    Dense(Tensor),
    Expert { layer: usize, expert: usize },
}

struct Part {
    tensor: Tensor,
    qtype: QuantType,
    shape: Vec<usize>,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    offset: u64,
    /// Zero bytes after this tensor up to the next one (inside an expert chunk).
    pad_after: u64,
    input_bytes: u64,
}

struct PlannedShard {
    file: String,
    kind: ShardKind,
    items: Vec<usize>,
}

/// What `.partial/<shard>.json` records about a finished shard.
#[derive(Serialize, Deserialize)]
struct ShardRecord {
    fingerprint: String,
    shard: ShardEntry,
    dense: Vec<DenseEntry>,
    experts: Vec<ExpertChunk>,
}

/// A slice of rows of one part, the unit of parallel work.
struct Piece {
    item: usize,
    part: usize,
    row0: usize,
    nrows: usize,
    last_of_part: bool,
}

struct PieceOut {
    /// Bytes to store (compressed when compression is on).
    stored: Vec<u8>,
    /// Raw bytes, kept only when they differ from `stored`.
    raw: Option<Vec<u8>>,
    /// q8_0 blocks that carry the source's own int8 values (see `keep_source_int8`).
    int8_blocks_kept: u64,
}

const PIECE_WEIGHTS: usize = 1 << 20;
/// How far ahead of the quantizers input reads are requested (in weights: 64 Mi = 128 MB bf16).
const PREFETCH_WEIGHTS: usize = 64 << 20;

fn elem_bytes(s: &SourceTensor) -> u64 {
    match s.dtype.as_str() {
        "f32" => 4,
        "int8+scales" | "i8" => 1,
        _ => 2,
    }
}

fn qtype_for(t: Tensor, opts: &ConvertOptions, n_experts: usize) -> QuantType {
    match t {
        _ if t.keeps_f32() => QuantType::F32,
        Tensor::Expert { layer, expert, .. } => match &opts.expert_types {
            Some((types, _)) => types[layer * n_experts + expert],
            None => opts.experts,
        },
        _ => opts.dense,
    }
}

/// Bytes a conversion with `opts` writes, planned without reading a weight: the dense shards,
/// and each expert's chunk with its alignment (layer-major). An upper bound on the shards'
/// sizes: every item is counted padded to the chunk alignment.
pub fn planned_bytes(src: &dyn TensorSource, opts: &ConvertOptions) -> Result<(u64, Vec<u64>)> {
    let plan = plan(src, opts)?;
    let (mut dense, mut experts) = (0u64, Vec::new());
    for item in &plan.items {
        let b = align_up(item.raw_bytes, CHUNK_ALIGN);
        match item.kind {
            ItemKind::Dense(_) => dense += b,
            ItemKind::Expert { .. } => experts.push(b),
        }
    }
    Ok((dense, experts))
}

fn plan(src: &dyn TensorSource, opts: &ConvertOptions) -> Result<Plan> {
    let c = src.config();
    let make_part = |t: Tensor| -> Result<Part> {
        let s = src.tensor(t).ok_or_else(|| Error::bad_tensor(t.to_string(), "missing"))?;
        let (rows, cols) = (s.rows(), s.cols());
        let qtype = qtype_for(t, opts, c.n_experts).for_row(cols);
        let row_bytes = qtype.row_bytes(cols).ok_or_else(|| {
            Error::bad_tensor(
                t.to_string(),
                format!("{cols} inputs per row is not a multiple of the {qtype} block size {}", qtype.block_len()),
            )
        })?;
        Ok(Part {
            tensor: t,
            qtype,
            shape: s.shape.clone(),
            rows,
            cols,
            row_bytes,
            offset: 0,
            pad_after: 0,
            input_bytes: (rows * cols) as u64 * elem_bytes(s),
        })
    };
    let mut items = Vec::new();
    for t in Tensor::dense(c) {
        let p = make_part(t)?;
        let raw = (p.rows * p.row_bytes) as u64;
        items.push(Item { kind: ItemKind::Dense(t), parts: vec![p], raw_bytes: raw });
    }
    for layer in 0..c.n_layers {
        for expert in 0..c.n_experts {
            let mut parts = Vec::new();
            let mut off = 0u64;
            for proj in Proj::ALL {
                let mut p = make_part(Tensor::Expert { layer, expert, proj })?;
                p.offset = off;
                off += (p.rows * p.row_bytes) as u64;
                parts.push(p);
                if proj != Proj::Down {
                    let next = align_up(off, TENSOR_ALIGN);
                    parts.last_mut().unwrap().pad_after = next - off;
                    off = next;
                }
            }
            items.push(Item { kind: ItemKind::Expert { layer, expert }, parts, raw_bytes: off });
        }
    }
    // Shards: consecutive items of one kind, bounded by raw size (known before compressing, so
    // the plan never depends on how well a chunk compresses).
    let mut shards: Vec<PlannedShard> = Vec::new();
    let (mut n_dense, mut n_exp) = (0, 0);
    let mut cur_bytes = 0u64;
    for (i, item) in items.iter().enumerate() {
        let kind = match item.kind {
            ItemKind::Dense(_) => ShardKind::Dense,
            ItemKind::Expert { .. } => ShardKind::Experts,
        };
        let size = align_up(item.raw_bytes, CHUNK_ALIGN);
        let fits = shards.last().is_some_and(|s| {
            s.kind == kind && (s.items.is_empty() || cur_bytes + size <= opts.shard_bytes)
        });
        if !fits {
            let file = match kind {
                ShardKind::Dense => { n_dense += 1; dense_shard_name(n_dense - 1) }
                ShardKind::Experts => { n_exp += 1; expert_shard_name(n_exp - 1) }
            };
            shards.push(PlannedShard { file, kind, items: Vec::new() });
            cur_bytes = 0;
        }
        shards.last_mut().unwrap().items.push(i);
        cur_bytes += size;
    }
    Ok(Plan { items, shards })
}

fn fingerprint(src: &dyn TensorSource, opts: &ConvertOptions) -> String {
    let tensors: Vec<(String, &Vec<usize>, &str)> =
        src.tensors().iter().map(|s| (s.tensor.to_string(), &s.shape, s.dtype.as_str())).collect();
    let mut v = serde_json::json!({
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "experts": opts.experts, "dense": opts.dense, "compression": opts.compression,
        "shard_bytes": opts.shard_bytes, "config": src.config(), "tensors": tensors,
    });
    // Only when used, so that a plain conversion's fingerprint is what it always was.
    if let Some((_, used)) = &opts.calibration {
        v["calibration"] = serde_json::json!(used.sha256);
    }
    if let Some((types, _)) = &opts.expert_types {
        v["expert_types"] = serde_json::json!(types);
    }
    sha256_hex(v.to_string().as_bytes())
}

fn pieces_of(plan: &Plan, item: usize) -> Vec<Piece> {
    let mut out = Vec::new();
    for (pi, p) in plan.items[item].parts.iter().enumerate() {
        let step = (PIECE_WEIGHTS / p.cols).max(1);
        let mut r = 0;
        while r < p.rows {
            let n = step.min(p.rows - r);
            out.push(Piece { item, part: pi, row0: r, nrows: n, last_of_part: r + n == p.rows });
            r += n;
        }
    }
    out
}

/// Read, check and quantize one piece.
fn run_piece(
    src: &dyn TensorSource,
    plan: &Plan,
    pc: &Piece,
    compression: Compression,
    calibration: Option<&Calibration>,
) -> Result<PieceOut> {
    let part = &plan.items[pc.item].parts[pc.part];
    let mut rows = vec![0f32; pc.nrows * part.cols];
    src.read_rows(part.tensor, pc.row0, &mut rows)?;
    src.done_with_rows(part.tensor, pc.row0, pc.nrows);
    // x * 0 is NaN exactly for NaN and infinities; the sum vectorizes, the search runs only on
    // a bad piece.
    let any_bad = rows.iter().fold(0f32, |acc, &x| acc + x * 0.0).is_nan();
    if let Some(i) = any_bad.then(|| rows.iter().position(|x| !x.is_finite())).flatten() {
        return Err(Error::bad_tensor(
            part.tensor.to_string(),
            format!(
                "non-finite weight {} at row {}, column {}",
                rows[i],
                pc.row0 + i / part.cols,
                i % part.cols
            ),
        ));
    }
    let pad = if pc.last_of_part { part.pad_after as usize } else { 0 };
    let mut raw = vec![0u8; pc.nrows * part.row_bytes + pad];
    let importance = match (calibration, part.tensor) {
        (Some(c), Tensor::Expert { layer, expert, proj }) => c.importance(layer, expert, proj),
        _ => None,
    };
    for (x, out) in rows.chunks_exact(part.cols).zip(raw.chunks_exact_mut(part.row_bytes)) {
        quantize_row(part.qtype, x, importance, out);
    }
    let mut kept = 0;
    if part.qtype == QuantType::Q8_0 {
        kept = keep_source_int8(src, part, pc, &mut raw)?;
    }
    let is_expert = matches!(plan.items[pc.item].kind, ItemKind::Expert { .. });
    if compression == Compression::Zstd && is_expert {
        // Each piece is an independent zstd frame; a chunk is their concatenation, which a
        // zstd decoder reads as one stream.
        let stored = zstd::bulk::compress(&raw, 3)
            .map_err(|e| Error::Invalid(format!("zstd compression failed: {e}")))?;
        Ok(PieceOut { stored, raw: Some(raw), int8_blocks_kept: kept })
    } else {
        Ok(PieceOut { stored: raw, raw: None, int8_blocks_kept: kept })
    }
}

/// For a source stored as int8 with per-group scales (the release's ckpt-0), overwrite the
/// freshly quantized q8_0 blocks of this piece with the source's own int8 values and scales
/// wherever a block lies inside one scale group and the scale is exact in f16, so no weight is
/// rounded twice. Blocks where that does not hold keep the quantization from the dequantized
/// values. Returns the number of blocks kept.
fn keep_source_int8(src: &dyn TensorSource, part: &Part, pc: &Piece, raw: &mut [u8]) -> Result<u64> {
    const QK: usize = crate::quant::QK;
    let Some(groups) = src.int8_groups(part.tensor) else { return Ok(0) };
    let group_len = part.cols / groups.max(1);
    if groups == 0 || part.cols % groups != 0 || group_len % QK != 0 {
        return Ok(0);
    }
    let mut q = vec![0i8; pc.nrows * part.cols];
    let mut scales = vec![0f32; pc.nrows * groups];
    if !src.read_rows_int8(part.tensor, pc.row0, &mut q, &mut scales)? {
        return Ok(0);
    }
    let mut kept = 0;
    let block_bytes = QuantType::Q8_0.block_bytes();
    for r in 0..pc.nrows {
        for b in 0..part.cols / QK {
            let s = scales[r * groups + b * QK / group_len];
            let d = half::f16::from_f32(s);
            if d.to_f32() != s {
                continue;
            }
            let out = &mut raw[r * part.row_bytes + b * block_bytes..][..block_bytes];
            out[..2].copy_from_slice(&d.to_le_bytes());
            for (o, &v) in out[2..].iter_mut().zip(&q[r * part.cols + b * QK..][..QK]) {
                *o = v as u8;
            }
            kept += 1;
        }
    }
    Ok(kept)
}

/// Convert `src` into the chunked format in `dst`.
pub fn convert(
    src: &dyn TensorSource,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ConvertSummary> {
    for q in [opts.experts, opts.dense] {
        if q == QuantType::F32 {
            return Err(Error::Invalid("f32 is not offered for weights; use bf16 for lossless".into()));
        }
    }
    prepare_destination(dst, opts.resume)?;
    let plan = plan(src, opts)?;
    let fp = fingerprint(src, opts);
    let partial = dst.join(PARTIAL_DIR);
    std::fs::create_dir_all(&partial).at(&partial)?;

    // Which shards an earlier run finished (and which verify).
    let mut records: Vec<Option<ShardRecord>> = Vec::new();
    for s in &plan.shards {
        records.push(if opts.resume { reusable(dst, &partial, &s.file, &fp)? } else { None });
    }
    let total_input: u64 = plan.items.iter().flat_map(|i| &i.parts).map(|p| p.input_bytes).sum();
    progress(Progress::Start { input_bytes: total_input });
    for (s, r) in plan.shards.iter().zip(&records) {
        if r.is_some() {
            let input = s.items.iter().flat_map(|&i| &plan.items[i].parts).map(|p| p.input_bytes).sum();
            progress(Progress::Reused { file: s.file.clone(), input_bytes: input });
        }
    }

    let todo: Vec<usize> = (0..plan.shards.len()).filter(|&i| records[i].is_none()).collect();
    let pieces: Vec<Piece> = todo
        .iter()
        .flat_map(|&s| plan.shards[s].items.iter().flat_map(|&i| pieces_of(&plan, i)).collect::<Vec<_>>())
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start {} threads: {e}", opts.threads)))?;
    let window = 2 * opts.threads.max(1);
    let (tx, rx) = sync_channel::<Result<PieceOut>>(window);
    let crash_after: Option<usize> =
        std::env::var("GROK1_CRASH_AFTER_PIECES").ok().and_then(|v| v.parse().ok());

    let mut written = Vec::new();
    let mut int8_blocks_kept = 0u64;
    std::thread::scope(|scope| -> Result<()> {
        // Owned here so that an early error return drops it and unblocks the producer.
        let rx = rx;
        let plan_ref = &plan;
        let pieces_ref = &pieces;
        let compression = opts.compression;
        let calibration = opts.calibration.as_ref().map(|(c, _)| &**c);
        scope.spawn(move || {
            // Input is requested this many pieces ahead of the window being quantized, so the
            // disk reads while we compute.
            let ahead = (PREFETCH_WEIGHTS / PIECE_WEIGHTS).max(window);
            let mut prefetched = 0usize;
            for (w, batch) in pieces_ref.chunks(window).enumerate() {
                let want = ((w + 1) * window + ahead).min(pieces_ref.len());
                for pc in &pieces_ref[prefetched.min(want)..want] {
                    let part = &plan_ref.items[pc.item].parts[pc.part];
                    src.prefetch_rows(part.tensor, pc.row0, pc.nrows);
                }
                prefetched = prefetched.max(want);
                let outs: Vec<Result<PieceOut>> = pool.install(|| {
                    batch.par_iter().map(|pc| run_piece(src, plan_ref, pc, compression, calibration)).collect()
                });
                for o in outs {
                    let failed = o.is_err();
                    if tx.send(o).is_err() || failed {
                        return;
                    }
                }
            }
        });

        let mut next_piece = 0usize;
        for &si in &todo {
            let shard = &plan.shards[si];
            let path = dst.join(&shard.file);
            let mut w = ShardWriter::create(&path)?;
            let mut rec = ShardRecord {
                fingerprint: fp.clone(),
                shard: ShardEntry { file: shard.file.clone(), kind: shard.kind, bytes: 0, sha256: String::new() },
                dense: Vec::new(),
                experts: Vec::new(),
            };
            for &ii in &shard.items {
                let item = &plan.items[ii];
                w.pad_to(CHUNK_ALIGN)?;
                let start = w.pos();
                let mut item_hash = Sha256::new();
                let mut item_xxh3 = FastHasher::new();
                let is_expert = matches!(item.kind, ItemKind::Expert { .. });
                let mut tensors = Vec::new();
                for (pi, part) in item.parts.iter().enumerate() {
                    let mut th = Sha256::new();
                    loop {
                        let pc = &pieces[next_piece];
                        debug_assert!(pc.item == ii && pc.part == pi);
                        let out = rx.recv().map_err(|_| Error::Invalid("quantization stopped".into()))??;
                        int8_blocks_kept += out.int8_blocks_kept;
                        let stored = Arc::new(out.stored);
                        w.write_shared(stored.clone())?;
                        item_xxh3.update(&stored[..]);
                        let raw = out.raw.as_deref().unwrap_or(&stored);
                        let tensor_bytes = (pc.nrows * part.row_bytes).min(raw.len());
                        th.update(&raw[..tensor_bytes]);
                        if is_expert {
                            // A dense item is one tensor: its hash is the tensor's.
                            item_hash.update(&stored[..]);
                        }
                        progress(Progress::Advance {
                            input_bytes: part.input_bytes * pc.nrows as u64 / part.rows as u64,
                        });
                        next_piece += 1;
                        if crash_after == Some(next_piece) {
                            // Crash injection for the resume tests: die like a killed process.
                            std::process::abort();
                        }
                        if pc.last_of_part {
                            break;
                        }
                    }
                    tensors.push((part, hex::encode(th.finalize())));
                }
                let stored = w.pos() - start;
                let item_sha = if is_expert { hex::encode(item_hash.finalize()) } else { tensors[0].1.clone() };
                match item.kind {
                    ItemKind::Dense(t) => {
                        let (part, _) = &tensors[0];
                        rec.dense.push(DenseEntry {
                            name: t.to_string(),
                            qtype: part.qtype,
                            shape: shape_of(part),
                            shard: si,
                            offset: start,
                            bytes: stored,
                            sha256: item_sha,
                            xxh3: Some(item_xxh3.finish_hex()),
                        })
                    }
                    ItemKind::Expert { layer, expert } => rec.experts.push(ExpertChunk {
                        layer,
                        expert,
                        shard: si,
                        offset: start,
                        bytes: stored,
                        raw_bytes: item.raw_bytes,
                        compression: opts.compression,
                        sha256: item_sha,
                        xxh3: Some(item_xxh3.finish_hex()),
                        tensors: tensors
                            .iter()
                            .map(|(p, h)| ChunkTensor {
                                proj: match p.tensor {
                                    Tensor::Expert { proj, .. } => proj.into(),
                                    _ => unreachable!("expert chunks hold expert tensors"),
                                },
                                qtype: p.qtype,
                                shape: shape_of(p),
                                offset: p.offset,
                                bytes: (p.rows * p.row_bytes) as u64,
                                sha256: h.clone(),
                            })
                            .collect(),
                    }),
                }
            }
            let (bytes, sha) = w.finish()?;
            rec.shard.bytes = bytes;
            rec.shard.sha256 = sha;
            let rec_path = partial.join(format!("{}.json", shard.file));
            write_atomic(&rec_path, &serde_json::to_vec_pretty(&rec).unwrap())?;
            progress(Progress::ShardDone { file: shard.file.clone() });
            written.push(si);
            records[si] = Some(rec);
        }
        Ok(())
    })?;

    // Assemble the manifest from the shard records, in plan order.
    let mut shards = Vec::new();
    let mut dense = Vec::new();
    let mut experts = Vec::new();
    for r in records.into_iter() {
        let r = r.expect("every shard is written or reused");
        shards.push(r.shard);
        dense.extend(r.dense);
        experts.extend(r.experts);
    }
    let tokenizer = match src.tokenizer_path() {
        Some(p) => {
            let bytes = std::fs::read(&p).at(&p)?;
            write_atomic(&dst.join(TOKENIZER_FILE), &bytes)?;
            Some(FileEntry { file: TOKENIZER_FILE.into(), bytes: bytes.len() as u64, sha256: sha256_hex(&bytes) })
        }
        None => None,
    };
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        config: src.config().clone(),
        quant: QuantChoice { dense: opts.dense, experts: main_expert_type(opts), compression: opts.compression },
        source: src.describe(),
        chunk_align: CHUNK_ALIGN,
        shards,
        dense,
        experts,
        tokenizer,
        calibration: opts.calibration.as_ref().map(|(_, used)| used.clone()),
        expert_mix: opts.expert_types.as_ref().map(|(_, mix)| mix.clone()),
    };
    manifest.check_consistent().map_err(|e| Error::Invalid(format!("internal: inconsistent manifest: {e}")))?;
    write_atomic(&dst.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&manifest).unwrap())?;
    std::fs::remove_dir_all(&partial).at(&partial)?;
    fsync_dir(dst)?;

    let output_bytes = manifest.shards.iter().map(|s| s.bytes).sum();
    Ok(ConvertSummary {
        input_bytes: total_input,
        output_bytes,
        expert_raw_bytes: manifest.experts.iter().map(|c| c.raw_bytes).sum(),
        expert_stored_bytes: manifest.experts.iter().map(|c| c.bytes).sum(),
        shards_written: written.len(),
        shards_reused: manifest.shards.len() - written.len(),
        int8_blocks_kept,
        q8_blocks: plan
            .items
            .iter()
            .flat_map(|i| &i.parts)
            .filter(|p| p.qtype == QuantType::Q8_0)
            .map(|p| (p.rows * p.cols / crate::quant::QK) as u64)
            .sum(),
    })
}

/// The expert type the manifest names: the one asked for, or with a mix the one most experts
/// have (the first candidate on ties); each tensor records its own.
fn main_expert_type(opts: &ConvertOptions) -> QuantType {
    let Some((types, mix)) = &opts.expert_types else { return opts.experts };
    let count = |q: &QuantType| types.iter().filter(|t| *t == q).count();
    let mut best = mix.candidates.first().copied().unwrap_or(opts.experts);
    for q in &mix.candidates {
        if count(q) > count(&best) {
            best = *q;
        }
    }
    best
}

fn shape_of(p: &Part) -> Vec<usize> {
    p.shape.clone()
}

/// Refuse to mix a conversion into a non-empty directory unless resuming; clear temporaries of
/// a killed run.
fn prepare_destination(dst: &Path, resume: bool) -> Result<()> {
    if dst.exists() {
        let entries: Vec<PathBuf> = std::fs::read_dir(dst).at(dst)?.flatten().map(|e| e.path()).collect();
        if !entries.is_empty() && !resume {
            return Err(Error::bad_file(
                dst,
                "destination is not empty: choose an empty directory, or pass --resume to continue an interrupted conversion",
            ));
        }
        if dst.join(MANIFEST_FILE).exists() {
            return Err(Error::bad_file(
                dst,
                "destination already holds a finished conversion (manifest.json); remove it to convert again",
            ));
        }
        for p in entries {
            if p.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&p).at(&p)?;
            }
        }
    } else {
        std::fs::create_dir_all(dst).at(dst)?;
    }
    // Fail early, with the path, if we cannot write here.
    let probe = tmp_path(&dst.join(".write-probe"));
    std::fs::write(&probe, b"").at(&probe)?;
    std::fs::remove_file(&probe).at(&probe)?;
    Ok(())
}

/// A finished shard from an earlier run, if its record matches and its bytes verify.
fn reusable(dst: &Path, partial: &Path, file: &str, fp: &str) -> Result<Option<ShardRecord>> {
    let rec_path = partial.join(format!("{file}.json"));
    let Ok(text) = std::fs::read(&rec_path) else { return Ok(None) };
    let Ok(rec) = serde_json::from_slice::<ShardRecord>(&text) else { return Ok(None) };
    if rec.fingerprint != fp || rec.shard.file != file {
        return Ok(None);
    }
    let path = dst.join(file);
    let Ok(meta) = std::fs::metadata(&path) else { return Ok(None) };
    if meta.len() != rec.shard.bytes {
        return Ok(None);
    }
    let mut f = std::fs::File::open(&path).at(&path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).at(&path)?;
    Ok((hex::encode(h.finalize()) == rec.shard.sha256).then_some(rec))
}
