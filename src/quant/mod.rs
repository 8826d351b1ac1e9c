//! Quantized block types. Each type turns a row of f32 weights (one output channel, along the
//! input dimension) into bytes and back. Byte layouts are ggml's wherever ggml has the type, so a
//! GGUF export is a copy and ggml can cross-check us; `formats/` specifies them byte by byte.
//!
//! | type    | block | bytes/block | bits/weight | layout                                   |
//! |---------|-------|-------------|-------------|------------------------------------------|
//! | f32     | 1     | 4           | 32          | little-endian IEEE binary32              |
//! | bf16    | 1     | 2           | 16          | upper half of the binary32               |
//! | q8_0    | 32    | 34          | 8.5         | f16 scale, 32 x i8                        |
//! | q4_0    | 32    | 18          | 4.5         | f16 scale, 16 bytes of nibbles (q - 8)    |
//! | iq4_nl  | 32    | 18          | 4.5         | f16 scale, 16 bytes of nibbles -> grid    |
//! | q4_k    | 256   | 144         | 4.5         | f16 d, f16 dmin, 8 x 6-bit (sc, m), nibbles |
//! | q4_s    | 256   | 144         | 4.5         | f16 d, 16 x 7-bit signed scales, nibbles -> grid |
//! | q3_s    | 256   | 105         | 3.28        | f16 d, 8 x 5-bit signed scales, 16 grid bits, 3-bit indices |
//! | q2_s    | 256   | 82          | 2.56        | f16 d, 32 x 4-bit signed scales, 2-bit indices -> grid |
//!
//! Our int4 is `q4_s` (ours: no ggml twin) where a row is a whole number of 256-weight
//! super-blocks and `iq4_nl` elsewhere (`QuantType::int4_for`); both beat `q4_0` at the same 4.5
//! bits per weight, q4_s by the most (see `formats/blocks.md` for the measurements). `q4_0` is
//! here as the yardstick, and so that files quantized by others can be read. q3_s and q2_s (ours)
//! are the low-bit expert types; they are reached through their modules' free functions, which
//! take an optional importance per weight. Every quantizer is deterministic: the same row gives
//! the same bytes on every CPU.

