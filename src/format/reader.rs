//! Opening a converted model: the manifest, memory-mapped shards, and one-read access to an
//! expert chunk.

use super::checksum::{self, Checked, Origin};
use super::manifest::{Compression, ExpertChunk, Manifest, ShardKind};
use super::{MANIFEST_FILE, TOKENIZER_FILE};
use crate::config::GrokConfig;
use crate::error::{Error, IoContext, Result};
use crate::quant::QuantType;
use memmap2::Mmap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};

pub struct ConvertedModel {
    pub dir: PathBuf,
    pub manifest: Manifest,
    files: Vec<File>,
    maps: Vec<OnceLock<Mmap>>,
    /// Index into `manifest.experts` by `layer * n_experts + expert`.
    expert_index: Vec<usize>,
    /// Check dense tensors as they are handed out, and bytes without an `xxh3` against sha256
    /// (`--verify-load`).
    verify_all: AtomicBool,
    /// Says once that expert reads of this model go unchecked.
    unchecked_warning: Once,
}

/// A dense tensor viewed in place.
pub struct DenseView<'a> {
    pub qtype: QuantType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl ConvertedModel {
    pub fn open(dir: &Path) -> Result<ConvertedModel> {
        let mpath = dir.join(MANIFEST_FILE);
        if !mpath.exists() {
            return Err(Error::bad_file(
                &mpath,
                "missing: not a converted model, or its conversion did not finish",
            ));
        }
        let manifest = Manifest::load(&mpath)?;
        let mut files = Vec::new();
        for s in &manifest.shards {
            let p = dir.join(&s.file);
            let f = File::open(&p).at(&p)?;
            let len = f.metadata().at(&p)?.len();
            if len != s.bytes {
                return Err(Error::bad_file(
                    &p,
                    format!("{len} bytes, the manifest says {} (truncated or replaced)", s.bytes),
                ));
            }
            files.push(f);
        }
        let n_e = manifest.config.n_experts;
        let mut expert_index = vec![usize::MAX; manifest.config.n_layers * n_e];
        for (i, c) in manifest.experts.iter().enumerate() {
            expert_index[c.layer * n_e + c.expert] = i;
        }
        let maps = (0..files.len()).map(|_| OnceLock::new()).collect();
        Ok(ConvertedModel {
            dir: dir.to_path_buf(),
            manifest,
            files,
            maps,
            expert_index,
            verify_all: AtomicBool::new(false),
            unchecked_warning: Once::new(),
        })
    }

    /// Check everything handed out from now on: each dense tensor by `dense` (against its
    /// `xxh3`, or its sha256 in older models), and expert chunks without an `xxh3` against
    /// their sha256. Expert chunks with an `xxh3` are checked on every read regardless.
    pub fn set_verify_all(&self, on: bool) {
        self.verify_all.store(on, Ordering::Relaxed);
    }

    pub fn verifies_all(&self) -> bool {
        self.verify_all.load(Ordering::Relaxed)
    }

    /// Check the stored bytes of `chunk` just read from its shard, before anything decodes them.
    pub fn check_expert(&self, chunk: &ExpertChunk, stored: &[u8]) -> Result<()> {
        let file = self.shard_path(chunk.shard);
        let what = format!("expert chunk (layer {}, expert {})", chunk.layer, chunk.expert);
        let origin = Origin { file: &file, what: &what, offset: chunk.offset };
        let sha = self.verifies_all().then_some(chunk.sha256.as_str());
        if checksum::check(&origin, chunk.xxh3.as_deref(), sha, stored)? == Checked::Nothing {
            self.unchecked_warning.call_once(|| {
                eprintln!(
                    "warning: {}: no xxh3 checksums (converted by an older version): expert reads are \
                     not checked; --verify-load checks them against sha256, or convert again",
                    self.dir.join(MANIFEST_FILE).display()
                )
            });
        }
        Ok(())
    }

    pub fn config(&self) -> &GrokConfig {
        &self.manifest.config
    }

    pub fn shard_path(&self, shard: usize) -> PathBuf {
        self.dir.join(&self.manifest.shards[shard].file)
    }

    fn map(&self, shard: usize) -> Result<&Mmap> {
        if let Some(m) = self.maps[shard].get() {
            return Ok(m);
        }
        // SAFETY: shards are immutable once renamed into place; the manifest's checksums let
        // `verify` detect outside modification.
        let m = unsafe { Mmap::map(&self.files[shard]) }.at(self.shard_path(shard))?;
        Ok(self.maps[shard].get_or_init(|| m))
    }

    /// A dense tensor by canonical name, in place in its memory-mapped shard.
    pub fn dense(&self, name: &str) -> Result<DenseView<'_>> {
        let e = self
            .manifest
            .dense_entry(name)
            .ok_or_else(|| Error::bad_tensor(name, "not in the manifest"))?;
        let map = self.map(e.shard)?;
        let expect = e
            .qtype
            .row_bytes(*e.shape.last().unwrap())
            .map(|rb| rb as u64 * e.shape.iter().rev().skip(1).product::<usize>() as u64);
        if expect != Some(e.bytes) {
            return Err(Error::bad_tensor(
                name,
                format!("{} bytes do not hold a {} tensor of shape {:?}", e.bytes, e.qtype, e.shape),
            ));
        }
        let bytes = &map[e.offset as usize..(e.offset + e.bytes) as usize];
        if self.verifies_all() {
            let file = self.shard_path(e.shard);
            let what = format!("tensor {name}");
            let origin = Origin { file: &file, what: &what, offset: e.offset };
            checksum::check(&origin, e.xxh3.as_deref(), Some(&e.sha256), bytes)?;
        }
        Ok(DenseView { qtype: e.qtype, shape: &e.shape, bytes })
    }

    /// Drop the pages of every mapped shard from this process's memory (they are re-read from
    /// the file if touched again): after the dense weights have been copied into their runtime
    /// layout, the mapped copy would otherwise count twice against the memory the model uses.
    pub fn release_mapped_pages(&self) {
        for m in self.maps.iter().filter_map(|m| m.get()) {
            // SAFETY: read-only file mappings; dropped pages are re-read from the file.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// `release_mapped_pages` for one dense tensor's bytes, once they have been copied.
    pub fn release_dense(&self, name: &str) {
        let Some(e) = self.manifest.dense_entry(name) else { return };
        let Some(m) = self.maps[e.shard].get() else { return };
        let page = 4096u64;
        let (start, end) = (e.offset.div_ceil(page) * page, (e.offset + e.bytes) / page * page);
        if end > start {
            // SAFETY: as in `release_mapped_pages`.
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start as usize, (end - start) as usize)
            };
        }
    }

    pub fn expert_chunk(&self, layer: usize, expert: usize) -> &ExpertChunk {
        &self.manifest.experts[self.expert_index[layer * self.manifest.config.n_experts + expert]]
    }

    pub fn expert_file(&self, chunk: &ExpertChunk) -> &File {
        &self.files[chunk.shard]
    }

    /// Read one expert chunk with a single positioned read (decompressing if needed) into
    /// `out`, which is resized to the raw chunk size.
    pub fn read_expert(&self, layer: usize, expert: usize, out: &mut Vec<u8>) -> Result<()> {
        let c = self.expert_chunk(layer, expert);
        let file = &self.files[c.shard];
        match c.compression {
            Compression::None => {
                out.resize(c.raw_bytes as usize, 0);
                file.read_exact_at(out, c.offset).at(self.shard_path(c.shard))?;
                self.check_expert(c, out)?;
            }
            Compression::Zstd => {
                let mut stored = vec![0u8; c.bytes as usize];
                file.read_exact_at(&mut stored, c.offset).at(self.shard_path(c.shard))?;
                self.check_expert(c, &stored)?;
                out.clear();
                out.reserve(c.raw_bytes as usize);
                zstd::stream::copy_decode(&stored[..], &mut *out).map_err(|e| {
                    Error::bad_file(
                        self.shard_path(c.shard),
                        format!("expert chunk (layer {layer}, expert {expert}) does not decompress: {e}"),
                    )
                })?;
                if out.len() as u64 != c.raw_bytes {
                    return Err(Error::bad_file(
                        self.shard_path(c.shard),
                        format!(
                            "expert chunk (layer {layer}, expert {expert}) decompresses to {} bytes, expected {}",
                            out.len(),
                            c.raw_bytes
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Bytes of the expert chunks and of the dense tensors, as stored.
    pub fn stored_bytes(&self) -> (u64, u64) {
        let dense = self.manifest.shards.iter().filter(|s| s.kind == ShardKind::Dense).map(|s| s.bytes).sum();
        let experts = self.manifest.shards.iter().filter(|s| s.kind == ShardKind::Experts).map(|s| s.bytes).sum();
        (dense, experts)
    }

    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        self.manifest.tokenizer.as_ref().map(|_| self.dir.join(TOKENIZER_FILE))
    }
}
