//! The device layout of a weight matrix, made on the host from the on-disk blocks. For q8_0,
//! q4_0 and iq4_nl the f16 scales move into an array of their own, so that each row's quants are
//! one contiguous, 16-byte aligned run a warp reads with full-width loads:
//!
//! | type            | quants (`w`)                                   | scales (`d`)           |
//! |-----------------|------------------------------------------------|------------------------|
//! | f32, bf16       | the values, `[rows][cols]`                     | none                   |
//! | q8_0            | `[rows][cols]` i8                              | `[rows][cols/32]` f16  |
//! | q4_0, iq4_nl    | `[rows][cols/2]`: each block's 16 nibble bytes | `[rows][cols/32]` f16  |
//! | q4_k, q4_s      | the 144-byte super-blocks as stored            | none                   |
//!
//! The layout holds exactly the on-disk bytes, reordered. Plain host code, built without CUDA,
//! so that the repacking is tested everywhere (`DeviceLayout::dequantize_row` reads a row back).

use crate::error::{Error, Result};
use crate::quant::{QuantType, IQ4_NL_GRID, QK};

/// A matrix in device layout, still on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLayout {
    pub qtype: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub w: Vec<u8>,
    /// f16 scales as raw bits; empty for the types without a scale array.
    pub d: Vec<u16>,
}

/// Why `qtype` cannot go on the device, if it cannot: the low-bit expert types have no device
/// kernel yet, so matrices of them stay on the CPU (`plan::plan` keeps such experts there).
pub fn unsupported(qtype: QuantType) -> Option<String> {
    match qtype {
        QuantType::Q3S | QuantType::Q2S => Some(format!("{qtype} has no GPU kernel; its matrices run on the CPU")),
        _ => None,
    }
}

/// Whether `qtype`'s blocks are split into quants and a scale array.
pub fn has_scale_array(qtype: QuantType) -> bool {
    matches!(qtype, QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Iq4Nl)
}

/// Repack `rows` rows of `cols` weights in the on-disk layout.
pub fn repack(qtype: QuantType, rows: usize, cols: usize, bytes: &[u8]) -> Result<DeviceLayout> {
    if let Some(why) = unsupported(qtype) {
        return Err(Error::Invalid(format!("matrix [{rows}, {cols}]: {why}")));
    }
    let rb = qtype
        .row_bytes(cols)
        .ok_or_else(|| Error::Invalid(format!("{cols} columns is not a whole number of {qtype} blocks")))?;
    if rows.checked_mul(rb) != Some(bytes.len()) {
        return Err(Error::Invalid(format!(
            "{qtype} matrix [{rows}, {cols}] needs {} bytes, got {}",
            rows as u128 * rb as u128,
            bytes.len()
        )));
    }
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(Error::Invalid(format!("matrix [{rows}, {cols}] is too large for the GPU kernels")));
    }
    if !has_scale_array(qtype) {
        return Ok(DeviceLayout { qtype, rows, cols, w: bytes.to_vec(), d: Vec::new() });
    }
    let bb = qtype.block_bytes();
    let qb = bb - 2;
    let nblocks = rows * cols / QK;
    let mut w = Vec::with_capacity(nblocks * qb);
    let mut d = Vec::with_capacity(nblocks);
    for blk in bytes.chunks_exact(bb) {
        d.push(u16::from_le_bytes([blk[0], blk[1]]));
        w.extend_from_slice(&blk[2..]);
    }
    Ok(DeviceLayout { qtype, rows, cols, w, d })
}

impl DeviceLayout {
    /// Bytes the layout occupies (always the on-disk size).
    pub fn nbytes(&self) -> usize {
        self.w.len() + 2 * self.d.len()
    }

    /// Row `r` as f32, read from the layout with the indexing the kernels use (`cu/matvec.cu`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        let nb = cols / QK;
        let scale = |b: usize| half::f16::from_bits(self.d[r * nb + b]).to_f32();
        match self.qtype {
            QuantType::F32 | QuantType::Bf16 | QuantType::Q4K | QuantType::Q4S | QuantType::Q3S | QuantType::Q2S => {
                let rb = self.qtype.row_bytes(cols).expect("validated at repack");
                self.qtype.dequantize_row(&self.w[r * rb..(r + 1) * rb], out);
            }
            QuantType::Q8_0 => {
                for (c, o) in out.iter_mut().enumerate() {
                    *o = scale(c / QK) * self.w[r * cols + c] as i8 as f32;
                }
            }
            QuantType::Q4_0 | QuantType::Iq4Nl => {
                for (c, o) in out.iter_mut().enumerate() {
                    let (b, k) = (c / QK, c % QK);
                    let byte = self.w[(r * nb + b) * (QK / 2) + k % (QK / 2)];
                    let n = if k < QK / 2 { byte & 15 } else { byte >> 4 };
                    let v = if self.qtype == QuantType::Q4_0 {
                        n as f32 - 8.0
                    } else {
                        IQ4_NL_GRID[n as usize] as f32
                    };
                    *o = scale(b) * v;
                }
            }
        }
    }
}
