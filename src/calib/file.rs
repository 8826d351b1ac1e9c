//! The calibration file, `formats/calibration.md` byte for byte: little-endian, a magic and a
//! version, the shapes and config it was recorded on, per expert its routing and column means,
//! and a sha256 of everything before it.

use super::{Calibration, ExpertStats, Origin};
use crate::error::{Error, IoContext, Result};
use crate::format::writer::write_atomic;
use sha2::{Digest, Sha256};
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"GROK1CAL";
pub const VERSION: u32 = 1;
/// `flags` bit 0: the routing counts were recorded (else they are zero and unknown).
const FLAG_ROUTING: u32 = 1;
const HEADER_BYTES: usize = 76;
const EXPERT_HEADER_BYTES: usize = 32;

/// The file's bytes.
pub fn encode(cal: &Calibration) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(MAGIC);
    let flags = if cal.has_routing() { FLAG_ROUTING } else { 0 };
    for v in [VERSION, flags, cal.n_layers as u32, cal.n_experts as u32, cal.d_model as u32, cal.ffn_size as u32] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let mut sha = [0u8; 32];
    if let Ok(h) = hex::decode(&cal.config_sha256) {
        if h.len() == 32 {
            sha.copy_from_slice(&h);
        }
    }
    b.extend_from_slice(&sha);
    b.extend_from_slice(&cal.tokens.to_le_bytes());
    b.extend_from_slice(&(cal.dataset.len() as u32).to_le_bytes());
    b.extend_from_slice(cal.dataset.as_bytes());
    for s in &cal.experts {
        b.extend_from_slice(&s.routed.to_le_bytes());
        b.extend_from_slice(&s.prob_sum.to_le_bytes());
        b.extend_from_slice(&s.input_rows.to_le_bytes());
        b.extend_from_slice(&s.hidden_rows.to_le_bytes());
        for x in s.input_sq.iter().chain(&s.hidden_sq) {
            b.extend_from_slice(&x.to_le_bytes());
        }
    }
    let digest = Sha256::digest(&b);
    b.extend_from_slice(&digest);
    b
}

/// Write `cal` to `path` (under a temporary name, renamed when complete).
pub fn save(cal: &Calibration, path: &Path) -> Result<()> {
    // A bare file name lives in the current directory, which is what gets fsynced.
    let path = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new(".").join(path),
        _ => path.to_path_buf(),
    };
    write_atomic(&path, &encode(cal))
}

/// Read our calibration file; every field is checked and errors name `path`.
pub fn read(path: &Path) -> Result<Calibration> {
    let bytes = std::fs::read(path).at(path)?;
    decode(&bytes, path)
}

/// Little-endian reads from a byte slice that say what they were reading when it ran out.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            Error::bad_file(self.path, format!("truncated: {what} needs {n} bytes at offset {}, the file has {}", self.pos, self.bytes.len()))
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn f64(&mut self, what: &str) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn f32s(&mut self, n: usize, what: &str) -> Result<Vec<f32>> {
        let raw = self.take(n * 4, what)?;
        Ok(raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
}

pub fn decode(bytes: &[u8], path: &Path) -> Result<Calibration> {
    let bad = |msg: String| Error::bad_file(path, msg);
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad(format!("not a grok1 calibration file: expected the magic {:?}", std::str::from_utf8(MAGIC).unwrap())));
    }
    if bytes.len() < HEADER_BYTES + 32 {
        return Err(bad(format!("truncated: {} bytes, a calibration file has at least {}", bytes.len(), HEADER_BYTES + 32)));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    let mut c = Cursor { bytes: body, pos: MAGIC.len(), path };
    let version = c.u32("version")?;
    if version != VERSION {
        return Err(bad(format!("calibration format version {version}, this build reads version {VERSION}")));
    }
    // The checksum is checked after the version, so a newer file gets the clearer message.
    if Sha256::digest(body)[..] != digest[..] {
        return Err(bad("checksum mismatch: the file is damaged or was cut short".into()));
    }
    let flags = c.u32("flags")?;
    if flags & !FLAG_ROUTING != 0 {
        return Err(bad(format!("unknown flags {flags:#x}, expected only bit 0 (routing recorded)")));
    }
    let n_layers = c.u32("n_layers")? as usize;
    let n_experts = c.u32("n_experts")? as usize;
    let d_model = c.u32("d_model")? as usize;
    let ffn_size = c.u32("ffn_size")? as usize;
    if [n_layers, n_experts, d_model, ffn_size].contains(&0) {
        return Err(bad(format!("zero in the shapes: {n_layers} layers, {n_experts} experts, d_model {d_model}, ffn {ffn_size}")));
    }
    let sha = c.take(32, "config sha256")?;
    let config_sha256 = if sha.iter().all(|&x| x == 0) { String::new() } else { hex::encode(sha) };
    let tokens = c.u64("token count")?;
    let n = c.u32("dataset name length")? as usize;
    let dataset = std::str::from_utf8(c.take(n, "dataset name")?)
        .map_err(|_| bad("the dataset name is not UTF-8".into()))?
        .to_string();
    let per_expert = EXPERT_HEADER_BYTES + 4 * (d_model + ffn_size);
    let expected = n_layers * n_experts * per_expert;
    if body.len() - c.pos != expected {
        return Err(bad(format!(
            "{} bytes of expert records, expected {expected} ({n_layers} x {n_experts} experts of {per_expert})",
            body.len() - c.pos
        )));
    }
    let mut experts = Vec::with_capacity(n_layers * n_experts);
    for i in 0..n_layers * n_experts {
        let (layer, expert) = (i / n_experts, i % n_experts);
        let what = |f: &str| format!("layer {layer} expert {expert}: {f}");
        let s = ExpertStats {
            routed: c.u64(&what("routed"))?,
            prob_sum: c.f64(&what("prob_sum"))?,
            input_rows: c.u64(&what("input_rows"))?,
            hidden_rows: c.u64(&what("hidden_rows"))?,
            input_sq: c.f32s(d_model, &what("input means"))?,
            hidden_sq: c.f32s(ffn_size, &what("hidden means"))?,
        };
        let finite_nonneg = |v: &[f32]| v.iter().all(|x| x.is_finite() && *x >= 0.0);
        if !(s.prob_sum.is_finite() && s.prob_sum >= 0.0) || !finite_nonneg(&s.input_sq) || !finite_nonneg(&s.hidden_sq) {
            return Err(bad(what("a negative or non-finite value; means of squares are finite and >= 0")));
        }
        if flags & FLAG_ROUTING != 0 && s.routed > tokens {
            return Err(bad(what(&format!("routed {} times in {tokens} tokens", s.routed))));
        }
        experts.push(s);
    }
    let origin = if flags & FLAG_ROUTING != 0 { Origin::Recorded } else { Origin::Imatrix };
    Ok(Calibration { origin, n_layers, n_experts, d_model, ffn_size, config_sha256, tokens, dataset, experts })
}
