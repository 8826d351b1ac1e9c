//! PyTorch `.bin` checkpoints (`torch.save` zip archives), as the keyfan and hpcai conversions
//! ship them: `pytorch_model.bin`, or shards `pytorch_model-*.bin` with
//! `pytorch_model.bin.index.json`. Tensors are views of storages (`{archive}/data/{key}`), read
//! in place from the memory map with their offset and strides; bf16, f16 and f32 storages.

use super::names::{parse_hf, Naming, Parsed, Tensor};
use super::pickle::{self, Loaded, TorchTensorRef};
use super::strided::View;
use super::zip;
use super::{check_tensor_set, SourceTensor, TensorSource};
use crate::config::GrokConfig;
use crate::error::{Error, IoContext, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A tensor of an archive, checked against its storage.
#[derive(Debug, Clone)]
pub struct ArchiveTensor {
    pub name: String,
    pub tensor: TorchTensorRef,
    /// Bytes of its storage in the archive.
    pub storage: Range<usize>,
}

impl ArchiveTensor {
    fn view(&self) -> (View, usize, usize) {
        let t = &self.tensor;
        match t.shape.len() {
            0 => (View { dtype: t.dtype, base: t.offset, rs: 1, cs: 1 }, 1, 1),
            1 => (View { dtype: t.dtype, base: t.offset, rs: 0, cs: t.stride[0] }, 1, t.shape[0]),
            _ => (
                View { dtype: t.dtype, base: t.offset, rs: t.stride[0], cs: t.stride[1] },
                t.shape[0],
                t.shape[1],
            ),
        }
    }

    /// Every element as f32, row-major. `archive` is the buffer `read_archive` parsed.
    pub fn read_all(&self, archive: &[u8]) -> Vec<f32> {
        let (view, rows, cols) = self.view();
        let mut v = vec![0f32; rows * cols];
        if !v.is_empty() {
            view.read_rows(&archive[self.storage.clone()], cols, 0, &mut v);
        }
        v
    }
}

/// Parse one archive: the zip directory, `data.pkl`, and every tensor's reach into its storage.
pub fn read_archive(bytes: &[u8]) -> std::result::Result<Vec<ArchiveTensor>, String> {
    if bytes.starts_with(&[0x80, 0x02]) || bytes.starts_with(&[0x80, 0x04]) {
        return Err(
            "legacy torch.save format (before PyTorch 1.6): re-save it with a newer torch".into()
        );
    }
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err("not a torch.save zip archive".into());
    }
    let idx = zip::read_index(bytes)?;
    let pkl: Vec<&String> = idx
        .names
        .iter()
        .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .collect();
    let [pkl] = pkl[..] else {
        return Err(format!("expected one `<archive>/data.pkl` record, found {}", pkl.len()));
    };
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if let Some(r) = idx.entries.get(&format!("{prefix}byteorder")) {
        if &bytes[r.clone()] != b"little" {
            return Err("big-endian archive: only little-endian storages are supported".into());
        }
    }
    let loaded =
        pickle::load(&bytes[idx.entries[pkl].clone()]).map_err(|e| format!("{pkl}: {e}"))?;
    let Loaded::StateDict(items) = loaded else {
        return Err(format!("{pkl} holds no state dict of tensors"));
    };
    let mut out = Vec::with_capacity(items.len());
    for (name, t) in items {
        let key = format!("{prefix}data/{}", t.storage_key);
        let storage = idx
            .entries
            .get(&key)
            .ok_or_else(|| format!("`{name}`: storage record `{key}` is missing"))?;
        let need = t.storage_numel.checked_mul(t.dtype.size());
        if need.map_or(true, |n| n > storage.len()) {
            return Err(format!(
                "`{name}`: storage `{key}` holds {} bytes, the pickle declares {} {} elements",
                storage.len(),
                t.storage_numel,
                t.dtype.name()
            ));
        }
        if t.shape.len() > 2 {
            return Err(format!(
                "`{name}`: {}-dimensional tensors are not part of Grok-1",
                t.shape.len()
            ));
        }
        // A weight never overlaps itself, so it has no more elements than its storage; this
        // also bounds what reading it allocates.
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel.map_or(true, |n| n > t.storage_numel) {
            return Err(format!(
                "`{name}`: size {:?} has more elements than its storage ({})",
                t.shape, t.storage_numel
            ));
        }
        // The last element the view reaches must lie inside the storage.
        let reach = t.shape.iter().zip(&t.stride).try_fold(t.offset, |acc, (&n, &s)| {
            if n == 0 {
                Some(acc)
            } else {
                acc.checked_add((n - 1).checked_mul(s)?)
            }
        });
        let empty = t.shape.contains(&0);
        if !empty && reach.map_or(true, |r| r >= t.storage_numel) {
            return Err(format!(
                "`{name}`: view (offset {}, size {:?}, stride {:?}) reaches past its storage of {} elements",
                t.offset, t.shape, t.stride, t.storage_numel
            ));
        }
        out.push(ArchiveTensor { name, tensor: t, storage: storage.clone() });
    }
    Ok(out)
}

struct Entry {
    file: usize,
    t: ArchiveTensor,
}

pub struct TorchBinSource {
    dir: PathBuf,
    config: GrokConfig,
    naming: Naming,
    files: Vec<(PathBuf, Mmap)>,
    tensors: Vec<SourceTensor>,
    entries: HashMap<Tensor, Entry>,
}

/// Tensor name -> shard file, as an index lists them.
type WeightMap = HashMap<String, String>;

