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
//!
//! `q4_0` is here as the yardstick our int4 (`iq4_nl`) is measured against, and so that files
//! quantized by others can be read.

mod iq4_nl;
mod q4_0;
mod q8_0;

pub use iq4_nl::IQ4_NL_GRID;

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
}

impl QuantType {
    pub const ALL: [QuantType; 5] =
        [QuantType::F32, QuantType::Bf16, QuantType::Q8_0, QuantType::Q4_0, QuantType::Iq4Nl];

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            QuantType::F32 | QuantType::Bf16 => 1,
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Iq4Nl => QK,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::Bf16 => 2,
            QuantType::Q8_0 => 2 + QK,
            QuantType::Q4_0 | QuantType::Iq4Nl => 2 + QK / 2,
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
        }
    }

    /// Quantize one row. `out.len()` must be `row_bytes(row.len())`.
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
    /// Accepts the type names and the CLI's short forms: `q8` = q8_0, `q4` = iq4_nl.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(QuantType::F32),
            "bf16" => Ok(QuantType::Bf16),
            "q8" | "q8_0" => Ok(QuantType::Q8_0),
            "q4_0" => Ok(QuantType::Q4_0),
            "q4" | "iq4_nl" => Ok(QuantType::Iq4Nl),
            _ => Err(format!("unknown quantization type `{s}` (expected f32, bf16, q8, q4, q4_0)")),
        }
    }
}

/// Read the little-endian f16 scale at the start of a block.
#[inline]
pub(crate) fn block_scale(block: &[u8]) -> f32 {
    half::f16::from_le_bytes([block[0], block[1]]).to_f32()
}
