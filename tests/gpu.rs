//! The GPU tier against the CPU reference. Two levels, each skipping with a printed reason when
//! what it needs is absent:
//! * NVRTC only (no GPU): every kernel source compiles to PTX for compute_80 and compute_90 and
//!   defines every kernel the code launches.
//! * a GPU: every kernel against the CPU on random data, including odd sizes (`gpu_kernels/`).
//!
//! NVRTC is found on the loader's path, through `GROK1_NVRTC`, or where `.ci/install-nvrtc.sh`
//! puts it (`target/nvrtc`). Only a missing NVRTC skips, and not under `GROK1_REQUIRE_NVRTC=1`
//! (CI installs it, so a lost library cannot turn the compile checks into skips); once NVRTC is
//! there, every compile error fails.

#![cfg(feature = "cuda")]

#[path = "gpu_kernels/mod.rs"]
mod gpu_kernels;

use grok1::gpu::{nvrtc, source};
use std::sync::Once;

/// Point `GROK1_NVRTC` at the library `.ci/install-nvrtc.sh` installs, unless the environment
/// already names one. Every test calls this first, before anything reads the variable.
pub fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os(nvrtc::NVRTC_ENV).is_some() {
            return;
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/nvrtc/nvidia");
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let lib = e.path().join("lib");
            let Ok(files) = std::fs::read_dir(&lib) else { continue };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with("libnvrtc.so.") {
                    std::env::set_var(nvrtc::NVRTC_ENV, f.path());
                    return;
                }
            }
        }
    });
}

/// Whether NVRTC is there; when it is not, says which check skips, or fails when CI requires it.
fn nvrtc_or_skip(check: &str) -> bool {
    setup();
    match nvrtc::present() {
        Ok(()) => true,
        Err(why) if std::env::var_os("GROK1_REQUIRE_NVRTC").is_some_and(|v| v == "1") => {
            panic!("GROK1_REQUIRE_NVRTC=1 but NVRTC is missing ({why}): {check} cannot run")
        }
        Err(why) => {
            eprintln!("skipping {check}: NVRTC not found ({why})");
            false
        }
    }
}

#[test]
fn kernels_compile_with_nvrtc() {
    if !nvrtc_or_skip("the NVRTC compile check") {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    let supported = nvrtc::supported_archs().unwrap();
    eprintln!("NVRTC {major}.{minor}, architectures {supported:?}");
    let mut compiled = 0;
    for arch in ["compute_80", "compute_90"] {
        if !supported.contains(&arch) {
            eprintln!("NVRTC {major}.{minor} does not target {arch}; not compiled for it");
            continue;
        }
        let t = std::time::Instant::now();
        let ptx = nvrtc::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for name in source::kernel_names() {
            assert!(text.contains(&format!(".entry {name}(")), "{arch}: no kernel {name} in the PTX");
        }
        let target = arch.replace("compute_", "sm_");
        assert!(text.contains(&format!(".target {target}")), "{arch}: PTX target is not {target}");
        eprintln!(
            "{arch}: {} kernels, {} bytes of PTX in {:.2} s",
            source::kernel_names().len(),
            text.len(),
            t.elapsed().as_secs_f64()
        );
        compiled += 1;
    }
    assert!(compiled > 0, "NVRTC {major}.{minor} targets neither compute_80 nor compute_90");
}

#[test]
fn a_syntax_error_is_reported_with_the_log() {
    if !nvrtc_or_skip("the compile-log check") {
        return;
    }
    // The compiler's log must reach the error, so that a broken kernel names its line.
    let bad = cudarc::nvrtc::compile_ptx("extern \"C\" __global__ void k(float* x) { x[0] = y; }");
    let e = format!("{:?}", bad.unwrap_err());
    assert!(
        e.contains("identifier \\\"y\\\" is undefined") || e.contains("identifier \"y\" is undefined"),
        "{e}"
    );
}

#[test]
fn available_gives_a_reason_or_a_device() {
    setup();
    match grok1::gpu::available() {
        Ok(info) => {
            eprintln!("GPU: {info:?}");
            assert!(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
            assert!(info.arch.starts_with("sm_") || info.arch.starts_with("compute_"), "{}", info.arch);
        }
        Err(why) => {
            eprintln!("no GPU found ({why})");
            assert!(!why.is_empty());
        }
    }
}

/// Assemble for sm_90 (H100) through NVRTC's built-in ptxas and read its report: no kernel may
/// spill registers to local memory, which would make the hot loops memory-bound on the stack.
/// An NVRTC too old to know sm_90 skips, saying so; a compile error fails (plant one: a stray
/// token in a `.cu` file under `src/gpu/cu` makes this test panic with NVRTC's log).
#[test]
fn kernels_assemble_for_sm_90_without_spills() {
    if !nvrtc_or_skip("the sm_90 assembly check") {
        return;
    }
    let supported = nvrtc::supported_archs().unwrap();
    if !supported.contains(&"compute_90") {
        eprintln!("skipping the sm_90 assembly check: this NVRTC targets only {supported:?}");
        return;
    }
    let (cubin, report) = nvrtc::compile_cubin("sm_90").unwrap_or_else(|e| panic!("{e}"));
    // An ELF image: what the driver loads on an H100 without compiling anything.
    assert_eq!(&cubin[..4], b"\x7fELF", "not a CUBIN");
    let mut functions = 0;
    for line in report.lines() {
        if line.contains("Compiling entry function") {
            functions += 1;
        }
        if line.contains("bytes spill") {
            assert!(line.contains("0 bytes spill stores, 0 bytes spill loads"), "{line}\n{report}");
        }
    }
    eprintln!("{report}");
    assert_eq!(functions, source::kernel_names().len(), "{report}");
}

#[test]
fn architecture_choice() {
    let all = nvrtc::ARCHS;
    assert_eq!(nvrtc::sm_for((9, 0), &all).as_deref(), Some("sm_90"));
    assert_eq!(nvrtc::sm_for((9, 1), &all), None);
    assert_eq!(nvrtc::arch_for((9, 0), &all), Some("compute_90"));
    assert_eq!(nvrtc::arch_for((8, 9), &all), Some("compute_89"));
    // A device newer than NVRTC knows runs the newest PTX through the driver's JIT.
    assert_eq!(nvrtc::arch_for((12, 1), &all), Some("compute_120"));
    assert_eq!(nvrtc::arch_for((9, 0), &["compute_75", "compute_80"]), Some("compute_80"));
    assert_eq!(nvrtc::arch_for((7, 0), &all), None);
}
