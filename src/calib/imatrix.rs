//! llama.cpp importance matrices (`llama-imatrix`), the legacy binary `.dat` layout:
//!
//! ```text
//! i32 n_entries
//! n_entries x { i32 name_len; name_len bytes of name; i32 ncall; i32 nval; nval x f32 }
//! i32 last_chunk; i32 dataset_len; dataset_len bytes      (optional: older files end before)
//! ```
//!
//! All little-endian. Each entry is one weight tensor; its values are, per input column, the
//! mean of the squared activation times `ncall` (so value / ncall is the mean). A stacked MoE
//! tensor `blk.N.ffn_{gate,up,down}_exps.weight` holds one column vector per expert, expert 0
//! first (`nval = n_experts x columns`); files from before llama.cpp stacked its experts name
//! them `blk.N.ffn_{gate,up,down}.E.weight`, one entry each. Per-expert row counts are not kept
//! (an expert no text reached was written as all ones), so routing is unknown. The mapping onto
//! our projections is llama.cpp's own for Grok: `linear` = gate, `linear_v` = up,
//! `linear_1` = down. Dense entries (attention, output) are read past.
//!
//! The newer GGUF imatrix files are refused with a message saying how to get a `.dat`.

use super::{Calibration, Origin};
use crate::checkpoint::Proj;
use crate::config::GrokConfig;
use crate::error::{Error, Result};
use std::path::Path;

/// Longest tensor name accepted (llama.cpp names are well under 100 bytes).
const MAX_NAME: usize = 1024;

/// Which of our projections (and which expert, for unstacked names) an entry is.
fn parse_name(name: &str) -> Option<(usize, Option<usize>, Proj)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    let proj_of = |s: &str| match s {
        "ffn_gate" => Some(Proj::Gate),
        "ffn_up" => Some(Proj::Up),
        "ffn_down" => Some(Proj::Down),
        _ => None,
    };
    if let Some(p) = rest.strip_suffix("_exps") {
        return Some((layer, None, proj_of(p)?));
    }
    let (p, e) = rest.split_once('.')?;
    Some((layer, Some(e.parse().ok()?), proj_of(p)?))
}

pub fn decode(bytes: &[u8], path: &Path, c: &GrokConfig) -> Result<Calibration> {
    let bad = |msg: String| Error::bad_file(path, msg);
    if bytes.starts_with(b"GGUF") {
        return Err(bad(
            "a GGUF imatrix file: not read; write the legacy layout with `llama-imatrix --output-format dat` and pass that".into(),
        ));
    }
    let head = bytes.get(..4).ok_or_else(|| {
        bad("neither a grok1 calibration file nor a llama.cpp imatrix: shorter than 4 bytes".into())
    })?;
    let n_entries = i32::from_le_bytes(head.try_into().unwrap());
    if n_entries <= 0 {
        return Err(bad(format!("imatrix: {n_entries} entries; expected at least one")));
    }
    let mut cal = Calibration::empty(c, Origin::Imatrix);
    cal.config_sha256.clear();
    let mut found = 0usize;
    let mut pos = 4usize;
    for i in 0..n_entries {
        let rd = |pos: &mut usize, n: usize, what: &str| -> Result<&[u8]> {
            let s = bytes
                .get(*pos..pos.saturating_add(n))
                .ok_or_else(|| bad(format!("imatrix entry {i}: truncated reading {what} at offset {pos}")))?;
            *pos += n;
            Ok(s)
        };
        let rd_i32 = |pos: &mut usize, what: &str| -> Result<i32> { Ok(i32::from_le_bytes(rd(pos, 4, what)?.try_into().unwrap())) };
        let len = rd_i32(&mut pos, "the name length")?;
        if len <= 0 || len as usize > MAX_NAME {
            return Err(bad(format!("imatrix entry {i}: name length {len}, expected 1..={MAX_NAME}")));
        }
        let name = std::str::from_utf8(rd(&mut pos, len as usize, "the name")?)
            .map_err(|_| bad(format!("imatrix entry {i}: the name is not UTF-8")))?
            .to_string();
        let ncall = rd_i32(&mut pos, "ncall")?;
        let nval = rd_i32(&mut pos, "nval")?;
        if nval < 0 {
            return Err(bad(format!("imatrix entry `{name}`: nval {nval}")));
        }
        let raw = rd(&mut pos, nval as usize * 4, "the values")?;
        let Some((layer, expert, proj)) = parse_name(&name) else { continue };
        if ncall <= 0 {
            return Err(bad(format!("imatrix entry `{name}`: ncall {ncall}, expected at least 1")));
        }
        if layer >= c.n_layers {
            return Err(bad(format!("imatrix entry `{name}`: layer {layer}, the model has {}", c.n_layers)));
        }
        let cols = if proj == Proj::Down { c.ffn_size } else { c.d_model };
        let experts: Vec<usize> = match expert {
            None => (0..c.n_experts).collect(),
            Some(e) if e < c.n_experts => vec![e],
            Some(e) => return Err(bad(format!("imatrix entry `{name}`: expert {e}, the model has {}", c.n_experts))),
        };
        if nval as usize != experts.len() * cols {
            return Err(bad(format!(
                "imatrix entry `{name}`: {nval} values, expected {} ({} expert(s) x {cols} columns)",
                experts.len() * cols,
                experts.len()
            )));
        }
        let values: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) / ncall as f32).collect();
        if let Some(x) = values.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
            return Err(bad(format!("imatrix entry `{name}`: value {x}; means of squares are finite and >= 0")));
        }
        for (k, &e) in experts.iter().enumerate() {
            let s = &mut cal.experts[layer * c.n_experts + e];
            let v = &values[k * cols..][..cols];
            match proj {
                // gate and up see the same input; the first one read stands for both.
                Proj::Gate | Proj::Up if s.input_rows == 0 => {
                    s.input_sq.copy_from_slice(v);
                    s.input_rows = ncall as u64;
                }
                Proj::Gate | Proj::Up => {}
                Proj::Down => {
                    s.hidden_sq.copy_from_slice(v);
                    s.hidden_rows = ncall as u64;
                }
            }
        }
        found += 1;
    }
    if found == 0 {
        return Err(bad("imatrix has no expert entries (blk.N.ffn_{gate,up,down}_exps.weight)".into()));
    }
    // The trailer: chunk count and dataset name, absent in the oldest files.
    if bytes.len() >= pos + 8 {
        let chunks = i32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap());
        let len = i32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap());
        let name = (len >= 0).then(|| bytes.get(pos + 8..pos + 8 + len as usize)).flatten();
        match name {
            Some(n) => cal.dataset = format!("{} ({chunks} chunks)", String::from_utf8_lossy(n)),
            None => return Err(bad(format!("imatrix trailer: dataset name of {len} bytes past the end of the file"))),
        }
    }
    Ok(cal)
}
