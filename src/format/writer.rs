//! Crash-safe file writing. Everything goes to `NAME.tmp`, is fsynced, then renamed over `NAME`
//! and the directory fsynced, so a file under its final name is always complete.

use crate::error::{Error, IoContext, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
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

/// Appends to one shard under its temporary name, hashing everything written. Writing and the
/// shard's hash run on a thread of their own, so the caller can hash and prepare the next bytes
/// at the same time.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    tx: Option<SyncSender<Arc<Vec<u8>>>>,
    sink: Option<JoinHandle<Result<(File, Sha256)>>>,
    pos: u64,
    finished: bool,
}

/// The writer thread: append and hash. (Starting writeback early with `sync_file_range` was
/// measured: it stalled the writer on the device queue and made conversions 1.8x slower.)
fn sink(tmp: PathBuf, file: File, rx: Receiver<Arc<Vec<u8>>>) -> Result<(File, Sha256)> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let io_error = |e: std::io::Error| {
        let hint = if e.raw_os_error() == Some(libc::ENOSPC) { " (disk full)" } else { "" };
        Error::bad_file(&tmp, format!("write failed{hint}: {e}"))
    };
    for bytes in rx {
        out.write_all(&bytes).map_err(io_error)?;
        hasher.update(&bytes[..]);
    }
    let file = out.into_inner().map_err(|e| io_error(e.into_error()))?;
    file.sync_all().map_err(io_error)?;
    Ok((file, hasher))
}

impl ShardWriter {
    pub fn create(path: &Path) -> Result<ShardWriter> {
        let tmp = tmp_path(path);
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).at(&tmp)?;
        let (tx, rx) = sync_channel(16);
        let t = tmp.clone();
        let sink = std::thread::spawn(move || sink(t, file, rx));
        Ok(ShardWriter { path: path.to_path_buf(), tmp, tx: Some(tx), sink: Some(sink), pos: 0, finished: false })
    }

    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.write_shared(Arc::new(bytes.to_vec()))
    }

    /// Append bytes the caller may go on reading (hashing) while they are written.
    pub fn write_shared(&mut self, bytes: Arc<Vec<u8>>) -> Result<()> {
        let n = bytes.len() as u64;
        if self.tx.as_ref().unwrap().send(bytes).is_err() {
            // The writer thread stopped on an error: report it.
            return Err(self.join().err().unwrap_or_else(|| Error::bad_file(&self.tmp, "writer stopped")));
        }
        self.pos += n;
        Ok(())
    }

    fn join(&mut self) -> Result<(File, Sha256)> {
        self.tx.take();
        match self.sink.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::bad_file(&self.tmp, "writer thread panicked")),
            None => Err(Error::bad_file(&self.tmp, "writer already finished")),
        }
    }

    /// Zero-fill up to the next multiple of `align`.
    pub fn pad_to(&mut self, align: u64) -> Result<()> {
        let n = super::align_up(self.pos, align) - self.pos;
        if n > 0 {
            self.write_shared(Arc::new(vec![0u8; n as usize]))?;
        }
        Ok(())
    }

    /// Flush, fsync and rename into place. Returns (bytes, sha256).
    pub fn finish(mut self) -> Result<(u64, String)> {
        let (file, hasher) = self.join()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).at(&self.path)?;
        self.finished = true;
        fsync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok((self.pos, hex::encode(hasher.finalize())))
    }
}

impl Drop for ShardWriter {
    /// An unfinished shard never survives under any name.
    fn drop(&mut self) {
        let _ = self.join();
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
