//! Reading one expert chunk from its shard: three ways to do the same read, and control of the
//! kernel's page cache so that it never keeps what the RAM budget leaves out.
//!
//! * `Pread`: buffered `pread` of the whole chunk, then `POSIX_FADV_DONTNEED` on its range, so the
//!   page cache copy is dropped once our own copy exists.
//! * `Direct`: `O_DIRECT` `pread` into a 4096-aligned buffer (chunks start on 4096-byte
//!   boundaries, see `format::CHUNK_ALIGN`); the page cache is bypassed altogether. Falls back to
//!   `Pread` where the file system refuses `O_DIRECT`.
//! * `Mmap`: the shard is mapped; `MADV_WILLNEED` on the chunk's range starts the kernel's reads,
//!   the copy into the matrices faults the rest in, then `MADV_DONTNEED` unmaps the pages from
//!   this process and `POSIX_FADV_DONTNEED` drops them from the page cache.
//!
//! Readahead is turned off for `Pread` and `Mmap` (`POSIX_FADV_RANDOM`, `MADV_RANDOM`): with it,
//! the kernel reads up to `read_ahead_kb` past each chunk, and those pages, which belong to other
//! experts, stay in the page cache outside the budget (measured: 1.2-1.4 GB of a 5.1 GB model
//! after one pass over every chunk).
//!
//! Measured by `benches/residency.rs` (every chunk of a 5.1 GB q8_0 model once, random order,
//! cold cache, 26.7 MB chunks, a virtual disk doing 1.0 GB/s sequential with O_DIRECT and
//! 0.65 GB/s buffered; runs vary by about 20%):
//!
//! | path                           | 1 thread   | 4 threads  | page cache left |
//! |--------------------------------|------------|------------|-----------------|
//! | `Direct`                       | 0.74-0.87  | 1.09-1.29  | 0               |
//! | `Pread` (WILLNEED, no readahead) | 0.58-0.66 | 0.78-0.95 | 0               |
//! | `Mmap` (no readahead)          | 0.07-0.08  | 0.14-0.19  | 0               |
//! | pread, kernel readahead        | 0.89-1.11  | 1.11       | 1.4 GB          |
//! | mmap, kernel readahead         | 0.84-1.05  |            | 1.2 GB          |
//!
//! (GB/s.) `Direct` is the fastest path that keeps the page cache clean, hence the default; with
//! readahead off, faults on a mapping read 4 KiB at a time, which makes `Mmap` unusable here.

use crate::error::{Error, IoContext, Result};
use crate::format::manifest::{Compression, ExpertChunk};
use crate::format::ConvertedModel;
use memmap2::Mmap;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::str::FromStr;

/// Alignment of `O_DIRECT` buffers, offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPath {
    Pread,
    Direct,
    Mmap,
}

impl FromStr for ReadPath {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pread" => Ok(ReadPath::Pread),
            "direct" | "o_direct" => Ok(ReadPath::Direct),
            "mmap" => Ok(ReadPath::Mmap),
            _ => Err(format!("unknown read path `{s}` (expected pread, direct or mmap)")),
        }
    }
}

impl ReadPath {
    pub fn name(self) -> &'static str {
        match self {
            ReadPath::Pread => "pread",
            ReadPath::Direct => "direct",
            ReadPath::Mmap => "mmap",
        }
    }
}

/// The buffers reads land in: page-aligned, as `O_DIRECT` needs.
pub use crate::kernels::AlignedBuf;
const _: () = assert!(AlignedBuf::ALIGN % DIRECT_ALIGN == 0);

fn fadvise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    // SAFETY: plain syscall on a valid descriptor; failure only means the hint was ignored.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset as libc::off_t, len as libc::off_t, advice);
    }
}

/// Drop a byte range of `file` from the page cache (clean pages only; ours always are).
pub fn drop_page_cache(file: &File, offset: u64, len: u64) {
    fadvise(file, offset, len, libc::POSIX_FADV_DONTNEED);
}

/// Drop every page of the file at `path` from the page cache: how the benchmark and the tests get
/// a cold cache without the privileges `drop_caches` needs.
pub fn drop_file_cache(path: &Path) -> Result<()> {
    let f = File::open(path).at(path)?;
    drop_page_cache(&f, 0, 0);
    Ok(())
}