/// Shards from the index when there is one, else `pytorch_model*.bin`. Also returns the index's
/// weight map, to check against the shards' contents.
fn shard_files(dir: &Path) -> Result<(Vec<String>, Option<WeightMap>)> {
    let index = dir.join("pytorch_model.bin.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).at(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_file(&index, "no `weight_map` object"))?;
        let mut wm = HashMap::new();
        for (k, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| Error::bad_file(&index, format!("`{k}` maps to a non-string")))?;
            wm.insert(k.clone(), f.to_string());
        }
        let mut files: Vec<String> = wm.values().cloned().collect();
        files.sort();
        files.dedup();
        for f in &files {
            if f.contains('/') || f.contains('\\') || f.contains("..") || !dir.join(f).is_file() {
                return Err(Error::bad_file(
                    &index,
                    format!("names shard `{f}`, which is missing"),
                ));
            }
        }
        return Ok((files, Some(wm)));
    }
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("pytorch_model") && n.ends_with(".bin"))
        .collect();
    files.sort();
    Ok((files, None))
}

impl TorchBinSource {
    /// Open a directory of `.bin` shards. Hyper-parameters from `config_override` if given, else
    /// the directory's `config.json`.
    pub fn open(dir: &Path, config_override: Option<&Path>) -> Result<Self> {
        let config_path =
            config_override.map(Path::to_path_buf).unwrap_or_else(|| dir.join("config.json"));
        if !config_path.exists() {
            return Err(Error::bad_file(
                &config_path,
                "missing: a checkpoint needs its config.json",
            ));
        }
        let config = GrokConfig::from_hf_json(&config_path)?;
        let (names, weight_map) = shard_files(dir)?;
        if names.is_empty() {
            return Err(Error::bad_file(dir, "no pytorch_model*.bin files"));
        }
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        let mut entries = HashMap::new();
        let mut naming = None;
        let mut where_: HashMap<String, usize> = HashMap::new();
        for (fi, fname) in names.iter().enumerate() {
            let path = dir.join(fname);
            let file = File::open(&path).at(&path)?;
            // SAFETY: read-only map; see SafetensorsSource.
            let map = unsafe { Mmap::map(&file) }.at(&path)?;
            let archive = read_archive(&map).map_err(|m| Error::bad_file(&path, m))?;
            for at in archive {
                where_.insert(at.name.clone(), fi);
                let (n, parsed) = parse_hf(&at.name);
                let t = match parsed {
                    Parsed::TiedHead => continue,
                    Parsed::Unknown => {
                        return Err(Error::bad_file(
                            &path,
                            format!(
                                "unknown tensor `{}`: not part of the Grok-1 architecture",
                                at.name
                            ),
                        ))
                    }
                    Parsed::Tensor(t) => t,
                };
                if let Some(n) = n {
                    match naming {
                        None => naming = Some(n),
                        Some(prev) if prev != n => {
                            return Err(Error::bad_file(
                                &path,
                                format!(
                                    "tensor `{}` mixes {n:?} naming into a {prev:?} checkpoint",
                                    at.name
                                ),
                            ))
                        }
                        _ => {}
                    }
                }
                tensors.push(SourceTensor {
                    tensor: t,
                    shape: at.tensor.shape.clone(),
                    dtype: at.tensor.dtype.name().into(),
                    origin: format!("{fname}: {}", at.name),
                });
                if let Some(prev) = entries.insert(t, Entry { file: fi, t: at }) {
                    return Err(Error::bad_tensor(
                        t.to_string(),
                        format!("appears twice: {} and {fname}", names[prev.file]),
                    ));
                }
            }
            files.push((path, map));
        }
        if let Some(wm) = weight_map {
            let index = dir.join("pytorch_model.bin.index.json");
            for (name, shard) in &wm {
                match where_.get(name) {
                    Some(&fi) if names[fi] == *shard => {}
                    Some(&fi) => {
                        return Err(Error::bad_file(
                            &index,
                            format!("maps `{name}` to {shard}, but it is in {}", names[fi]),
                        ))
                    }
                    None => {
                        return Err(Error::bad_file(
                            &index,
                            format!("maps `{name}` to {shard}, which lacks it"),
                        ))
                    }
                }
            }
        }
        let naming = naming.ok_or_else(|| Error::bad_file(dir, "no Grok-1 tensors found"))?;
        tensors.sort_by_key(|t| t.tensor);
        check_tensor_set(&config, &tensors)?;
        Ok(TorchBinSource { dir: dir.to_path_buf(), config, naming, files, tensors, entries })
    }
}

impl TensorSource for TorchBinSource {
    fn describe(&self) -> String {
        format!(
            "PyTorch .bin, {:?} naming, {} file(s) in {}",
            self.naming,
            self.files.len(),
            self.dir.display()
        )
    }

    fn config(&self) -> &GrokConfig {
        &self.config
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn read_rows(&self, t: Tensor, row0: usize, out: &mut [f32]) -> Result<()> {
        let e = self
            .entries
            .get(&t)
            .ok_or_else(|| Error::bad_tensor(t.to_string(), "not in this checkpoint"))?;
        let (view, rows, cols) = e.t.view();
        if cols == 0
            || out.len() % cols != 0
            || row0.checked_add(out.len() / cols).map_or(true, |end| end > rows)
        {
            return Err(Error::bad_tensor(t.to_string(), "row range past the end of the tensor"));
        }
        view.read_rows(&self.files[e.file].1[e.t.storage.clone()], cols, row0, out);
        Ok(())
    }

    fn tokenizer_path(&self) -> Option<PathBuf> {
        let p = self.dir.join("tokenizer.model");
        p.is_file().then_some(p)
    }

    fn input_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| (e.t.tensor.shape.iter().product::<usize>() * e.t.tensor.dtype.size()) as u64)
            .sum()
    }
}
