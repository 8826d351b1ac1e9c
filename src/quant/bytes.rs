//! Byte-level readers shared by the block types and the kernels' runtime layouts.

/// The little-endian f16 at byte `at` of `b`, as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The little-endian f16 scale at the start of a block.
#[inline(always)]
pub(crate) fn block_scale(block: &[u8]) -> f32 {
    f16_at(block, 0)
}

/// Nibble `n` stands for `n - 8`: q4_0's values, and q4_k's nibbles centred at 8 in the kernels.
pub(crate) const MINUS_8_TABLE: [i8; 16] = [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7];
