//! Deterministic random checkpoints of the Grok-1 architecture, for demos, tests and benchmarks.
//!
//! `write` lays a preset out exactly as a published Hugging Face checkpoint: `config.json`, one
//! `model.safetensors` or shards with `model.safetensors.index.json`, in keyfan or hpcai naming,
//! bf16 (or f32) tensors in `[out, in]` orientation, the tied `lm_head.weight` left out unless
//! asked for. The same preset and seed give byte-identical files on any number of threads; both
//! namings and both element types hold the same weights (f32 rounds to the bf16 file).
//!
//! Every block of rows draws from its own stream, keyed by (seed, canonical tensor name, block),
//! so blocks are generated in parallel and in any order. Weights come from a quantile table:
//! 16 random bits per weight, no transcendental functions, gigabytes per second per core.
//!
//! Files are written under temporary names, fsynced and renamed into place; the index (or the
//! single `model.safetensors`) comes last, so a checkpoint that opens is complete. `progress`
//! reaches its total when the last byte is handed to the kernel; the final fsyncs follow.

mod dist;
mod plan;
mod presets;
mod rng;
mod writer;

pub use dist::{Init, Shape};
pub use plan::{hf_name, Plan};
pub use presets::{InitScales, Preset};
pub use writer::BLOCK_ELEMS;

use crate::checkpoint::Naming;
use crate::error::{Error, IoContext, Result};
use dist::{unit_table, Table};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Stored element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDtype {
    Bf16,
    F32,
}

