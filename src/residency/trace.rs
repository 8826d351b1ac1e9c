//! Routing traces: per forward pass, per layer and token, the experts the router chose and its
//! probabilities over all experts. Written while a model runs (`TraceWriter`, an MoE observer),
//! read back for the policy replay (`replay`) and for GPU placement (`expert_ranking`).
//! The bytes are described in `formats/routing-trace.md`.

use crate::error::{Error, Result};
use crate::observe::MoeObserver;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const MAGIC: [u8; 8] = *b"GRK1RTRC";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;
const PASS_TAG: [u8; 4] = *b"PASS";
/// Tag, position, token count, then the data, then the checksum.
const RECORD_HEAD: usize = 12;

/// The model's shape as a trace states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceShape {
    pub n_layers: usize,
    pub n_experts: usize,
    pub top_k: usize,
}

impl TraceShape {
    /// Bytes one (layer, token) takes in a record: `top_k` u16 expert ids, `n_experts` f32s.
    fn entry_bytes(&self) -> usize {
        2 * self.top_k + 4 * self.n_experts
    }
}

/// One forward pass: `n_tokens` tokens from KV position `position`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pass {
    pub position: usize,
    pub n_tokens: usize,
    /// `[n_layers][n_tokens][top_k]`, best first.
    pub chosen: Vec<u16>,
    /// `[n_layers][n_tokens][n_experts]`.
    pub probs: Vec<f32>,
}

impl Pass {
    /// The experts chosen for `token` in `layer`.
    pub fn chosen_at(&self, shape: &TraceShape, layer: usize, token: usize) -> &[u16] {
        &self.chosen[(layer * self.n_tokens + token) * shape.top_k..][..shape.top_k]
    }

