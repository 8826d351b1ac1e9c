//! Hugging Face safetensors checkpoints: one `model.safetensors` or shards with
//! `model.safetensors.index.json`, in keyfan or hpcai naming, bf16 / f16 / f32.

use super::names::{parse_hf, Naming, Parsed, Tensor};
use super::strided::{decode, DType};
use super::{check_tensor_set, SourceTensor, TensorSource};
use crate::config::GrokConfig;
use crate::error::{Error, IoContext, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct Entry {
    file: usize,
    /// Byte range of the data inside the file.
    start: usize,
    len: usize,
    dtype: Dtype,
}

pub struct SafetensorsSource {
    dir: PathBuf,
    config: GrokConfig,
    naming: Naming,
    files: Vec<(PathBuf, Mmap)>,
    tensors: Vec<SourceTensor>,
    entries: HashMap<Tensor, Entry>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(Error::bad_file(&config_path, "missing: a checkpoint needs its config.json"));
        }
        let config = GrokConfig::from_hf_json(&config_path)?;
        let file_names = shard_files(dir)?;
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        let mut entries = HashMap::new();
        let mut naming = None;
        for (fi, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).at(&path)?;
            // SAFETY: the map is read-only; a checkpoint modified while we convert it is the
            // user's error and shows up as a checksum or shape error, not UB in safe code we own.
            let map = unsafe { Mmap::map(&file) }.at(&path)?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                Error::bad_file(&path, format!("corrupt or truncated safetensors file: {e:?}"))
            })?;
            let data_start = 8 + header_len;
            for (orig, info) in meta.tensors() {
                let (n, parsed) = parse_hf(&orig);
                let t = match parsed {
                    Parsed::TiedHead => continue,
                    Parsed::Unknown => {
                        return Err(Error::bad_file(
                            &path,
                            format!("unknown tensor `{orig}`: not part of the Grok-1 architecture"),
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
                                format!("tensor `{orig}` mixes {n:?} naming into a {prev:?} checkpoint"),
                            ))
                        }
                        _ => {}
                    }
                }
                let dtype_name = match info.dtype {
                    Dtype::BF16 => "bf16",
                    Dtype::F16 => "f16",
                    Dtype::F32 => "f32",
                    other => {
                        return Err(Error::bad_file(
                            &path,
                            format!("tensor `{orig}` has dtype {other:?}; supported: BF16, F16, F32"),
                        ))
                    }
                };
                let (s, e) = info.data_offsets;
                tensors.push(SourceTensor {
                    tensor: t,
                    shape: info.shape.clone(),
                    dtype: dtype_name.into(),
                    origin: format!("{name}: {orig}"),
                });
                entries.insert(t, Entry { file: fi, start: data_start + s, len: e - s, dtype: info.dtype });
            }
            files.push((path, map));
        }
        let naming = naming.ok_or_else(|| Error::bad_file(dir, "no Grok-1 tensors found"))?;
        tensors.sort_by_key(|t| t.tensor);
        check_tensor_set(&config, &tensors)?;
        Ok(SafetensorsSource { dir: dir.to_path_buf(), config, naming, files, tensors, entries })
    }
}

impl SafetensorsSource {
    fn row_range(&self, t: Tensor, row0: usize, nrows: usize) -> Option<(&Mmap, usize, usize)> {
        let e = self.entries.get(&t)?;
        let cols = *t.shape(&self.config).last().unwrap();
        let row_bytes = cols * e.dtype.size();
        let off = e.start + row0 * row_bytes;
        let len = (nrows * row_bytes).min(e.start + e.len - off.min(e.start + e.len));
        Some((&self.files[e.file].1, off, len))
    }
}

/// The shard files to read: from the index when there is one, else every `*.safetensors`.
fn shard_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).at(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_file(&index, "no `weight_map` object"))?;
        let mut files: Vec<String> =
            map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
        files.sort();
        files.dedup();
        for f in &files {
            if f.contains('/') || f.contains("..") || !dir.join(f).is_file() {
                return Err(Error::bad_file(&index, format!("names shard `{f}`, which is missing")));
            }
        }
        return Ok(files);
    }
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

impl TensorSource for SafetensorsSource {
    fn describe(&self) -> String {
        format!(
            "safetensors, {:?} naming, {} file(s) in {}",
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
        let cols = *t.shape(&self.config).last().unwrap();
        let esize = e.dtype.size();
        let start = e.start + row0 * cols * esize;
        let end = start + out.len() * esize;
        if end > e.start + e.len {
            return Err(Error::bad_tensor(t.to_string(), "row range past the end of the tensor"));
        }
        let bytes = &self.files[e.file].1[start..end];
        let dtype = match e.dtype {
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            _ => unreachable!("dtype checked at open"),
        };
        decode(dtype, bytes, out);
        Ok(())
    }

    fn prefetch_rows(&self, t: Tensor, row0: usize, nrows: usize) {
        if let Some((map, off, len)) = self.row_range(t, row0, nrows) {
            let _ = map.advise_range(memmap2::Advice::WillNeed, off, len);
        }
    }

    fn done_with_rows(&self, t: Tensor, row0: usize, nrows: usize) {
        if let Some((map, off, len)) = self.row_range(t, row0, nrows) {
            // Only whole pages inside the range: a neighbour's rows may still be in use.
            let page = 4096;
            let start = off.div_ceil(page) * page;
            let end = (off + len) / page * page;
            if end > start {
                // SAFETY: the map is a read-only file mapping; dropped pages are re-read from
                // the file if touched again, so no data visible to safe code changes.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                };
            }
        }
    }

    fn tokenizer_path(&self) -> Option<PathBuf> {
        let p = self.dir.join("tokenizer.model");
        p.is_file().then_some(p)
    }

    fn input_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.len as u64).sum()
    }
}
