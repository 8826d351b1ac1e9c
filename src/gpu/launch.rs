//! Launch geometry of every kernel: one place, shared by the CUDA launchers and the host
//! emulation tests, and kept in step with the constants of `cu/*.cu`.

/// Grid (x, y), threads per block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32),
    pub block: u32,
    pub shared_bytes: u32,
}

/// Rows per block of the decode kernel, one warp each (`MV_WARPS` in `cu/matvec.cu`).
pub const MV_WARPS: usize = 4;
/// Tile of the batched kernel, rows x tokens (`MM_BM`, `MM_BN` in `cu/matmul.cu`).
pub const MM_BM: usize = 64;
pub const MM_BN: usize = 64;
/// Threads per block of the row-wise and element-wise kernels.
pub const BLOCK: u32 = 256;
/// Threads per block of attention (one per lane of a 128-wide head).
pub const ATTN_BLOCK: u32 = 128;
/// Dynamic shared memory every device grants without opting in.
pub const SHARED_DEFAULT: usize = 48 * 1024;

/// The decode kernel: a warp per row, `n` tokens along y.
pub fn matvec(rows: usize, n: usize) -> Geometry {
    Geometry {
        grid: (rows.div_ceil(MV_WARPS) as u32, n as u32),
        block: 32 * MV_WARPS as u32,
        shared_bytes: 0,
    }
}

/// The tiled kernel: 64 x 64 tiles of rows x tokens, 256 threads.
pub fn matmul(rows: usize, n: usize) -> Geometry {
    Geometry { grid: (rows.div_ceil(MM_BM) as u32, n.div_ceil(MM_BN) as u32), block: 256, shared_bytes: 0 }
}

/// One block per row.
pub fn rows(n: usize) -> Geometry {
    Geometry { grid: (n as u32, 1), block: BLOCK, shared_bytes: 0 }
}

/// One thread per element.
pub fn elementwise(n: usize) -> Geometry {
    Geometry { grid: (n.div_ceil(BLOCK as usize) as u32, 1), block: BLOCK, shared_bytes: 0 }
}

/// One block per (query head, query token); shared memory holds the query and a score per key.
pub fn attention(n_q_heads: usize, t: usize, head_dim: usize, n_keys: usize) -> Geometry {
    Geometry {
        grid: (n_q_heads as u32, t as u32),
        block: ATTN_BLOCK,
        shared_bytes: ((head_dim + n_keys) * 4) as u32,
    }
}

/// Static shared memory of the attention kernel (its reduction scratch), which counts against
/// the same limit as the dynamic part.
const ATTN_STATIC_SHARED: usize = 32 * 4;

/// The most keys one attention launch can see for a head size: 12,128 for Grok's 128, more than
/// its 8,192-token context.
pub fn attention_max_keys(head_dim: usize) -> usize {
    (SHARED_DEFAULT - ATTN_STATIC_SHARED) / 4 - head_dim
}
