// ys[t] = W xs[t] for a batch (prefill): classic shared-memory tiling. A block computes a tile of
// MM_BM rows x MM_BN tokens, stepping through the inputs MM_BK = 32 columns (one quant block) at a
// time: it dequantizes the weight tile once into shared memory and reuses it for every token of
// the tile. 256 threads, each owning a 4 x 4 patch of outputs. Layouts as in matvec.cu.

#define MM_BM 64
#define MM_BN 64
#define MM_BK 32

#define QT_F32 0
#define QT_BF16 1
#define QT_Q8_0 2
#define QT_Q4_0 3
#define QT_IQ4_NL 4
#define QT_Q4_K 5
#define QT_Q4_S 6

// Eight consecutive weights of `row` starting at column k (a multiple of 8). Columns past the
// end (only possible for f32 and bf16, whose rows need not be whole blocks) read as zero.
template <int QT>
__device__ __forceinline__ void load8(const u8* w, const u16* d, int row, int cols, int k,
                                      const float* grid, float* out) {
    if (QT == QT_F32) {
        const float* wr = (const float*)w + (size_t)row * cols;
        #pragma unroll
        for (int i = 0; i < 8; i++) out[i] = k + i < cols ? wr[k + i] : 0.0f;
    } else if (QT == QT_BF16) {
        const u16* wr = (const u16*)w + (size_t)row * cols;
        #pragma unroll
        for (int i = 0; i < 8; i++) out[i] = k + i < cols ? bf16_to_f32(wr[k + i]) : 0.0f;
    } else if (QT == QT_Q8_0) {
        const u8* q = w + (size_t)row * cols + k;
        float s = f16_to_f32(d[(size_t)row * (cols / 32) + k / 32]);
        uint2 v = *(const uint2*)q;
        u32 words[2] = {v.x, v.y};
        #pragma unroll
        for (int i = 0; i < 8; i++) out[i] = s * (float)(i8)((words[i / 4] >> (8 * (i % 4))) & 0xff);
    } else if (QT == QT_Q4_0 || QT == QT_IQ4_NL) {
        int nb = cols / 32, b = k / 32, o = k % 32;
        const u8* q = w + ((size_t)row * nb + b) * 16;
        float s = f16_to_f32(d[(size_t)row * nb + b]);
        // Weights 0..16 of a block are the low nibbles of bytes 0..16, weights 16..32 the high.
        int shift = o < 16 ? 0 : 4;
        uint2 v = *(const uint2*)(q + (o & 15));
        u32 words[2] = {v.x, v.y};
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            int n = (words[i / 4] >> (8 * (i % 4) + shift)) & 15;
            out[i] = s * (QT == QT_Q4_0 ? (float)(n - 8) : grid[n]);
        }
    } else if (QT == QT_Q4_K) {
        int nsb = cols / 256, sb = k / 256, within = k % 256;
        const u8* blk = w + ((size_t)row * nsb + sb) * 144;
        int c = within / 64, hi = (within % 64) >= 32, l = within % 32;
        float sc, m;
        q4k_scale_min(2 * c + hi, blk + 4, &sc, &m);
        float a = f16_to_f32(*(const u16*)blk) * sc, b = f16_to_f32(*(const u16*)(blk + 2)) * m;
        uint2 v = *(const uint2*)(blk + 16 + 32 * c + l);
        u32 words[2] = {v.x, v.y};
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            int n = (words[i / 4] >> (8 * (i % 4) + 4 * hi)) & 15;
            out[i] = a * (float)n - b;
        }
    } else {  // QT_Q4_S
        int nsb = cols / 256, sb = k / 256, within = k % 256;
        const u8* blk = w + ((size_t)row * nsb + sb) * 144;
        // Block b of 16 nibble bytes holds sub-block 2b in its low nibbles, 2b + 1 in its high.
        int b = within / 32, hi = (within % 32) >= 16, l = within % 16;
        float a = f16_to_f32(*(const u16*)blk) * Q4S_D_UNIT * q4s_scale(2 * b + hi, blk + 2);
        uint2 v = *(const uint2*)(blk + 16 + 16 * b + l);
        u32 words[2] = {v.x, v.y};
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            int n = (words[i / 4] >> (8 * (i % 4) + 4 * hi)) & 15;
            out[i] = a * grid[n];
        }
    }
}

template <int QT>
__device__ void matmul_tile(const u8* w, const u16* d, const float* xs, float* ys, int rows,
                            int cols, int n) {
    __shared__ float ws[MM_BK][MM_BM + 4];
    __shared__ float xt[MM_BK][MM_BN + 4];
    __shared__ float grid[16];
    if (threadIdx.x < 16) grid[threadIdx.x] = IQ4_NL_GRID[threadIdx.x];

    int tid = threadIdx.x;
    int r0 = blockIdx.x * MM_BM, t0 = blockIdx.y * MM_BN;
    int tr = (tid / 16) * 4, tt = (tid % 16) * 4;  // this thread's 4 rows and 4 tokens
    int lr = tid / 4, lk = (tid % 4) * 8;          // what it loads: one row/token, 8 columns
    float acc[4][4];
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < cols; k0 += MM_BK) {
        __syncthreads();
        float v[8];
        int row = r0 + lr;
        if (row < rows && k0 + lk < cols) {
            load8<QT>(w, d, row, cols, k0 + lk, grid, v);
        } else {
            #pragma unroll
            for (int i = 0; i < 8; i++) v[i] = 0.0f;
        }
        #pragma unroll
        for (int i = 0; i < 8; i++) ws[lk + i][lr] = v[i];
        int tok = t0 + lr;
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            int k = k0 + lk + i;
            xt[lk + i][lr] = (tok < n && k < cols) ? xs[(size_t)tok * cols + k] : 0.0f;
        }
        __syncthreads();
        #pragma unroll 8
        for (int k = 0; k < MM_BK; k++) {
            float a[4], b[4];
            #pragma unroll
            for (int i = 0; i < 4; i++) a[i] = ws[k][tr + i];
            #pragma unroll
            for (int j = 0; j < 4; j++) b[j] = xt[k][tt + j];
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
    }
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        int tok = t0 + tt + j;
        if (tok >= n) continue;
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            int row = r0 + tr + i;
            if (row < rows) ys[(size_t)tok * rows + row] = acc[i][j];
        }
    }
}

#define MATMUL_KERNEL(NAME, QT)                                                              \
    extern "C" __global__ void __launch_bounds__(256) NAME(const u8* w, const u16* d,        \
                                                           const float* xs, float* ys,      \
                                                           int rows, int cols, int n) {     \
        matmul_tile<QT>(w, d, xs, ys, rows, cols, n);                                        \
    }

MATMUL_KERNEL(matmul_f32, QT_F32)
MATMUL_KERNEL(matmul_bf16, QT_BF16)
MATMUL_KERNEL(matmul_q8_0, QT_Q8_0)
MATMUL_KERNEL(matmul_q4_0, QT_Q4_0)
MATMUL_KERNEL(matmul_iq4_nl, QT_IQ4_NL)
MATMUL_KERNEL(matmul_q4_k, QT_Q4_K)
MATMUL_KERNEL(matmul_q4_s, QT_Q4_S)