/// Defines `pub fn $name($args)` running `$generic` compiled for AVX2 when the CPU has it (checked
/// at run time) and for the baseline target otherwise. `$generic` and everything it calls in the
/// hot loop must be `#[inline(always)]` to be compiled into the AVX2 copy. The copies agree bit
/// for bit: Rust never contracts a * b + c into an FMA, and the operation order is the source's.
macro_rules! multiversion {
    ($name:ident, $generic:ident, $avx2:ident, ($($arg:ident : $ty:ty),*)) => {
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, as just checked.
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) {
            $generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

pub(crate) mod bytes;
pub mod iq4_nl;
mod lowbit;
pub mod q2_s;
pub mod q3_s;
pub mod measure;
pub mod q4_0;
pub mod q4_k;
pub mod q4_s;
pub mod q8_0;

pub use iq4_nl::IQ4_NL_GRID;
pub use q4_k::QK_K;

use bytes::block_scale;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Weights per block for the blocked types.
pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantType {
    F32,
    Bf16,
    Q8_0,
    Q4_0,
    Iq4Nl,
    Q4K,
    Q4S,
    Q3S,
    Q2S,
}

impl QuantType {
    pub const ALL: [QuantType; 9] = [
        QuantType::F32,
        QuantType::Bf16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Iq4Nl,
        QuantType::Q4K,
        QuantType::Q4S,
        QuantType::Q3S,
        QuantType::Q2S,
    ];

    /// The int4 type for rows of `cols` weights: q4_s (lowest error at 4.5 bits) when the row is
    /// a whole number of its 256-weight super-blocks, else iq4_nl (32-weight blocks).
    pub fn int4_for(cols: usize) -> QuantType {
        QuantType::Q4S.for_row(cols)
    }

    /// The type that stores rows of `cols` weights when `self` is asked for: the super-block
    /// types (q4_s, q4_k, q3_s, q2_s) need whole 256-weight super-blocks, and other rows get iq4_nl, the
    /// int4 with 32-weight blocks. Every other type is itself.
    pub fn for_row(self, cols: usize) -> QuantType {
        match self {
            QuantType::Q4S | QuantType::Q4K | QuantType::Q3S | QuantType::Q2S if cols % QK_K != 0 => {
                QuantType::Iq4Nl
            }
            q => q,
        }
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            QuantType::F32 | QuantType::Bf16 => 1,
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Iq4Nl => QK,
            QuantType::Q4K => QK_K,
            QuantType::Q4S => q4_s::QK_S,
            QuantType::Q3S => q3_s::QK,
            QuantType::Q2S => q2_s::QK,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::Bf16 => 2,
            QuantType::Q8_0 => q8_0::BLOCK_BYTES,
            QuantType::Q4_0 => q4_0::BLOCK_BYTES,
            QuantType::Iq4Nl => iq4_nl::BLOCK_BYTES,
            QuantType::Q4K => q4_k::BLOCK_BYTES,
            QuantType::Q4S => q4_s::BLOCK_BYTES,
            QuantType::Q3S => q3_s::BLOCK_BYTES,
            QuantType::Q2S => q2_s::BLOCK_BYTES,
        }
    }

    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_len() as f64
    }

    /// Bytes of one row of `n` weights; `None` if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        (n % self.block_len() == 0).then(|| n / self.block_len() * self.block_bytes())
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::Bf16 => "bf16",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Iq4Nl => "iq4_nl",
            QuantType::Q4K => "q4_k",
            QuantType::Q4S => "q4_s",
            QuantType::Q3S => "q3_s",
            QuantType::Q2S => "q2_s",
        }
    }

    /// Quantize one row. `out.len()` must be `row_bytes(row.len())`. Rows are expected to be
    /// finite; a block scale beyond f16's range (weights above ~8e6) saturates at 65504.
    pub fn quantize_row(self, row: &[f32], out: &mut [u8]) {
        debug_assert_eq!(Some(out.len()), self.row_bytes(row.len()));
        match self {
            QuantType::F32 => {
                for (x, o) in row.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&x.to_le_bytes());
                }
            }
            QuantType::Bf16 => {
                for (x, o) in row.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
                }
            }
            QuantType::Q8_0 => q8_0::quantize_row(row, out),
            QuantType::Q4_0 => q4_0::quantize_row(row, out),
            QuantType::Iq4Nl => iq4_nl::quantize_row(row, out),
            QuantType::Q4K => q4_k::quantize_row(row, out),
            QuantType::Q4S => q4_s::quantize_row(row, out),
            QuantType::Q3S => q3_s::quantize_row(row, None, out),
            QuantType::Q2S => q2_s::quantize_row(row, None, out),
        }
    }

    /// Dequantize one row. `out.len()` weights are produced from `bytes`.
    pub fn dequantize_row(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(Some(bytes.len()), self.row_bytes(out.len()));
        match self {
            QuantType::F32 => {
                for (b, o) in bytes.chunks_exact(4).zip(out.iter_mut()) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            QuantType::Bf16 => {
                for (b, o) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                    *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            QuantType::Q8_0 => q8_0::dequantize_row(bytes, out),
            QuantType::Q4_0 => q4_0::dequantize_row(bytes, out),
            QuantType::Iq4Nl => iq4_nl::dequantize_row(bytes, out),
            QuantType::Q4K => q4_k::dequantize_row(bytes, out),
            QuantType::Q4S => q4_s::dequantize_row(bytes, out),
            QuantType::Q3S => q3_s::dequantize_row(bytes, out),
            QuantType::Q2S => q2_s::dequantize_row(bytes, out),
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantType {
    type Err = String;
    /// Accepts the type names and the CLI's short forms: `q8` = q8_0, `q4` = q4_s, `q3` = q3_s,
    /// `q2` = q2_s (the converter gives rows that are not whole super-blocks iq4_nl: `for_row`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(QuantType::F32),
            "bf16" => Ok(QuantType::Bf16),
            "q8" | "q8_0" => Ok(QuantType::Q8_0),
            "q4_0" => Ok(QuantType::Q4_0),
            "iq4_nl" => Ok(QuantType::Iq4Nl),
            "q4_k" => Ok(QuantType::Q4K),
            "q4" | "q4_s" => Ok(QuantType::Q4S),
            "q3" | "q3_s" => Ok(QuantType::Q3S),
            "q2" | "q2_s" => Ok(QuantType::Q2S),
            _ => Err(format!(
                "unknown quantization type `{s}` (expected f32, bf16, q8, q4, q3, q2, q4_0, iq4_nl, q4_k, q4_s, q3_s, q2_s)"
            )),
        }
    }
}

/// Dequantize a row of 4-bit blocks (f16 scale, then 16 bytes: byte j holds weight j in its low
/// nibble and weight j + 16 in its high nibble), each nibble mapped through `table`. q4_0 and
/// iq4_nl differ only in that table.
#[inline(always)]
pub(crate) fn dequantize_nibble_row(bytes: &[u8], out: &mut [f32], table: &[i8; 16]) {
    for (b, y) in bytes.chunks_exact(2 + QK / 2).zip(out.chunks_exact_mut(QK)) {
        let d = block_scale(b);
        for j in 0..QK / 2 {
            y[j] = d * table[(b[2 + j] & 0x0f) as usize] as f32;
            y[j + QK / 2] = d * table[(b[2 + j] >> 4) as usize] as f32;
        }
    }
}

/// A scale as a block stores it: f16, rounded to nearest even like ggml's `GGML_FP32_TO_FP16`,
/// but saturating at +-65504 where ggml would store an infinity.
#[inline(always)]
pub(crate) fn f16_scale(d: f32) -> half::f16 {
    half::f16::from_f32(d.clamp(-65504.0, 65504.0))
}

/// Sum of eight lanes in a fixed pairwise order, ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 +
/// v7)), the order two rounds of AVX `hadd` and a final add produce.
#[inline(always)]
pub(crate) fn hsum(v: &[f32; 8]) -> f32 {
    ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))
}

/// `d` rounded to the f16 a block will store, as f32.
#[inline(always)]
pub(crate) fn f16_round(d: f32) -> f32 {
    f16_scale(d).to_f32()
}
