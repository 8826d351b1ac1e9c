//! Matrix kernels over the quantized block types. `Matrix` owns one weight matrix `[rows, cols]`
//! (rows = output channels, blocks along `cols`) in a runtime layout (`pack`) and multiplies it by
//! activations.
//!
//! * q8_0 / q4_0 / iq4_nl / q4_k / q4_s: activations are quantized per block of 32 to int8 with
//!   an f32 scale (`act`), then integer dot products per block, scaled and summed in f32 (q4_k's
//!   offsets meet the exact f32 block sums: `k4`; q4_s's half-block scales apply in integers:
//!   `s4`).
//! * bf16 / f32: f32 products and sums, exact to f32 rounding.
//!
//! All are stored in tiles of 16 rows (`pack`, `k4`, `s4`), so that each thread streams one contiguous
//! run of memory and each output row is one vector lane. Repacking happens in `from_bytes` and
//! `reload` (the latter reuses the memory: use it for weights streamed in and out).
//!
//! Each type has a scalar reference (`scalar`, `k4`, `s4`) and SIMD paths for x86-64 AVX2 (+FMA, F16C),
//! AVX-512 with VNNI, and aarch64 NEON, chosen once at run time from the CPU's features; the
//! environment variable `GROK1_KERNELS=scalar|avx2|avx512|neon` forces one. Work is split across
//! a persistent thread pool (`pool`, also open to other work as `parallel_for`) in chunks of
//! whole tiles, a few per thread.

mod act;
mod bandwidth;
mod buf;
mod float;
mod k4;
mod layout;
mod pack;
mod pool;
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
