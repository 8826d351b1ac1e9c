//! Matrix kernels over the quantized block types. `Matrix` owns one weight matrix `[rows, cols]`
//! (rows = output channels, blocks along `cols`) in a runtime layout and multiplies it by
//! activations.
//!
//! * q8_0 / q4_0 / iq4_nl / q4_k / q4_s / q3_s / q2_s: activations are quantized per block of 32
//!   to int8 with an f32 scale (`act`), then integer dot products per block, scaled and summed in
//!   f32 (q4_k's offsets meet the exact f32 block sums: `k4`; q4_s's half-block scales apply in
//!   integers: `s4`, as do q3_s's block scales, `s3`, and q2_s's quarter-block scales, `s2`).
//! * bf16 / f32: f32 products and sums, exact to f32 rounding (`float`).
//!
//! All are stored in tiles of 16 rows (`pack`, `float`, `k4`, `s4`, `s3`, `s2`), so that each
//! thread streams one contiguous run of memory and each output row is one vector lane. Repacking happens in
//! `from_bytes` and `reload` (the latter reuses the memory: use it for weights streamed in and
//! out).
//!
//! Each runtime layout implements `layout::TileLayout` in its own file: geometry, packing, row
//! decoding and a scalar reference kernel; SIMD paths for x86-64 AVX2 (+FMA, F16C), AVX-512 with
//! VNNI, and aarch64 NEON implement one trait each (`Avx2Tiles`, `Avx512Tiles`, `NeonTiles`) in
//! `avx2.rs`, `avx512.rs` and `neon.rs`. The path is chosen once at run time from the CPU's
//! features; the environment variable `GROK1_KERNELS=scalar|avx2|avx512|neon` forces one. Work
//! is split across a persistent thread pool (`pool`, also open to other work as `parallel_for`)
//! in chunks of whole tiles, a few per thread.
//!
//! # Adding a block type
//!
//! 1. `src/quant/<type>.rs`: the on-disk block (`BLOCK_BYTES`, quantizer, reference decoder),
//!    and in `src/quant/mod.rs` the `QuantType` variant with its arms (`ALL`, `block_len`,
//!    `block_bytes`, `name`, `FromStr`, `quantize_row`, `dequantize_row`; `for_row` if it
//!    needs whole 256-weight super-blocks). Byte readers shared with other types are in
//!    `quant::bytes`.
//! 2. `src/kernels/<layout>.rs`, declared in the module list below: the layout's geometry type
//!    and its `impl TileLayout` (`INT8_ACTS`, `tiles`, `tile_bytes`, `pack`, `unpack_row`,
//!    `tiles_scalar`). Integer layouts read `Job::acts` (int8 blocks of 32 with their scales,
//!    exact f32 sums, half-block bias corrections); the 4-bit tile interleave's reader is
//!    `pack::nibble`.
//! 3. `src/kernels/matrix.rs`: one arm in `layout_for`.
//! 4. `src/kernels/avx2.rs`, `avx512.rs`, `neon.rs`: `impl Avx2Tiles`, `impl Avx512Tiles`,
//!    `impl NeonTiles` for the layout (a missing one fails to compile on that architecture;
//!    check NEON with `.ci/neon.sh`).
//! 5. The GPU side, which matches `QuantType` too: `src/gpu/source.rs` (`matvec_kernel`,
//!    `matmul_kernel`, whose kernels live in `src/gpu/cu/matvec.cu` and `matmul.cu`) and
//!    `src/gpu/layout.rs` (`DeviceLayout::dequantize_row`); or, for a type with no device
//!    kernel (q3_s, q2_s), one arm in `gpu::layout::unsupported`, which keeps its matrices on
//!    the CPU and makes the plan say so.
//! 6. Tests and benches that list types: in `tests/kernels.rs`, `is_int` (and `is_super` for
//!    256-weight super-blocks) and the resident size `reload_replaces_weights` expects;
//!    `ggml_type` in `tests/ggml_crosscheck.rs` (the ggml twin, or none); for super-block
//!    types, the shape lists in `tests/gpu_plan.rs`, `tests/gpu_emu.rs` and
//!    `tests/gpu_kernels/matrices.rs`; `random_matrix` in `benches/kernels.rs`. The property
//!    tests over `QuantType::ALL` then run the new type on every path against the scalar
//!    reference and the reference decoder.
//! 7. Docs: `formats/blocks.md` (the table and a section) and the qtype list in
//!    `formats/README.md`.
//!
//! The thread pool and the rest of `matrix.rs` need no change, nor does the activation
//! quantizer (`act`) for sub-block scales of 16 weights or more; q2_s's 8-weight scales needed
//! one more set of partial sums there (per 8-weight quarter).

mod act;
mod bandwidth;
mod buf;
mod float;
mod k4;
mod layout;
mod pack;
mod pool;
mod s2;
mod s3;
mod s4;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

mod matrix;

pub use bandwidth::measure_read_bandwidth;
pub use buf::AlignedBuf;
pub use matrix::Matrix;
pub use pool::{run as parallel_for, set_threads, threads};

use std::sync::OnceLock;

/// An instruction-set path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI.
    Avx512,
    /// aarch64 NEON (with the dot-product extension where present).
    Neon,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Paths this CPU can run, slowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest path this CPU can run.
    pub fn best() -> Isa {
        *Isa::available().last().unwrap()
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Isa, String> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown kernel path `{s}` (expected scalar, avx2, avx512 or neon)"))
    }
}

struct Selection {
    isa: Isa,
    /// Why the environment's choice was not taken, if it was not.
    note: Option<String>,
}

fn selection() -> &'static Selection {
    static SEL: OnceLock<Selection> = OnceLock::new();
    SEL.get_or_init(|| {
        let best = Isa::best();
        match std::env::var("GROK1_KERNELS") {
            Err(_) => Selection { isa: best, note: None },
            Ok(v) => match v.parse::<Isa>() {
                Ok(isa) if isa.is_available() => Selection { isa, note: None },
                Ok(isa) => Selection {
                    isa: best,
                    note: Some(format!("GROK1_KERNELS={} not supported by this CPU", isa.name())),
                },
                Err(e) => Selection { isa: best, note: Some(format!("GROK1_KERNELS ignored: {e}")) },
            },
        }
    })
}

/// The path `Matrix::matvec` and `Matrix::matmul` use.
pub fn selected() -> Isa {
    selection().isa
}

/// The selected path and thread count, in words.
pub fn describe() -> String {
    let sel = selection();
    let detail = match sel.isa {
        Isa::Scalar => "portable scalar reference",
        Isa::Avx2 => "AVX2+FMA+F16C, int8 via vpmaddubsw",
        Isa::Avx512 => "AVX-512 F/BW/VL, int8 via VNNI vpdpbusd",
        Isa::Neon => neon_detail(),
    };
    let mut s = format!("{} ({detail}), {} threads", sel.isa.name(), threads());
    if let Some(n) = &sel.note {
        s.push_str("; ");
        s.push_str(n);
    }
    s
}

fn neon_detail() -> &'static str {
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        return "NEON with sdot";
    }
    "NEON, int8 via smull/sadalp"
}