/// Bytes of `path` currently in the page cache (by `mincore` over a fresh mapping).
pub fn cached_bytes(path: &Path) -> Result<u64> {
    let f = File::open(path).at(path)?;
    let len = f.metadata().at(path)?.len() as usize;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: read-only mapping of a file we only inspect; never dereferenced.
    let map = unsafe { Mmap::map(&f) }.at(path)?;
    let page = page_size();
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: the mapping covers `len` bytes and `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64)
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// Reads expert chunks of one converted model by one of the read paths. Shared by all I/O
/// threads; each thread brings its own buffer.
pub struct ChunkReader {
    path: ReadPath,
    /// `O_DIRECT` descriptors per shard (`Direct` only; `None` for dense shards).
    direct: Vec<Option<File>>,
    /// Mappings per shard (`Mmap` only; `None` for dense shards).
    maps: Vec<Option<Mmap>>,
}

impl ChunkReader {
    /// Open the shards for `path`. Returns the path actually used: `Direct` becomes `Pread` where
    /// the file system does not support `O_DIRECT`.
    pub fn open(model: &ConvertedModel, path: ReadPath) -> Result<ChunkReader> {
        let n = model.manifest.shards.len();
        let expert_shards: Vec<bool> = (0..n)
            .map(|s| model.manifest.shards[s].kind == crate::format::ShardKind::Experts)
            .collect();
        let mut r = ChunkReader { path, direct: (0..n).map(|_| None).collect(), maps: (0..n).map(|_| None).collect() };
        match path {
            ReadPath::Pread => {
                // Whole chunks are read in one call: kernel readahead past a chunk would only
                // leave pages in the cache that nobody drops.
                let mut done = vec![false; n];
                for c in &model.manifest.experts {
                    if !std::mem::replace(&mut done[c.shard], true) {
                        fadvise(model.expert_file(c), 0, 0, libc::POSIX_FADV_RANDOM);
                    }
                }
            }
            ReadPath::Direct => {
                for s in (0..n).filter(|&s| expert_shards[s]) {
                    let p = model.shard_path(s);
                    match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p) {
                        Ok(f) => r.direct[s] = Some(f),
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            r.path = ReadPath::Pread;
                            r.direct.iter_mut().for_each(|d| *d = None);
                            break;
                        }
                        Err(e) => return Err(Error::io(p, e)),
                    }
                }
            }
            ReadPath::Mmap => {
                for s in (0..n).filter(|&s| expert_shards[s]) {
                    let f = File::open(model.shard_path(s)).at(model.shard_path(s))?;
                    // SAFETY: shards are immutable once written (the manifest's checksums let
                    // `verify` detect outside modification).
                    let m = unsafe { Mmap::map(&f) }.at(model.shard_path(s))?;
                    // Each read asks for its whole chunk with MADV_WILLNEED; fault-time readahead
                    // would only bring in neighbours that nobody drops.
                    let _ = m.advise(memmap2::Advice::Random);
                    r.maps[s] = Some(m);
                }
            }
        }
        Ok(r)
    }

    /// The read path in effect (after any fallback).
    pub fn path(&self) -> ReadPath {
        self.path
    }

    /// Ask the kernel to start reading a chunk (`Mmap` only: a prefetch that costs no thread).
    pub fn will_need(&self, chunk: &ExpertChunk) {
        if let Some(m) = &self.maps[chunk.shard] {
            let _ = m.advise_range(memmap2::Advice::WillNeed, chunk.offset as usize, chunk.bytes as usize);
        }
    }

    /// Read the raw (decompressed) bytes of `chunk` and hand them to `use_raw`, which builds the
    /// in-memory expert. One read per chunk; the stored bytes are checked against the manifest's
    /// `xxh3` (`ConvertedModel::check_expert`) before they are decompressed or used. Afterwards the chunk's pages are dropped from the
    /// page cache (and, for `Mmap`, from this process).
    pub fn with_raw<T>(
        &self,
        model: &ConvertedModel,
        chunk: &ExpertChunk,
        buf: &mut AlignedBuf,
        zbuf: &mut Vec<u8>,
        use_raw: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let shard_path = || model.shard_path(chunk.shard);
        let stored_len = chunk.bytes as usize;
        let file = model.expert_file(chunk);
        let out = match self.path {
            ReadPath::Mmap => {
                let m = self.maps[chunk.shard].as_ref().expect("expert shard mapped");
                let range = chunk.offset as usize..chunk.offset as usize + stored_len;
                // Touching a mapped page past the end of a file that shrank after it was opened
                // kills the process (SIGBUS): look at its length first. (A truncation racing this
                // check can still fault; the default `Direct` path has no such window.)
                let len = file.metadata().at(shard_path())?.len();
                if len < chunk.offset + chunk.bytes {
                    return Err(ends_early(model, chunk, len.saturating_sub(chunk.offset)));
                }
                let _ = m.advise_range(memmap2::Advice::WillNeed, range.start, stored_len);
                let stored = &m[range.clone()];
                let r = model.check_expert(chunk, stored).and_then(|()| decode(model, chunk, stored, zbuf)).and_then(use_raw);
                // SAFETY: the range lies within the read-only mapping, and no slice of it outlives
                // this call (the matrices were copied out above).
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, stored_len) };
                r
            }
            ReadPath::Pread => {
                let b = buf.get(stored_len);
                // Readahead is off for these files (see `open`); this asks for exactly the chunk
                // in large requests, which measured faster than the plain read alone.
                fadvise(file, chunk.offset, chunk.bytes, libc::POSIX_FADV_WILLNEED);
                read_all_at(file, b, chunk.offset).map_err(|e| match e {
                    ReadError::Eof(got) => ends_early(model, chunk, got),
                    ReadError::Io(e) => Error::io(shard_path(), e),
                })?;
                model.check_expert(chunk, b)?;
                decode(model, chunk, b, zbuf).and_then(use_raw)
            }
            ReadPath::Direct => {
                let f = self.direct[chunk.shard].as_ref().expect("expert shard opened");
                let padded = stored_len.next_multiple_of(DIRECT_ALIGN);
                let b = buf.get(padded);
                let mut got = 0usize;
                while got < stored_len {
                    // Lengths stay multiples of the alignment; the read may stop short at EOF.
                    let n = f.read_at(&mut b[got..padded], chunk.offset + got as u64).at(shard_path())?;
                    if n == 0 {
                        return Err(ends_early(model, chunk, got as u64));
                    }
                    got += n;
                }
                model.check_expert(chunk, &b[..stored_len])?;
                decode(model, chunk, &b[..stored_len], zbuf).and_then(use_raw)
            }
        };
        if self.path != ReadPath::Direct {
            // Whole pages only are dropped: round up over the chunk's alignment padding, which
            // belongs to no other chunk.
            drop_page_cache(file, chunk.offset, chunk.bytes.next_multiple_of(DIRECT_ALIGN as u64));
        }
        out
    }
}

enum ReadError {
    /// The file ended after this many bytes.
    Eof(u64),
    Io(std::io::Error),
}

/// `read_exact_at` that tells how far it got when the file ends early.
fn read_all_at(file: &File, buf: &mut [u8], offset: u64) -> std::result::Result<(), ReadError> {
    let mut got = 0usize;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => return Err(ReadError::Eof(got as u64)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

/// The error for a chunk whose shard ends `got` bytes into it: the manifest's lengths were
/// checked when the model was opened, so the file was truncated (or replaced) since.
fn ends_early(model: &ConvertedModel, c: &ExpertChunk, got: u64) -> Error {
    Error::bad_file(
        model.shard_path(c.shard),
        format!(
            "expert chunk (layer {}, expert {}), bytes {}..{}: the file ends {got} bytes into it \
             (truncated or replaced while the model was open)",
            c.layer, c.expert, c.offset, c.offset + c.bytes
        ),
    )
}

/// The raw chunk from its stored bytes: as is, or decompressed into `zbuf`.
fn decode<'a>(model: &ConvertedModel, c: &ExpertChunk, stored: &'a [u8], zbuf: &'a mut Vec<u8>) -> Result<&'a [u8]> {
    match c.compression {
        Compression::None => {
            if stored.len() as u64 != c.raw_bytes {
                return Err(Error::bad_file(
                    model.shard_path(c.shard),
                    format!("expert chunk (layer {}, expert {}) stores {} bytes, its raw size is {}",
                        c.layer, c.expert, stored.len(), c.raw_bytes),
                ));
            }
            Ok(stored)
        }
        Compression::Zstd => {
            zbuf.clear();
            zbuf.reserve(c.raw_bytes as usize);
            zstd::stream::copy_decode(stored, &mut *zbuf).map_err(|e| {
                Error::bad_file(
                    model.shard_path(c.shard),
                    format!("expert chunk (layer {}, expert {}) does not decompress: {e}", c.layer, c.expert),
                )
            })?;
            if zbuf.len() as u64 != c.raw_bytes {
                return Err(Error::bad_file(
                    model.shard_path(c.shard),
                    format!("expert chunk (layer {}, expert {}) decompresses to {} bytes, expected {}",
                        c.layer, c.expert, zbuf.len(), c.raw_bytes),
                ));
            }
            Ok(&zbuf[..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_grows() {
        let mut b = AlignedBuf::new();
        for len in [1, 4095, 4096, 4097, 100_000, 10] {
            let s = b.get(len);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
            s[len - 1] = 7;
            assert!(b.capacity() >= len);
        }
    }
}
