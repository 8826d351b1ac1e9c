//! The official xai-org release, `ckpt-0/tensor{i:05d}_000`: one pickle per Haiku parameter, in
//! the order JAX flattens the parameter dict (module paths sorted as strings, so layer 10 comes
//! before layer 2). Seven parameters per layer are `QuantizedWeight8bit` (int8 `[in, out]`,
//! experts stacked first, with bf16 scales `[.., G, out]`: one per output column and group of
//! `in / G` inputs); the embedding, the norms and the router are float32 arrays.
//!
//! Rows come out in the canonical `[out, in]` orientation, one tensor per expert. A canonical row
//! is a column of the stored matrix, so reads transpose tile by tile: read many rows per call
//! (64 or more), since each call touches `rows` contiguous bytes of every stored input row.

use super::names::{Proj, Tensor};
use super::pickle::{self, ArrayRef, Loaded, QuantRef};
use super::strided::{decode, decode_one, transpose_rows, DType, View};
use super::{check_tensor_set, SourceTensor, TensorSource};
use crate::config::GrokConfig;
use crate::error::{Error, IoContext, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// What one release file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Embedding,
    FinalNorm,
    /// `moe/linear`, the GELU branch.
    Gate,
    /// `moe/linear_1`.
    Down,
    /// `moe/linear_v`.
    Up,
    Key,
    /// `multi_head_attention/linear`, the output projection.
    AttnOut,
    Query,
    Value,
    /// `rms_norm`, `rms_norm_1`, `rms_norm_2`, `rms_norm_3`.
    Norm(u8),
    Router,
}

impl Param {
    const LAYER: [Param; 12] = [
        Param::Gate,
        Param::Down,
        Param::Up,
        Param::Key,
        Param::AttnOut,
        Param::Query,
        Param::Value,
        Param::Norm(0),
        Param::Norm(1),
        Param::Norm(2),
        Param::Norm(3),
        Param::Router,
    ];

    /// Haiku `(module path, parameter name)`.
    pub fn haiku_path(self, layer: Option<usize>) -> (String, &'static str) {
        let l = |m: &str| format!("transformer/decoder_layer_{}/{m}", layer.unwrap_or(0));
        match self {
            Param::Embedding => ("language_model/in_out_embed".into(), "embeddings"),
            Param::FinalNorm => ("language_model/rms_norm".into(), "scale"),
            Param::Gate => (l("moe/linear"), "w"),
            Param::Down => (l("moe/linear_1"), "w"),
            Param::Up => (l("moe/linear_v"), "w"),
            Param::Key => (l("multi_head_attention/key"), "w"),
            Param::AttnOut => (l("multi_head_attention/linear"), "w"),
            Param::Query => (l("multi_head_attention/query"), "w"),
            Param::Value => (l("multi_head_attention/value"), "w"),
            Param::Norm(0) => (l("rms_norm"), "scale"),
            Param::Norm(k) => (l(&format!("rms_norm_{k}")), "scale"),
            Param::Router => (l("router"), "w"),
        }
    }

    pub fn is_quantized(self) -> bool {
        use Param::*;
        matches!(self, Gate | Down | Up | Key | AttnOut | Query | Value)
    }

    /// Stored (JAX) shape: `[in, out]`, experts stacked first.
    pub fn stored_shape(self, c: &GrokConfig) -> Vec<usize> {
        let (d, e, f) = (c.d_model, c.n_experts, c.ffn_size);
        match self {
            Param::Embedding => vec![c.vocab_size, d],
            Param::FinalNorm | Param::Norm(_) => vec![d],
            Param::Gate | Param::Up => vec![e, d, f],
            Param::Down => vec![e, f, d],
            Param::Key | Param::Value => vec![d, c.kv_dim()],
            Param::Query => vec![d, c.q_dim()],
            Param::AttnOut => vec![c.q_dim(), d],
            Param::Router => vec![d, e],
        }
    }

