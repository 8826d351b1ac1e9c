//! Streaming one safetensors file: the header (every offset already known), then the data front
//! to back. Data is generated a window of a few MB at a time: while one window is written, the
//! next is filled in parallel, block by block, each block from its own random stream. Memory
//! stays at two windows whatever the model size, and the bytes do not depend on the number of
//! threads or the order blocks are filled in.

use super::dist::Table;
use super::plan::FilePlan;
use super::rng::{name_key, Xoshiro256pp};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::fs::File;
use std::io::Write;
use std::path::Path;
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
}

impl Source {
    pub fn new(canonical_name: &str, table: Arc<Table>) -> Self {
        Source { key: name_key(canonical_name), table }
    }
}

struct Job {
    item: usize,
    block: u64,
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
    });
}

/// Write `file` into `dir` under a temporary name, fsync it and rename it into place. `done`
/// counts data bytes over the whole checkpoint; `progress` sees it after every window.
pub fn write_file(
    dir: &Path,
    file: &FilePlan,
    sources: &[Source],
    seed: u64,
    done: &mut u64,
    progress: &dyn Fn(u64),
) -> Result<()> {
    let path = dir.join(&file.name);
    let tmp = dir.join(format!("{}.tmp", file.name));
    let result = write_tmp(&tmp, file, sources, seed, done, progress)
        .and_then(|()| std::fs::rename(&tmp, &path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

fn write_tmp(
    tmp: &Path,
    file: &FilePlan,
    sources: &[Source],
    seed: u64,
    done: &mut u64,
    progress: &dyn Fn(u64),
) -> std::io::Result<()> {
    let mut f = File::create(tmp)?;
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
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_all_jobs_in_order() {
        let mk = |lens: &[usize]| -> Vec<Job> {
            let mut s = 0;
            lens.iter()
                .map(|&len| {
                    let j = Job { item: 0, block: 0, start: s, len };
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