impl SynthDtype {
    pub fn bytes(self) -> usize {
        match self {
            SynthDtype::Bf16 => 2,
            SynthDtype::F32 => 4,
        }
    }
    fn safetensors_name(self) -> &'static str {
        match self {
            SynthDtype::Bf16 => "BF16",
            SynthDtype::F32 => "F32",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub seed: u64,
    pub naming: Naming,
    pub dtype: SynthDtype,
    /// Most tensor-data bytes per file; a checkpoint that fits is one `model.safetensors`.
    pub shard_bytes: u64,
    /// Also store the tied output head as `lm_head.weight`, as keyfan's upload does.
    pub write_lm_head: bool,
    /// Written as `tokenizer.model` when given.
    pub tokenizer_model: Option<Vec<u8>>,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 0,
            naming: Naming::Keyfan,
            dtype: SynthDtype::Bf16,
            shard_bytes: 2 << 30,
            write_lm_head: false,
            tokenizer_model: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub dir: PathBuf,
    /// The safetensors files, in order.
    pub files: Vec<String>,
    pub n_tensors: usize,
    /// Unique parameters of the model.
    pub params: u64,
    /// Tensor data written (what `progress` counted up to).
    pub data_bytes: u64,
    /// Size of the safetensors files, headers included.
    pub file_bytes: u64,
}

/// Lay out `preset` without writing anything: file names, sizes, the total for progress bars.
pub fn plan(preset: &Preset, opts: &SynthOptions) -> Result<Plan> {
    plan::plan(preset, opts)
}

/// Write `preset` as a Hugging Face checkpoint into `out_dir` (created if missing). `progress`
/// receives the cumulative tensor-data bytes written, up to `plan(..).data_bytes()`; it is called
/// on the calling thread. Runs on the current rayon pool.
pub fn write(
    preset: &Preset,
    out_dir: &Path,
    opts: &SynthOptions,
    progress: &dyn Fn(u64),
) -> Result<SynthSummary> {
    let plan = plan::plan(preset, opts)?;
    std::fs::create_dir_all(out_dir).at(out_dir)?;
    check_no_foreign_checkpoint(out_dir, &plan)?;
    let small_files = plan.config_json.len() as u64
        + plan.index_json.as_ref().map_or(0, |s| s.len() as u64)
        + opts.tokenizer_model.as_ref().map_or(0, |t| t.len() as u64);
    check_free_space(out_dir, plan.file_bytes() + small_files)?;

    write_atomic(&out_dir.join("config.json"), plan.config_json.as_bytes())?;
    write_atomic(&out_dir.join("generation_meta.json"), meta_json(preset, opts).as_bytes())?;
    if let Some(tok) = &opts.tokenizer_model {
        write_atomic(&out_dir.join("tokenizer.model"), tok)?;
    }

    // One scaled table per distinct distribution (a handful per preset), shared by its tensors.
    let normal = unit_table(Shape::Normal);
    let heavy_shape =
        Shape::Mixture { fraction: preset.init.outlier_fraction, scale: preset.init.outlier_scale };
    let heavy = unit_table(heavy_shape);
    let mut tables: Vec<(Init, Arc<Table>)> = Vec::new();
    let mut table_for = |init: Init| -> Arc<Table> {
        if let Some((_, t)) = tables.iter().find(|(i, _)| *i == init) {
            return t.clone();
        }
        let unit = if init.shape == Shape::Normal { &normal } else { &heavy };
        let t = Arc::new(Table::new(unit, &init, opts.dtype == SynthDtype::Bf16));
        tables.push((init, t.clone()));
        t
    };

    let mut done = 0u64;
    let mut pending = Vec::with_capacity(plan.files.len());
    for file in &plan.files {
        let sources: Vec<writer::Source> = file
            .items
            .iter()
            .map(|it| {
                let mut src = writer::Source::new(&it.source.to_string(), table_for(preset.init_of(it.source)));
                if let crate::checkpoint::Tensor::Router(l) = it.source {
                    src.row_gains = preset.router_row_gains(l);
                }
                src
            })
            .collect();
        pending.push(writer::write_file(out_dir, file, &sources, opts.seed, &mut done, progress)?);
    }
    // Fsync only now: the kernel has been writing earlier shards back while later ones were
    // generated. Anything uncommitted is removed when `pending` drops on an error.
    for p in pending.drain(..) {
        p.commit()?;
    }
    if let Some(index) = &plan.index_json {
        write_atomic(&out_dir.join("model.safetensors.index.json"), index.as_bytes())?;
    }
    sync_dir(out_dir)?;
    Ok(SynthSummary {
        dir: out_dir.to_path_buf(),
        files: plan.file_names().into_iter().map(String::from).collect(),
        n_tensors: plan.n_tensors(),
        params: preset.params(),
        data_bytes: plan.data_bytes(),
        file_bytes: plan.file_bytes(),
    })
}

fn meta_json(preset: &Preset, opts: &SynthOptions) -> String {
    let s = &preset.init;
    let mut v = serde_json::json!({
        "tool": concat!("grok1 ", env!("CARGO_PKG_VERSION"), " synth"),
        "preset": preset.name,
        "seed": opts.seed,
        "naming": plan::naming_name(opts.naming),
        "dtype": opts.dtype.safetensors_name(),
        "lm_head": opts.write_lm_head,
        "init": {
            "embed_std": s.embed_std,
            "norm_std": s.norm_std,
            "qk_gain": s.qk_gain,
            "router_gain": s.router_gain,
            "outlier_fraction": s.outlier_fraction,
            "outlier_scale": s.outlier_scale,
        },
    });
    // Only when on, so that a default checkpoint's files are what they always were.
    if s.routing_skew != 0.0 {
        v["init"]["routing_skew"] = serde_json::json!(s.routing_skew);
    }
    serde_json::to_string_pretty(&v).expect("JSON of strings and numbers") + "\n"
}

/// Safetensors files or an index we would not overwrite would be read together with ours.
fn check_no_foreign_checkpoint(dir: &Path, plan: &Plan) -> Result<()> {
    let ours = plan.file_names();
    for e in std::fs::read_dir(dir).at(dir)? {
        let name = e.at(dir)?.file_name().to_string_lossy().into_owned();
        let foreign = (name.ends_with(".safetensors") && !ours.contains(&name.as_str()))
            || (name == "model.safetensors.index.json" && plan.index_json.is_none());
        if foreign {
            return Err(Error::bad_file(
                dir.join(&name),
                "already in the output directory and not part of this checkpoint; \
                 remove it or write to another directory",
            ));
        }
    }
    Ok(())
}

/// Refuse up front rather than fail after writing gigabytes.
pub(crate) fn check_free_space(dir: &Path, need: u64) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| Error::bad_file(dir, "path contains a NUL byte"))?;
        // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(Error::io(dir, std::io::Error::last_os_error()));
        }
        let free = st.f_bavail as u64 * st.f_frsize as u64;
        if free < need {
            return Err(Error::bad_file(
                dir,
                format!(
                    "not enough free space: the checkpoint needs {need} bytes ({:.2} GB), \
                     the file system has {free} ({:.2} GB)",
                    need as f64 / 1e9,
                    free as f64 / 1e9
                ),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (dir, need);
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    r.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Make the renames durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_when_space_is_short() {
        let dir = std::env::temp_dir();
        check_free_space(&dir, 1 << 20).unwrap();
        let e = check_free_space(&dir, u64::MAX / 2).unwrap_err().to_string();
        assert!(
            e.contains("not enough free space") && e.contains(&dir.display().to_string()),
            "{e}"
        );
    }
}
