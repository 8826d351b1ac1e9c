//! Streaming one safetensors file: the header (every offset already known), then the data front
//! to back. Data is generated a window of a few MB at a time: while one window is written, the
//! next is filled in parallel, block by block, each block from its own random stream. Memory
//! stays at two windows whatever the model size, and the bytes do not depend on the number of
//! threads or the order blocks are filled in.
//!
//! Plain `write` calls, because the alternative was measured and lost: generating straight into
//! a per-window mapping of the file (blocks reserved with fallocate) avoids the kernel's copy but
//! cost 1.5-2x the CPU time in page faults and unmapping, on tmpfs and on ext4 alike.

use super::dist::Table;
use super::plan::FilePlan;
use super::rng::{name_key, Xoshiro256pp};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Elements per random stream (whole rows, at least one row). Part of what fixes the output
/// bytes: changing it changes every checkpoint.
pub const BLOCK_ELEMS: usize = 1 << 16;
/// Bytes generated per step; two windows are alive at a time.
const WINDOW_BYTES: usize = 4 << 20;

/// Per tensor of a file: its key and its scaled table.
pub struct Source {
    pub key: u64,
    pub table: Arc<Table>,
    /// Each row scaled by its gain after it is drawn (skewed routing); `None`: as drawn.
    pub row_gains: Option<Vec<f32>>,
}

impl Source {
    pub fn new(canonical_name: &str, table: Arc<Table>) -> Self {
        Source { key: name_key(canonical_name), table, row_gains: None }
    }
}

struct Job {
    item: usize,
    block: u64,
    /// First row of the block, and the tensor's row length.
    row0: usize,
    cols: usize,
    /// Byte range inside the data section.
    start: usize,
    len: usize,
}

fn jobs(file: &FilePlan, sources: &[Source]) -> Vec<Job> {
    let mut v = Vec::new();
    for (i, it) in file.items.iter().enumerate() {
        let esize = sources[i].table.elem_bytes();
        let (rows, cols) = (it.rows(), it.cols());
        let rows_per_block = (BLOCK_ELEMS / cols).max(1);
        let mut row = 0;
        let mut block = 0u64;
        while row < rows {
            let n = rows_per_block.min(rows - row);
            v.push(Job {
                item: i,
                block,
                row0: row,
                cols,
                start: it.offset as usize + row * cols * esize,
                len: n * cols * esize,
            });
            row += n;
            block += 1;
        }
    }
    v
}

/// Consecutive runs of jobs of at most `WINDOW_BYTES` (or one job, if larger).
fn windows(jobs: &[Job]) -> Vec<std::ops::Range<usize>> {
    let mut v = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, j) in jobs.iter().enumerate() {
        if i > start && bytes + j.len > WINDOW_BYTES {
            v.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += j.len;
    }
    if start < jobs.len() {
        v.push(start..jobs.len());
    }
    v
}

fn fill(seed: u64, sources: &[Source], jobs: &[Job], buf: &mut [u8]) {
    let base = jobs[0].start;
    let mut parts: Vec<(&Job, &mut [u8])> = Vec::with_capacity(jobs.len());
    let mut rest = buf;
    for j in jobs {
        debug_assert_eq!(j.start - base, parts.iter().map(|p| p.1.len()).sum::<usize>());
        let (head, tail) = rest.split_at_mut(j.len);
        parts.push((j, head));
        rest = tail;
    }
    parts.into_par_iter().for_each(|(j, out)| {
        let s = &sources[j.item];
        let mut rng = Xoshiro256pp::for_block(seed, s.key, j.block);
        s.table.fill(&mut rng, out);
        if let Some(gains) = &s.row_gains {
            scale_rows(out, s.table.elem_bytes(), j.cols, &gains[j.row0..]);
        }
    });
}