    /// The distinct experts `layer` asks for in this pass, ascending (what the MoE fetches).
    pub fn layer_set(&self, shape: &TraceShape, layer: usize) -> Vec<usize> {
        let mut v: Vec<usize> =
            self.chosen[layer * self.n_tokens * shape.top_k..][..self.n_tokens * shape.top_k].iter().map(|&e| e as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// A whole trace in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTrace {
    pub shape: TraceShape,
    pub passes: Vec<Pass>,
}

impl RoutingTrace {
    /// Read and check a trace file: header, every record's tag, size, checksum and expert ids.
    pub fn read(path: &Path) -> Result<RoutingTrace> {
        let bad = |msg: String| Error::BadFile { path: path.to_path_buf(), msg };
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let shape = parse_header(&bytes).map_err(bad)?;
        let mut passes = Vec::new();
        let mut at = HEADER_BYTES;
        while at < bytes.len() {
            let (pass, len) = parse_record(&bytes[at..], &shape)
                .map_err(|m| bad(format!("record {} (byte offset {at}): {m}", passes.len())))?;
            passes.push(pass);
            at += len;
        }
        Ok(RoutingTrace { shape, passes })
    }

    /// Tokens over all passes.
    pub fn tokens(&self) -> usize {
        self.passes.iter().map(|p| p.n_tokens).sum()
    }

    /// The fetches a run made, in order: per pass, per layer, the slot ids
    /// (`layer * n_experts + expert`) of the distinct experts that layer used.
    pub fn fetches(&self) -> Vec<Vec<usize>> {
        let s = &self.shape;
        let mut out = Vec::with_capacity(self.passes.len() * s.n_layers);
        for p in &self.passes {
            for l in 0..s.n_layers {
                out.push(p.layer_set(s, l).into_iter().map(|e| l * s.n_experts + e).collect());
            }
        }
        out
    }

    /// How often each (layer, expert) was chosen, `[n_layers * n_experts]`.
    pub fn counts(&self) -> Vec<u64> {
        let s = &self.shape;
        let mut c = vec![0u64; s.n_layers * s.n_experts];
        for p in &self.passes {
            for l in 0..s.n_layers {
                for &e in &p.chosen[l * p.n_tokens * s.top_k..][..p.n_tokens * s.top_k] {
                    c[l * s.n_experts + e as usize] += 1;
                }
            }
        }
        c
    }

    /// Experts ranked for placement, most chosen first; ties (and never-chosen experts) in
    /// `gpu::plan::default_ranking`'s order, so that a short trace still spreads over layers.
    pub fn expert_ranking(&self) -> Vec<(usize, usize)> {
        let s = &self.shape;
        let counts = self.counts();
        let mut v = crate::gpu::plan::default_ranking(s.n_layers, s.n_experts);
        // A stable sort keeps the default order among equal counts.
        v.sort_by_key(|&(l, e)| std::cmp::Reverse(counts[l * s.n_experts + e]));
        v
    }
}

fn parse_header(b: &[u8]) -> std::result::Result<TraceShape, String> {
    if b.len() < HEADER_BYTES {
        return Err(format!("{} bytes: shorter than the {HEADER_BYTES}-byte header of a routing trace", b.len()));
    }
    if b[..8] != MAGIC {
        return Err(format!("not a routing trace: magic {:?}, expected {:?}", &b[..8], std::str::from_utf8(&MAGIC).unwrap()));
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(format!("routing trace version {version}; this build reads version {VERSION}"));
    }
    let crc = u32_at(b, 24);
    if crc != crc32(&b[..24]) {
        return Err(format!("header checksum {crc:08x} does not match its bytes ({:08x})", crc32(&b[..24])));
    }
    let shape = TraceShape { n_layers: u32_at(b, 12) as usize, n_experts: u32_at(b, 16) as usize, top_k: u32_at(b, 20) as usize };
    if shape.n_layers == 0 || shape.n_experts == 0 || shape.n_experts > u16::MAX as usize || shape.top_k == 0 || shape.top_k > shape.n_experts {
        return Err(format!("header states {shape:?}: expected at least one layer, 1..=65535 experts, 1..=n_experts chosen"));
    }
    if u32_at(b, 28) != 0 {
        return Err("header's reserved field (bytes 28..32) is not zero".into());
    }
    Ok(shape)
}

/// One record from the start of `b`, and its length in bytes.
fn parse_record(b: &[u8], s: &TraceShape) -> std::result::Result<(Pass, usize), String> {
    if b.len() < RECORD_HEAD {
        return Err(format!("{} bytes left: truncated record head", b.len()));
    }
    if b[..4] != PASS_TAG {
        return Err(format!("tag {:?}, expected \"PASS\"", &b[..4]));
    }
    let position = u32_at(b, 4) as usize;
    let n_tokens = u32_at(b, 8) as usize;
    if n_tokens == 0 {
        return Err("a pass of zero tokens".into());
    }
    let data = s.n_layers.checked_mul(n_tokens).and_then(|n| n.checked_mul(s.entry_bytes())).ok_or("token count overflows")?;
    let len = RECORD_HEAD + data + 4;
    if b.len() < len {
        return Err(format!("truncated: {n_tokens} tokens need {len} bytes, {} left", b.len()));
    }
    let crc = u32_at(b, len - 4);
    if crc != crc32(&b[..len - 4]) {
        return Err(format!("checksum {crc:08x} does not match the record's bytes ({:08x})", crc32(&b[..len - 4])));
    }
    let mut chosen = Vec::with_capacity(s.n_layers * n_tokens * s.top_k);
    let mut probs = Vec::with_capacity(s.n_layers * n_tokens * s.n_experts);
    let mut at = RECORD_HEAD;
    for l in 0..s.n_layers {
        for t in 0..n_tokens {
            let first = chosen.len();
            for _ in 0..s.top_k {
                let e = u16::from_le_bytes([b[at], b[at + 1]]);
                at += 2;
                if e as usize >= s.n_experts || chosen[first..].contains(&e) {
                    return Err(format!("layer {l}, token {t}: expert {e} is out of range or chosen twice ({} experts)", s.n_experts));
                }
                chosen.push(e);
            }
            for _ in 0..s.n_experts {
                let p = f32::from_le_bytes(b[at..at + 4].try_into().unwrap());
                at += 4;
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("layer {l}, token {t}: probability {p} outside [0, 1]"));
                }
                probs.push(p);
            }
        }
    }
    Ok((Pass { position, n_tokens, chosen, probs }, len))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn header(s: &TraceShape) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(&MAGIC);
    for (i, v) in [VERSION, s.n_layers as u32, s.n_experts as u32, s.top_k as u32].into_iter().enumerate() {
        h[8 + 4 * i..][..4].copy_from_slice(&v.to_le_bytes());
    }
    let crc = crc32(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib computes it.
pub fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, v) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *v = c;
        }
        t
    });
    !bytes.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