    /// The canonical tensors this file holds (one per expert for the MoE weights).
    fn tensors(self, layer: Option<usize>, c: &GrokConfig) -> Vec<Tensor> {
        let l = layer.unwrap_or(0);
        let experts = |proj| {
            (0..c.n_experts).map(|expert| Tensor::Expert { layer: l, expert, proj }).collect()
        };
        match self {
            Param::Embedding => vec![Tensor::Embedding],
            Param::FinalNorm => vec![Tensor::OutputNorm],
            Param::Gate => experts(Proj::Gate),
            Param::Down => experts(Proj::Down),
            Param::Up => experts(Proj::Up),
            Param::Key => vec![Tensor::AttnK(l)],
            Param::AttnOut => vec![Tensor::AttnO(l)],
            Param::Query => vec![Tensor::AttnQ(l)],
            Param::Value => vec![Tensor::AttnV(l)],
            Param::Norm(0) => vec![Tensor::AttnNorm(l)],
            Param::Norm(1) => vec![Tensor::AttnOutNorm(l)],
            Param::Norm(2) => vec![Tensor::FfnNorm(l)],
            Param::Norm(_) => vec![Tensor::FfnOutNorm(l)],
            Param::Router => vec![Tensor::Router(l)],
        }
    }
}

/// The parameter held by each file `tensor{i:05d}_000`, in file order: JAX flattens the Haiku
/// dict `{module path: {name: leaf}}` with both levels' keys sorted as strings.
pub fn file_order(n_layers: usize) -> Vec<(Param, Option<usize>)> {
    let mut v = vec![(Param::Embedding, None), (Param::FinalNorm, None)];
    for l in 0..n_layers {
        v.extend(Param::LAYER.iter().map(|&p| (p, Some(l))));
    }
    v.sort_by_cached_key(|&(p, l)| p.haiku_path(l));
    v
}

pub fn file_name(i: usize) -> String {
    format!("tensor{i:05}_000")
}

/// A parsed and validated release file.
#[derive(Debug, Clone)]
enum Leaf {
    Plain(ArrayRef),
    Quant { q: QuantRef, groups: usize },
}

fn describe_loaded(l: &Loaded) -> String {
    match l {
        Loaded::Array(a) => format!("a {} array of shape {:?}", a.dtype.name(), a.shape),
        Loaded::Quant(q) => format!(
            "a QuantizedWeight8bit ({} weight {:?}, {} scales {:?})",
            q.weight.dtype.name(),
            q.weight.shape,
            q.scales.dtype.name(),
            q.scales.shape
        ),
        Loaded::StateDict(d) => format!("a torch state dict of {} tensors", d.len()),
    }
}

/// Check that a file's content is what its position in the order says.
fn validate(
    loaded: Loaded,
    param: Param,
    layer: Option<usize>,
    c: &GrokConfig,
) -> std::result::Result<Leaf, String> {
    let want = param.stored_shape(c);
    let (module, name) = param.haiku_path(layer);
    let expected = if param.is_quantized() {
        format!("{module}/{name}, a QuantizedWeight8bit with int8 weight {want:?}")
    } else {
        format!("{module}/{name}, a float32 array {want:?}")
    };
    let wrong = |what: &Loaded| {
        Err(format!("holds {}, but its position says {expected}", describe_loaded(what)))
    };
    match loaded {
        Loaded::Array(a) if !param.is_quantized() => {
            if a.shape != want || a.dtype == DType::I8 {
                return wrong(&Loaded::Array(a));
            }
            Ok(Leaf::Plain(a))
        }
        Loaded::Quant(q) if param.is_quantized() => {
            let s = &q.scales.shape;
            let ok_scales = s.len() == want.len()
                && s[..s.len() - 2] == want[..want.len() - 2]
                && s[s.len() - 1] == want[want.len() - 1]
                && s[s.len() - 2] >= 1
                && want[want.len() - 2] % s[s.len() - 2] == 0;
            if q.weight.shape != want
                || q.weight.dtype != DType::I8
                || !ok_scales
                || q.scales.dtype == DType::I8
            {
                let l = Loaded::Quant(q);
                return Err(format!(
                    "holds {}, but its position says {expected} and scales [.., G, {}] with G dividing {}",
                    describe_loaded(&l),
                    want[want.len() - 1],
                    want[want.len() - 2]
                ));
            }
            let groups = s[s.len() - 2];
            Ok(Leaf::Quant { q, groups })
        }
        other => wrong(&other),
    }
}

struct File0 {
    map: Mmap,
    leaf: Leaf,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    file: usize,
    expert: usize,
    /// Stored `[in, out]`: canonical rows are stored columns.
    transposed: bool,
}

pub struct Ckpt0Source {
    dir: PathBuf,
    config: GrokConfig,
    config_from: String,
    files: Vec<File0>,
    tensors: Vec<SourceTensor>,
    slots: HashMap<Tensor, Slot>,
}