/// Multiply row `i` of `out` (little-endian bf16 or f32, `cols` per row) by `gains[i]`.
fn scale_rows(out: &mut [u8], esize: usize, cols: usize, gains: &[f32]) {
    for (row, &g) in out.chunks_exact_mut(cols * esize).zip(gains) {
        for x in row.chunks_exact_mut(esize) {
            if esize == 2 {
                let v = half::bf16::from_le_bytes([x[0], x[1]]).to_f32() * g;
                x.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            } else {
                let v = f32::from_le_bytes([x[0], x[1], x[2], x[3]]) * g;
                x.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// A file written under its temporary name and not yet durable. Dropping it without `commit`
/// removes the temporary file, so an error anywhere leaves no partial checkpoint behind.
pub struct Pending {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl Pending {
    /// Fsync and rename into place.
    pub fn commit(mut self) -> Result<()> {
        let f = self.file.take().expect("committed once");
        f.sync_all()
            .and_then(|()| std::fs::rename(&self.tmp, &self.path))
            .map_err(|e| Error::io(&self.path, e))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write `file` into `dir` under a temporary name. The fsync is left to `Pending::commit` so
/// that the kernel flushes one shard while the next is generated. `done` counts data bytes over
/// the whole checkpoint; `progress` sees it after every window.
pub fn write_file(
    dir: &Path,
    file: &FilePlan,
    sources: &[Source],
    seed: u64,
    done: &mut u64,
    progress: &dyn Fn(u64),
) -> Result<Pending> {
    let path = dir.join(&file.name);
    let tmp = dir.join(format!("{}.tmp", file.name));
    let f = File::create(&tmp).map_err(|e| Error::io(&path, e))?;
    let mut pending = Pending { file: Some(f), tmp, path };
    let f = pending.file.as_mut().expect("just set");
    stream(f, file, sources, seed, done, progress).map_err(|e| Error::io(&pending.path, e))?;
    Ok(pending)
}

fn stream(
    f: &mut File,
    file: &FilePlan,
    sources: &[Source],
    seed: u64,
    done: &mut u64,
    progress: &dyn Fn(u64),
) -> std::io::Result<()> {
    f.write_all(&file.header)?;
    let jobs = jobs(file, sources);
    let wins = windows(&jobs);
    let len = |w: &std::ops::Range<usize>| jobs[w.clone()].iter().map(|j| j.len).sum::<usize>();
    let cap = wins.iter().map(len).max().unwrap_or(0);
    let mut cur = vec![0u8; cap];
    let mut next = vec![0u8; cap];
    if let Some(w) = wins.first() {
        fill(seed, sources, &jobs[w.clone()], &mut cur[..len(w)]);
    }
    for (k, w) in wins.iter().enumerate() {
        let n = len(w);
        let following = wins.get(k + 1);
        let (written, ()) = rayon::join(
            || f.write_all(&cur[..n]),
            || {
                if let Some(w2) = following {
                    fill(seed, sources, &jobs[w2.clone()], &mut next[..len(w2)]);
                }
            },
        );
        written?;
        *done += n as u64;
        progress(*done);
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo test --release --lib generation_rate -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn generation_rate() {
        use super::super::dist::{unit_table, Init, Shape};
        let unit = unit_table(Shape::Mixture { fraction: 1.0 / 1024.0, scale: 6.0 });
        let init = Init { shape: Shape::Normal, mean: 0.0, std: 0.02 };
        let sources = [Source::new("x", Arc::new(Table::new(&unit, &init, true)))];
        let n_jobs = 2048;
        let len = BLOCK_ELEMS * 2;
        let jobs: Vec<Job> =
            (0..n_jobs).map(|b| Job { item: 0, block: b as u64, row0: 0, cols: 1, start: b * len, len }).collect();
        let mut buf = vec![0u8; WINDOW_BYTES];
        let per = WINDOW_BYTES / len;
        let t = std::time::Instant::now();
        for w in jobs.chunks(per) {
            fill(1, &sources, w, &mut buf);
        }
        let secs = t.elapsed().as_secs_f64();
        let bytes = (n_jobs * len) as f64;
        eprintln!(
            "generated {:.2} GB of bf16 in {secs:.3} s: {:.2} GB/s on {} threads",
            bytes / 1e9,
            bytes / secs / 1e9,
            rayon::current_num_threads()
        );
    }

    #[test]
    fn uncommitted_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("x.safetensors.tmp");
        let file = Some(File::create(&tmp).unwrap());
        drop(Pending { file, tmp: tmp.clone(), path: dir.path().join("x.safetensors") });
        assert!(!tmp.exists());
        let file = Some(File::create(&tmp).unwrap());
        let path = dir.path().join("x.safetensors");
        Pending { file, tmp: tmp.clone(), path: path.clone() }.commit().unwrap();
        assert!(!tmp.exists() && path.is_file());
    }

    #[test]
    fn windows_cover_all_jobs_in_order() {
        let mk = |lens: &[usize]| -> Vec<Job> {
            let mut s = 0;
            lens.iter()
                .map(|&len| {
                    let j = Job { item: 0, block: 0, row0: 0, cols: 1, start: s, len };
                    s += len;
                    j
                })
                .collect()
        };
        let big = WINDOW_BYTES;
        let jobs = mk(&[10, big, 5, big / 2, big / 2, 1, big * 2]);
        let w = windows(&jobs);
        assert_eq!(w, vec![0..1, 1..2, 2..4, 4..6, 6..7]);
        assert!(windows(&[]).is_empty());
    }
}