/// The pass being recorded.
struct Current {
    record: Vec<u8>,
    /// (layer, token) entries routed so far.
    entries: usize,
    n_tokens: usize,
}

/// An MoE observer that appends one record per forward pass to a trace file. A record is
/// written when its pass's last layer has routed its last token; `finish` flushes the file.
pub struct TraceWriter {
    path: PathBuf,
    shape: TraceShape,
    state: Mutex<(BufWriter<File>, Option<Current>, Option<Error>)>,
}

impl TraceWriter {
    /// Create `path` (or append to it: its header must state the same shape).
    pub fn create(path: &Path, shape: TraceShape, append: bool) -> Result<TraceWriter> {
        let io = |e| Error::Io { path: path.to_path_buf(), source: e };
        let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(!append).open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if append && len > 0 {
            // Check the whole file: appending to a damaged trace would hide the damage.
            let old = RoutingTrace::read(path)?;
            if old.shape != shape {
                return Err(Error::BadFile {
                    path: path.to_path_buf(),
                    msg: format!("the trace is of a model with {:?}, this model has {shape:?}", old.shape),
                });
            }
            f.seek(SeekFrom::End(0)).map_err(io)?;
        } else {
            f.write_all(&header(&shape)).map_err(io)?;
        }
        Ok(TraceWriter { path: path.to_path_buf(), shape, state: Mutex::new((BufWriter::new(f), None, None)) })
    }

    /// Flush what was written; reports the first write error of the run, if any.
    pub fn finish(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = st.2.take() {
            return Err(e);
        }
        if st.1.is_some() {
            return Err(Error::Invalid(format!("{}: a forward pass was cut short; its record is not written", self.path.display())));
        }
        st.0.flush().map_err(|e| Error::Io { path: self.path.clone(), source: e })
    }
}

impl MoeObserver for TraceWriter {
    fn pass_started(&self, position: usize, n_tokens: usize) {
        let mut record = Vec::with_capacity(RECORD_HEAD + self.shape.n_layers * n_tokens * self.shape.entry_bytes() + 4);
        record.extend_from_slice(&PASS_TAG);
        record.extend_from_slice(&(position as u32).to_le_bytes());
        record.extend_from_slice(&(n_tokens as u32).to_le_bytes());
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 = Some(Current { record, entries: 0, n_tokens });
    }

    fn routed(&self, _layer: usize, probs: &[f32], chosen: &[(usize, f32)]) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        let Some(cur) = st.1.as_mut() else { return };
        for &(e, _) in chosen {
            cur.record.extend_from_slice(&(e as u16).to_le_bytes());
        }
        for &p in probs {
            cur.record.extend_from_slice(&p.to_le_bytes());
        }
        cur.entries += 1;
        if cur.entries == cur.n_tokens * self.shape.n_layers {
            let mut cur = st.1.take().unwrap();
            let crc = crc32(&cur.record);
            cur.record.extend_from_slice(&crc.to_le_bytes());
            if let Err(e) = st.0.write_all(&cur.record) {
                st.2.get_or_insert(Error::Io { path: self.path.clone(), source: e });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_of_the_check_string() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
