//! Finding NVRTC and compiling the kernel program with it. Needs no GPU: compiling to PTX is a
//! pure function of the source, so a machine with only `libnvrtc` can check every kernel.
//!
//! cudarc opens NVRTC by its usual names (`libnvrtc.so`, `libnvrtc.so.13`, ...) through the
//! loader's search path. A library elsewhere (a pip wheel, say) is named by the environment
//! variable [`NVRTC_ENV`]; it is opened first with its full path, after which the loader hands
//! it out under its soname to cudarc.

use super::source;
use crate::error::{Error, Result};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use std::ffi::CString;
use std::sync::OnceLock;

/// Full path of a `libnvrtc.so.*` to use instead of searching the loader's path.
pub const NVRTC_ENV: &str = "GROK1_NVRTC";

/// Virtual architectures the kernels can be compiled for, oldest first. The kernels need
/// nothing beyond compute_70 (warp shuffles with masks, 64-bit atomics are not used), but CUDA
/// 13 dropped everything before compute_75.
pub const ARCHS: [&str; 8] = [
    "compute_75",
    "compute_80",
    "compute_86",
    "compute_87",
    "compute_89",
    "compute_90",
    "compute_100",
    "compute_120",
];

/// Open a library by full path for the life of the process.
fn dlopen_global(path: &std::path::Path) -> std::result::Result<(), String> {
    let shown = path.display().to_string();
    let c = CString::new(shown.clone()).map_err(|_| format!("{shown}: not a path"))?;
    // SAFETY: dlopen with a valid C string; the handle is deliberately never closed, so the
    // library stays mapped for whoever looks it up again by soname.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("{shown} does not load: {why}"));
    }
    Ok(())
}

/// With [`NVRTC_ENV`] set, open that library, and before it its `libnvrtc-builtins` from the
/// same folder: NVRTC opens the builtins by bare name at its first compile, which only finds
/// them on the loader's path or, as here, already loaded.
fn preload() -> &'static std::result::Result<(), String> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let Some(path) = std::env::var_os(NVRTC_ENV) else { return Ok(()) };
        let path = std::path::PathBuf::from(path);
        if let Some(dir) = path.parent() {
            let builtins =
                std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
                });
            for b in builtins {
                dlopen_global(&b).map_err(|e| format!("{NVRTC_ENV}: {e}"))?;
            }
        }
        dlopen_global(&path).map_err(|e| format!("{NVRTC_ENV}: {e}"))
    })
}

/// Whether NVRTC can be loaded, and if not why.
pub fn present() -> std::result::Result<(), String> {
    preload().clone()?;
    // SAFETY: only tries to open the library by its candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(format!(
            "libnvrtc not found (install the CUDA toolkit or the nvidia-cuda-nvrtc wheel, and put \
             its lib folder on LD_LIBRARY_PATH or set {NVRTC_ENV} to the library's path)"
        ))
    }
}

/// NVRTC's version, (major, minor).
pub fn version() -> Result<(u32, u32)> {
    present().map_err(Error::Gpu)?;
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is present (checked above); the call writes two ints.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Gpu(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major as u32, minor as u32))
}

/// The virtual architectures this NVRTC can compile for, from [`ARCHS`] (which lists every
/// architecture with a device this tier runs on, so `sm_for` can consult the same list).
pub fn supported_archs() -> Result<Vec<&'static str>> {
    present().map_err(Error::Gpu)?;
    use cudarc::nvrtc::sys;
    let mut n = 0i32;
    // SAFETY: the library is present; the calls fill an int and then `n` ints.
    let nums = unsafe {
        if sys::nvrtcGetNumSupportedArchs(&mut n) != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Gpu("nvrtcGetNumSupportedArchs failed".into()));
        }
        let mut v = vec![0i32; n.max(0) as usize];
        if sys::nvrtcGetSupportedArchs(v.as_mut_ptr()) != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Gpu("nvrtcGetSupportedArchs failed".into()));
        }
        v
    };
    Ok(ARCHS.iter().copied().filter(|a| nums.contains(&arch_number(a))).collect())
}

fn arch_number(arch: &str) -> i32 {
    arch.trim_start_matches("compute_").parse().unwrap_or(0)
}

/// The newest architecture in `supported` that a device of compute capability `cc` runs: PTX
/// for an older virtual architecture is JIT-compiled for newer devices by the driver.
pub fn arch_for(cc: (u32, u32), supported: &[&'static str]) -> Option<&'static str> {
    let dev = (cc.0 * 10 + cc.1) as i32;
    supported.iter().copied().filter(|a| arch_number(a) <= dev).max_by_key(|a| arch_number(a))
}

/// Compile the whole kernel program to PTX for `arch`.
pub fn compile(arch: &'static str) -> Result<Ptx> {
    present().map_err(Error::Gpu)?;
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some("grok1_kernels.cu".into()),
        // The kernels follow the CPU's f32 semantics; keep IEEE division and square roots.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(source::program(), opts).map_err(|e| match e {
        CompileError::CompileError { log, options, .. } => Error::Gpu(format!(
            "NVRTC could not compile the kernels for {arch} (options {options:?}):\n{}",
            log.to_string_lossy()
        )),
        other => Error::Gpu(format!("NVRTC failed for {arch}: {other}")),
    })
}

/// Compile for a real architecture (e.g. `sm_90`) to a CUBIN, the machine code the driver loads
/// as it is, and return it with the compiler log (ptxas's report of registers, shared memory
/// and spills per kernel). Preferred over PTX where NVRTC knows the device: the driver then
/// JIT-compiles nothing, which also works when NVRTC is newer than the driver.
pub fn compile_cubin(sm: &str) -> Result<(Vec<u8>, String)> {
    use cudarc::nvrtc::{result, sys};
    present().map_err(Error::Gpu)?;
    let src = CString::new(source::program()).expect("sources hold no NUL");
    let name = CString::new("grok1_kernels.cu").expect("no NUL");
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| Error::Gpu(format!("nvrtcCreateProgram: {e:?}")))?;
    let opts = vec![
        format!("--gpu-architecture={sm}"),
        "--ptxas-options=-v".to_string(),
        "--std=c++17".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
    ];
    // SAFETY: `prog` is a live program until destroyed below; options are plain strings; the
    // CUBIN buffer is sized by NVRTC's own report.
    let (compiled, log, cubin) = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| std::ffi::CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cubin = Vec::new();
        if compiled.is_ok() {
            let mut n = 0usize;
            if sys::nvrtcGetCUBINSize(prog, &mut n) == sys::nvrtcResult::NVRTC_SUCCESS && n > 0 {
                cubin = vec![0u8; n];
                if sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) != sys::nvrtcResult::NVRTC_SUCCESS {
                    cubin.clear();
                }
            }
        }
        let _ = result::destroy_program(prog);
        (compiled, log, cubin)
    };
    compiled
        .map_err(|e| Error::Gpu(format!("NVRTC could not compile the kernels for {sm}: {e:?}\n{log}")))?;
    if cubin.is_empty() {
        return Err(Error::Gpu(format!("NVRTC compiled for {sm} but returned no CUBIN")));
    }
    Ok((cubin, log))
}

/// The real architecture `sm_XY` of a device of compute capability `cc`, if this NVRTC
/// (`supported`, from [`supported_archs`]) generates code for exactly it.
pub fn sm_for(cc: (u32, u32), supported: &[&'static str]) -> Option<String> {
    let n = cc.0 * 10 + cc.1;
    supported.iter().any(|a| arch_number(a) == n as i32).then(|| format!("sm_{n}"))
}
