//! The fast checksum of the read path: XXH3-64 (seed 0) of the stored bytes of every dense tensor
//! and expert chunk, recorded by the converter in the manifest's `xxh3` fields beside the sha256s.
//!
//! sha256 locates damage (`verify`) but costs more than the read it would check (0.4-0.9 GB/s
//! on one core against the disk's 0.5-3 GB/s); XXH3 ran at 7.3-7.8 GB/s and crc32c (hardware
//! instruction) at 0.8-5.4 GB/s on 26 MB chunks on the 2-core AVX-512 host, so every expert read
//! is checked with XXH3 before anything decompresses or packs its bytes. Models converted before
//! the field existed have no `xxh3`; their reads are checked against sha256 only when asked for
//! (`--verify-load`), and otherwise not at all, which the reader says once.

use crate::error::{Error, Result};
use std::path::Path;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// The manifest's spelling of an XXH3-64 value: 16 lowercase hexadecimal digits.
pub fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxh3_64(bytes))
}

/// XXH3-64 over bytes that arrive in pieces (equal to `xxh3_hex` of their concatenation).
#[derive(Clone, Default)]
pub struct FastHasher(Xxh3);

impl FastHasher {
    pub fn new() -> FastHasher {
        FastHasher(Xxh3::new())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish_hex(&self) -> String {
        format!("{:016x}", self.0.digest())
    }
}

/// What a check compared the bytes against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Xxh3,
    Sha256,
    /// Nothing to compare with: no `xxh3` recorded and sha256 not asked for.
    Nothing,
}

/// Where the bytes being checked come from, for the error that names them.
pub struct Origin<'a> {
    pub file: &'a Path,
    /// e.g. `expert chunk (layer 3, expert 5)` or `tensor blk.0.attn_q`.
    pub what: &'a str,
    /// Position of the bytes in `file`.
    pub offset: u64,
}

/// Compare `bytes` with the recorded XXH3 if there is one, else with the sha256 if `sha256` is
/// given. A mismatch is an error naming the file, the item and its byte range.
pub fn check(origin: &Origin, xxh3: Option<&str>, sha256: Option<&str>, bytes: &[u8]) -> Result<Checked> {
    let (kind, found, expected) = match (xxh3, sha256) {
        (Some(x), _) => ("xxh3", xxh3_hex(bytes), x),
        (None, Some(s)) => ("sha256", super::writer::sha256_hex(bytes), s),
        (None, None) => return Ok(Checked::Nothing),
    };
    if found != expected {
        let end = origin.offset + bytes.len() as u64;
        return Err(Error::bad_file(
            origin.file,
            format!(
                "{}, bytes {}..{end}: {kind} {found}, the manifest says {expected} (the file changed \
                 after conversion; `grok1-convert verify` locates the damage)",
                origin.what, origin.offset
            ),
        ));
    }
    Ok(if kind == "xxh3" { Checked::Xxh3 } else { Checked::Sha256 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot_and_a_flip_is_named() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut h = FastHasher::new();
        for piece in bytes.chunks(4093) {
            h.update(piece);
        }
        assert_eq!(h.finish_hex(), xxh3_hex(&bytes));
        assert_eq!(xxh3_hex(&bytes).len(), 16);
        let origin = Origin { file: Path::new("experts-00000.bin"), what: "expert chunk (layer 1, expert 2)", offset: 8192 };
        let x = xxh3_hex(&bytes);
        assert_eq!(check(&origin, Some(&x), None, &bytes).unwrap(), Checked::Xxh3);
        let sha = super::super::writer::sha256_hex(&bytes);
        assert_eq!(check(&origin, None, Some(&sha), &bytes).unwrap(), Checked::Sha256);
        assert_eq!(check(&origin, None, None, &bytes).unwrap(), Checked::Nothing);
        let mut bad = bytes.clone();
        bad[77_777] ^= 0x10;
        let e = check(&origin, Some(&x), Some(&sha), &bad).unwrap_err().to_string();
        assert!(e.contains("experts-00000.bin") && e.contains("layer 1, expert 2") && e.contains("bytes 8192..108192"), "{e}");
        let e = check(&origin, None, Some(&sha), &bad).unwrap_err().to_string();
        assert!(e.contains("sha256"), "{e}");
    }
}
