//! Crash-safe file writing. Everything goes to `NAME.tmp`, is fsynced, then renamed over `NAME`
//! and the directory fsynced, so a file under its final name is always complete.

use crate::error::{Error, IoContext, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

/// Write a small file atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| {
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        std::fs::rename(&tmp, path).at(path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Appends to one shard under its temporary name, hashing everything written.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
    hasher: Sha256,
    pos: u64,
    /// Bytes handed to the kernel for writeback so far (see `write`).
    flushed: u64,
    finished: bool,
}

/// Start writeback every this many bytes, so the final fsync finds little left to do and the
/// disk writes while we compute instead of after.
const WRITEBACK_STEP: u64 = 32 << 20;

const ZEROS: [u8; 4096] = [0; 4096];

impl ShardWriter {
    pub fn create(path: &Path) -> Result<ShardWriter> {
        let tmp = tmp_path(path);
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).at(&tmp)?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            hasher: Sha256::new(),
            pos: 0,
            flushed: 0,
            finished: false,
        })
    }

    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.as_mut().unwrap().write_all(bytes).map_err(|e| self.io_error(e))?;
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
        if self.pos - self.flushed >= WRITEBACK_STEP {
            self.start_writeback()?;
        }
        Ok(())
    }

    /// Ask the kernel to start writing what we have written so far, without waiting for it.
    fn start_writeback(&mut self) -> Result<()> {
        let buf = self.file.as_mut().unwrap();
        buf.flush().map_err(|e| self.io_error(e))?;
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            let fd = self.file.as_ref().unwrap().get_ref().as_raw_fd();
            // SAFETY: a plain syscall on a file descriptor we own; it only schedules I/O.
            unsafe {
                libc::sync_file_range(
                    fd,
                    self.flushed as i64,
                    (self.pos - self.flushed) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.flushed = self.pos;
        Ok(())
    }

    /// Zero-fill up to the next multiple of `align`.
    pub fn pad_to(&mut self, align: u64) -> Result<()> {
        let mut n = super::align_up(self.pos, align) - self.pos;
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        let hint = if e.raw_os_error() == Some(libc::ENOSPC) { " (disk full)" } else { "" };
        Error::bad_file(&self.tmp, format!("write failed{hint}: {e}"))
    }

    /// Flush, fsync and rename into place. Returns (bytes, sha256).
    pub fn finish(mut self) -> Result<(u64, String)> {
        let buf = self.file.take().unwrap();
        let file = buf.into_inner().map_err(|e| self.io_error(e.into_error()))?;
        file.sync_all().map_err(|e| self.io_error(e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).at(&self.path)?;
        self.finished = true;
        fsync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        let hash = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok((self.pos, hash))
    }
}

impl Drop for ShardWriter {
    /// An unfinished shard never survives under any name.
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