/// Parse `tensorNNNNN_HHH` into (N, H).
fn parse_file_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("tensor")?;
    let (i, h) = rest.split_once('_')?;
    if !i.bytes().all(|b| b.is_ascii_digit()) || !h.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((i.parse().ok()?, h.parse().ok()?))
}

impl Ckpt0Source {
    /// Open a `ckpt-0` directory. Hyper-parameters: `config_override` if given, else a
    /// `config.json` beside the pickles, else Grok-1's own (the release ships none).
    pub fn open(dir: &Path, config_override: Option<&Path>) -> Result<Self> {
        let beside = dir.join("config.json");
        let (config, config_from) = match config_override {
            Some(p) => (GrokConfig::from_hf_json(p)?, p.display().to_string()),
            None if beside.is_file() => {
                (GrokConfig::from_hf_json(&beside)?, beside.display().to_string())
            }
            None => (GrokConfig::default(), "Grok-1 defaults".to_string()),
        };
        let order = file_order(config.n_layers);
        let mut present: Vec<String> = std::fs::read_dir(dir)
            .at(dir)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| parse_file_name(n).is_some())
            .collect();
        present.sort();
        for n in &present {
            let (i, host) = parse_file_name(n).unwrap();
            if host != 0 || i >= order.len() || *n != file_name(i) {
                return Err(Error::bad_file(
                    dir.join(n),
                    format!(
                        "unexpected file: a {}-layer checkpoint is exactly {} files {} .. {} \
                         (hyper-parameters from {config_from})",
                        config.n_layers,
                        order.len(),
                        file_name(0),
                        file_name(order.len() - 1)
                    ),
                ));
            }
        }
        if present.len() != order.len() {
            let missing: Vec<String> = (0..order.len())
                .map(file_name)
                .filter(|n| present.binary_search(n).is_err())
                .collect();
            return Err(Error::bad_file(
                dir.join(&missing[0]),
                format!(
                    "missing ({} of the {} files of a {}-layer checkpoint missing, e.g. {}; \
                     hyper-parameters from {config_from})",
                    missing.len(),
                    order.len(),
                    config.n_layers,
                    missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let mut files = Vec::with_capacity(order.len());
        let mut tensors = Vec::new();
        let mut slots = HashMap::new();
        for (i, &(param, layer)) in order.iter().enumerate() {
            let path = dir.join(file_name(i));
            let file = File::open(&path).at(&path)?;
            // SAFETY: read-only map; a file changed underneath us is the user's error and at worst
            // yields wrong numbers, which the converter's checks report.
            let map = unsafe { Mmap::map(&file) }.at(&path)?;
            let loaded = pickle::load(&map).map_err(|e| Error::bad_file(&path, e.to_string()))?;
            let leaf =
                validate(loaded, param, layer, &config).map_err(|m| Error::bad_file(&path, m))?;
            let (module, name) = param.haiku_path(layer);
            for (expert, t) in param.tensors(layer, &config).into_iter().enumerate() {
                let transposed =
                    !matches!(param, Param::Embedding | Param::FinalNorm | Param::Norm(_));
                tensors.push(SourceTensor {
                    tensor: t,
                    shape: t.shape(&config),
                    dtype: match &leaf {
                        Leaf::Plain(a) => a.dtype.name().into(),
                        Leaf::Quant { q, .. } => format!("int8+{}", q.scales.dtype.name()),
                    },
                    origin: format!("{}: {module}/{name}", file_name(i)),
                });
                slots.insert(t, Slot { file: i, expert, transposed });
            }
            files.push(File0 { map, leaf });
        }
        tensors.sort_by_key(|t| t.tensor);
        check_tensor_set(&config, &tensors)?;
        Ok(Ckpt0Source { dir: dir.to_path_buf(), config, config_from, files, tensors, slots })
    }

    fn locate(&self, t: Tensor, row0: usize, len: usize) -> Result<(Slot, &File0, usize, usize)> {
        let slot = *self
            .slots
            .get(&t)
            .ok_or_else(|| Error::bad_tensor(t.to_string(), "not in this checkpoint"))?;
        let shape = t.shape(&self.config);
        let (rows, cols) = if shape.len() == 1 { (1, shape[0]) } else { (shape[0], shape[1]) };
        if len % cols != 0 {
            return Err(Error::bad_tensor(
                t.to_string(),
                format!("a buffer of {len} values is not a whole number of {cols}-value rows"),
            ));
        }
        if row0.checked_add(len / cols).map_or(true, |end| end > rows) {
            return Err(Error::bad_tensor(
                t.to_string(),
                format!(
                    "rows {row0}..{} are past the end ({rows} rows)",
                    row0.saturating_add(len / cols)
                ),
            ));
        }
        Ok((slot, &self.files[slot.file], rows, cols))
    }
}

/// Round to the nearest bf16: the release's effective weight is `bf16(int8 * scale)`, since
/// model.py multiplies in bf16. The product itself is exact in f32 (8 x 8 significant bits).
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    // Round half to even on the 16 bits dropped; a carry into the exponent is the correct
    // overflow to infinity. NaN is left alone (the add could turn a NaN payload into inf).
    let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    if x.is_nan() {
        x
    } else {
        r
    }
}

fn read_f32(
    leaf: &Leaf,
    bytes: &[u8],
    slot: Slot,
    rows: usize,
    cols: usize,
    row0: usize,
    out: &mut [f32],
) {
    match leaf {
        Leaf::Plain(a) => {
            let data = &bytes[a.data.start..a.data.end()];
            let view = if slot.transposed {
                View { dtype: a.dtype, base: 0, rs: 1, cs: rows }
            } else {
                View { dtype: a.dtype, base: 0, rs: cols, cs: 1 }
            };
            view.read_rows(data, cols, row0, out);
        }
        Leaf::Quant { q, groups } => {
            let w = &bytes[q.weight.data.start..q.weight.data.end()];
            let s = &bytes[q.scales.data.start..q.scales.data.end()];
            let (sd, per_group) = (q.scales.dtype, cols / groups);
            let wbase = slot.expert * cols * rows;
            let sbase = slot.expert * groups * rows;
            // The scales of a run only change with the group, so decode them once per group.
            let mut sc = [0f32; 64];
            let mut have = (usize::MAX, usize::MAX);
            transpose_rows(out.len() / cols, cols, out, |c, r, buf| {
                let (at, g) = (row0 + r, c / per_group);
                if have != (g, at) {
                    decode(sd, &s[(sbase + g * rows + at) * sd.size()..], &mut sc[..buf.len()]);
                    have = (g, at);
                }
                let n = buf.len();
                let wrun = &w[wbase + c * rows + at..][..n];
                for ((o, &qv), &sv) in buf.iter_mut().zip(wrun).zip(&sc[..n]) {
                    *o = round_bf16(qv as i8 as f32 * sv);
                }
            });
        }
    }
}

impl TensorSource for Ckpt0Source {
    fn describe(&self) -> String {
        format!(
            "ckpt-0 release pickles, {} files in {}, hyper-parameters from {}",
            self.files.len(),
            self.dir.display(),
            self.config_from
        )
    }

    fn config(&self) -> &GrokConfig {
        &self.config
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    /// Quantized tensors come out as `bf16(int8 * scale)`, the release's effective weights
    /// (identical to the bf16 Hugging Face conversions); the rest as stored.
    fn read_rows(&self, t: Tensor, row0: usize, out: &mut [f32]) -> Result<()> {
        let (slot, f, rows, cols) = self.locate(t, row0, out.len())?;
        read_f32(&f.leaf, &f.map, slot, rows, cols, row0, out);
        Ok(())
    }

    fn read_rows_int8(
        &self,
        t: Tensor,
        row0: usize,
        q: &mut [i8],
        scales: &mut [f32],
    ) -> Result<bool> {
        let (slot, f, rows, cols) = self.locate(t, row0, q.len())?;
        let Leaf::Quant { q: qr, groups } = &f.leaf else { return Ok(false) };
        let n = q.len() / cols;
        if scales.len() != n * groups {
            return Err(Error::bad_tensor(
                t.to_string(),
                format!(
                    "{n} rows of {groups} scale groups need {} scales, got {}",
                    n * groups,
                    scales.len()
                ),
            ));
        }
        let w = &f.map[qr.weight.data.start..qr.weight.data.end()];
        let s = &f.map[qr.scales.data.start..qr.scales.data.end()];
        let wbase = slot.expert * cols * rows;
        transpose_rows(n, cols, q, |c, r, buf| {
            for (o, &b) in buf.iter_mut().zip(&w[wbase + c * rows + row0 + r..]) {
                *o = b as i8;
            }
        });
        let sbase = slot.expert * groups * rows;
        for r in 0..n {
            for g in 0..*groups {
                scales[r * groups + g] =
                    decode_one(qr.scales.dtype, s, sbase + g * rows + row0 + r);
            }
        }
        Ok(true)
    }

    fn int8_groups(&self, t: Tensor) -> Option<usize> {
        let slot = self.slots.get(&t)?;
        match self.files[slot.file].leaf {
            Leaf::Quant { groups, .. } => Some(groups),
            Leaf::Plain(_) => None,
        }
    }

    fn tokenizer_path(&self) -> Option<PathBuf> {
        // The release keeps tokenizer.model at the repository root, beside checkpoints/ckpt-0.
        [self.dir.clone(), self.dir.join(".."), self.dir.join("../..")]
            .into_iter()
            .map(|d| d.join("tokenizer.model"))
            .find(|p| p.is_file())
    }

    fn input_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|f| match &f.leaf {
                Leaf::Plain(a) => a.data.len as u64,
                Leaf::Quant { q, .. } => (q.weight.data.len + q.scales.data.len) as u64,
            })
            .sum()
    }
}

/// Decode one release file as if it sat at position `index` of a checkpoint with config `c`:
/// parse, validate, and read every canonical tensor in it completely. For inspecting single
/// files and for robustness tests; `path` only labels errors.
pub fn decode_file(
    c: &GrokConfig,
    index: usize,
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<(Tensor, Vec<f32>)>> {
    let order = file_order(c.n_layers);
    let &(param, layer) = order.get(index).ok_or_else(|| {
        Error::bad_file(path, format!("index {index} is past the {} files", order.len()))
    })?;
    let loaded = pickle::load(bytes).map_err(|e| Error::bad_file(path, e.to_string()))?;
    let leaf = validate(loaded, param, layer, c).map_err(|m| Error::bad_file(path, m))?;
    let transposed = !matches!(param, Param::Embedding | Param::FinalNorm | Param::Norm(_));
    let mut out = Vec::new();
    for (expert, t) in param.tensors(layer, c).into_iter().enumerate() {
        let shape = t.shape(c);
        let (rows, cols) = if shape.len() == 1 { (1, shape[0]) } else { (shape[0], shape[1]) };
        let mut v = vec![0f32; rows * cols];
        read_f32(&leaf, bytes, Slot { file: index, expert, transposed }, rows, cols, 0, &mut v);
        out.push((t, v));
    }
    Ok(out)
}

impl std::fmt::Debug for Ckpt0Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ckpt0Source({})", self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_order_is_lexicographic_in_the_layer_number() {
        let o = file_order(64);
        assert_eq!(o.len(), 770);
        assert_eq!(o[0], (Param::Embedding, None));
        assert_eq!(o[1], (Param::FinalNorm, None));
        // File index = 2 + 12 * rank(str(L)) + slot.
        let mut ranked: Vec<usize> = (0..64).collect();
        ranked.sort_by_key(|l| l.to_string());
        assert_eq!(&ranked[..4], &[0, 1, 10, 11]);
        for (rank, &l) in ranked.iter().enumerate() {
            for (slot, &p) in Param::LAYER.iter().enumerate() {
                assert_eq!(o[2 + 12 * rank + slot], (p, Some(l)), "layer {l} slot {slot}");
            }
        }
        assert_eq!(o[2 + 12 * 63 + 11], (Param::Router, Some(9)));
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut x = 0x2545_f491_u32;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let f = f32::from_bits(x);
            let want = half::bf16::from_f32(f).to_f32();
            assert!(
                round_bf16(f).to_bits() == want.to_bits() || (f.is_nan() && round_bf16(f).is_nan()),
                "{x:#x}"
            );
        }
        for f in [
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            0.0,
            -0.0,
            1.0 + f32::EPSILON,
            f32::MIN_POSITIVE / 3.0,
        ] {
            assert_eq!(round_bf16(f).to_bits(), half::bf16::from_f32(f).to_f32().to_bits(), "{f}");
        }
    }

    #[test]
    fn file_names_parse() {
        assert_eq!(parse_file_name("tensor00769_000"), Some((769, 0)));
        assert_eq!(parse_file_name("tensor00001_001"), Some((1, 1)));
        assert_eq!(parse_file_name("tensor_x"), None);
        assert_eq!(parse_file_name("config.json"), None);
    }
}
