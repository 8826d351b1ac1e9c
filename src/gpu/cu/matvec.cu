// y = W x for decode: one warp per output row, MV_WARPS rows per block, gridDim.y tokens (each
// token re-reads the weights, which then come from L2; large batches use matmul.cu instead).
//
// Device layouts (src/gpu/matrix.rs repacks the on-disk blocks into these at upload):
//   f32, bf16        w = [rows][cols] values, d unused
//   q8_0             w = [rows][cols] i8 quants, d = [rows][cols/32] f16 scales
//   q4_0, iq4_nl     w = [rows][cols/2] nibble bytes (16 per block, the on-disk order: byte j
//                    holds weight j low and weight j+16 high), d = [rows][cols/32] f16 scales
//   q4_k, q4_s       w = the on-disk 144-byte super-blocks, d unused
// Every lane loads 16 contiguous bytes of weights per step (8 for q4_k and q4_s, whose half-warps
// each read the 128 nibble bytes of one super-block), so the loads are fully coalesced.

#define MV_WARPS 4

#define MV_SETUP                                                         \
    int lane = threadIdx.x & (WARP - 1);                                 \
    int row = blockIdx.x * MV_WARPS + threadIdx.x / WARP;                \
    x += (size_t)blockIdx.y * cols;                                      \
    y += (size_t)blockIdx.y * rows;

__device__ __forceinline__ float dot_i8x4(u32 q, float4 x) {
    return (float)(i8)(q & 0xff) * x.x + (float)(i8)((q >> 8) & 0xff) * x.y +
           (float)(i8)((q >> 16) & 0xff) * x.z + (float)(i8)(q >> 24) * x.w;
}

extern "C" __global__ void matvec_f32(const u8* w, const u16* d, const float* x, float* y,
                                      int rows, int cols) {
    MV_SETUP
    if (row >= rows) return;
    const float* wr = (const float*)w + (size_t)row * cols;
    float acc = 0.0f;
    if ((cols & 3) == 0) {
        for (int c = lane * 4; c < cols; c += WARP * 4) {
            float4 a = *(const float4*)(wr + c);
            float4 b = *(const float4*)(x + c);
            acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
    } else {
        for (int c = lane; c < cols; c += WARP) acc += wr[c] * x[c];
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

extern "C" __global__ void matvec_bf16(const u8* w, const u16* d, const float* x, float* y,
                                       int rows, int cols) {
    MV_SETUP
    if (row >= rows) return;
    const u16* wr = (const u16*)w + (size_t)row * cols;
    float acc = 0.0f;
    if ((cols & 7) == 0) {
        for (int c = lane * 8; c < cols; c += WARP * 8) {
            uint4 v = *(const uint4*)(wr + c);
            float4 x0 = *(const float4*)(x + c), x1 = *(const float4*)(x + c + 4);
            acc += __uint_as_float(v.x << 16) * x0.x + __uint_as_float(v.x & 0xffff0000u) * x0.y +
                   __uint_as_float(v.y << 16) * x0.z + __uint_as_float(v.y & 0xffff0000u) * x0.w +
                   __uint_as_float(v.z << 16) * x1.x + __uint_as_float(v.z & 0xffff0000u) * x1.y +
                   __uint_as_float(v.w << 16) * x1.z + __uint_as_float(v.w & 0xffff0000u) * x1.w;
        }
    } else {
        for (int c = lane; c < cols; c += WARP) acc += bf16_to_f32(wr[c]) * x[c];
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

extern "C" __global__ void matvec_q8_0(const u8* w, const u16* d, const float* x, float* y,
                                       int rows, int cols) {
    MV_SETUP
    if (row >= rows) return;
    const u8* q = w + (size_t)row * cols;
    const u16* dr = d + (size_t)row * (cols / 32);
    float acc = 0.0f;
    // Half a block (16 quants) per lane and step.
    for (int c = lane * 16; c < cols; c += WARP * 16) {
        uint4 v = *(const uint4*)(q + c);
        const float4* xv = (const float4*)(x + c);
        float s = dot_i8x4(v.x, xv[0]) + dot_i8x4(v.y, xv[1]) + dot_i8x4(v.z, xv[2]) +
                  dot_i8x4(v.w, xv[3]);
        acc += f16_to_f32(dr[c >> 5]) * s;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

// Sum over one 32-weight block of 4-bit values: `lo[j]` pairs with x[j], `hi[j]` with x[j+16].
// LUT(n) maps a nibble to its value.
#define NIBBLE_BLOCK_DOT(LUT)                                                        \
    {                                                                                \
        u32 words[4] = {v.x, v.y, v.z, v.w};                                         \
        _Pragma("unroll") for (int i = 0; i < 4; i++) {                              \
            u32 b = words[i];                                                        \
            float4 xl = *(const float4*)(xb + 4 * i);                                \
            float4 xh = *(const float4*)(xb + 16 + 4 * i);                           \
            s += LUT(b & 15) * xl.x + LUT((b >> 8) & 15) * xl.y +                    \
                 LUT((b >> 16) & 15) * xl.z + LUT((b >> 24) & 15) * xl.w;            \
            s += LUT((b >> 4) & 15) * xh.x + LUT((b >> 12) & 15) * xh.y +            \
                 LUT((b >> 20) & 15) * xh.z + LUT((b >> 28) & 15) * xh.w;            \
        }                                                                            \
    }

#define Q4_0_VALUE(n) ((float)((int)(n) - 8))
#define IQ4_VALUE(n) (grid[(n)])

extern "C" __global__ void matvec_q4_0(const u8* w, const u16* d, const float* x, float* y,
                                       int rows, int cols) {
    MV_SETUP
    if (row >= rows) return;
    int nb = cols / 32;
    const u8* q = w + (size_t)row * nb * 16;
    const u16* dr = d + (size_t)row * nb;
    float acc = 0.0f;
    // One whole block (16 bytes) per lane and step.
    for (int b = lane; b < nb; b += WARP) {
        uint4 v = *(const uint4*)(q + b * 16);
        const float* xb = x + b * 32;
        float s = 0.0f;
        NIBBLE_BLOCK_DOT(Q4_0_VALUE)
        acc += f16_to_f32(dr[b]) * s;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

extern "C" __global__ void matvec_iq4_nl(const u8* w, const u16* d, const float* x, float* y,
                                         int rows, int cols) {
    // The grid in shared memory: lanes looking up different entries hit different banks, where
    // constant memory would serialise them.
    __shared__ float grid[16];
    if (threadIdx.x < 16) grid[threadIdx.x] = IQ4_NL_GRID[threadIdx.x];
    __syncthreads();
    MV_SETUP
    if (row >= rows) return;
    int nb = cols / 32;
    const u8* q = w + (size_t)row * nb * 16;
    const u16* dr = d + (size_t)row * nb;
    float acc = 0.0f;
    for (int b = lane; b < nb; b += WARP) {
        uint4 v = *(const uint4*)(q + b * 16);
        const float* xb = x + b * 32;
        float s = 0.0f;
        NIBBLE_BLOCK_DOT(IQ4_VALUE)
        acc += f16_to_f32(dr[b]) * s;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

// q4_k: 16 lanes per 144-byte super-block, two super-blocks per warp and step. Lane `l` of a
// half-warp reads 8 nibble bytes of chunk c = l / 4: weights 64c + o .. +8 (sub-block 2c, low
// nibbles) and 64c + 32 + o .. +8 (sub-block 2c + 1, high nibbles), o = 8 (l % 4).
extern "C" __global__ void matvec_q4_k(const u8* w, const u16* d, const float* x, float* y,
                                       int rows, int cols) {
    MV_SETUP
    if (row >= rows) return;
    int nsb = cols / 256;
    const u8* wr = w + (size_t)row * nsb * 144;
    int half = lane >> 4, l = lane & 15, c = l >> 2, o = (l & 3) * 8;
    float acc = 0.0f;
    for (int sb = half; sb < nsb; sb += 2) {
        const u8* blk = wr + (size_t)sb * 144;
        float dd = f16_to_f32(*(const u16*)blk), dmin = f16_to_f32(*(const u16*)(blk + 2));
        float sc0, m0, sc1, m1;
        q4k_scale_min(2 * c, blk + 4, &sc0, &m0);
        q4k_scale_min(2 * c + 1, blk + 4, &sc1, &m1);
        uint2 v = *(const uint2*)(blk + 16 + 32 * c + o);
        const float* xl = x + sb * 256 + 64 * c + o;
        const float* xh = xl + 32;
        float4 xl0 = *(const float4*)xl, xl1 = *(const float4*)(xl + 4);
        float4 xh0 = *(const float4*)xh, xh1 = *(const float4*)(xh + 4);
        float ql = 0.f, qh = 0.f;
        ql += (float)(v.x & 15) * xl0.x + (float)((v.x >> 8) & 15) * xl0.y +
              (float)((v.x >> 16) & 15) * xl0.z + (float)((v.x >> 24) & 15) * xl0.w;
        ql += (float)(v.y & 15) * xl1.x + (float)((v.y >> 8) & 15) * xl1.y +
              (float)((v.y >> 16) & 15) * xl1.z + (float)((v.y >> 24) & 15) * xl1.w;
        qh += (float)((v.x >> 4) & 15) * xh0.x + (float)((v.x >> 12) & 15) * xh0.y +
              (float)((v.x >> 20) & 15) * xh0.z + (float)((v.x >> 28) & 15) * xh0.w;
        qh += (float)((v.y >> 4) & 15) * xh1.x + (float)((v.y >> 12) & 15) * xh1.y +
              (float)((v.y >> 20) & 15) * xh1.z + (float)((v.y >> 28) & 15) * xh1.w;
        float sl = xl0.x + xl0.y + xl0.z + xl0.w + xl1.x + xl1.y + xl1.z + xl1.w;
        float sh = xh0.x + xh0.y + xh0.z + xh0.w + xh1.x + xh1.y + xh1.z + xh1.w;
        // weight = (d sc) q - dmin m, summed against x.
        acc += (dd * sc0) * ql - (dmin * m0) * sl + (dd * sc1) * qh - (dmin * m1) * sh;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

// q4_s: as q4_k, 16 lanes per 144-byte super-block, two super-blocks per warp and step. Lane `l`
// of a half-warp reads nibble bytes 8l .. 8l + 8: bytes o .. o + 8 of 16-byte block b = l / 2,
// o = 8 (l % 2), which hold weights 32b + o .. +8 (sub-block 2b, low nibbles) and
// 32b + 16 + o .. +8 (sub-block 2b + 1, high nibbles).
extern "C" __global__ void matvec_q4_s(const u8* w, const u16* d, const float* x, float* y,
                                       int rows, int cols) {
    __shared__ float grid[16];
    if (threadIdx.x < 16) grid[threadIdx.x] = IQ4_NL_GRID[threadIdx.x];
    __syncthreads();
    MV_SETUP
    if (row >= rows) return;
    int nsb = cols / 256;
    const u8* wr = w + (size_t)row * nsb * 144;
    int half = lane >> 4, l = lane & 15, b = l >> 1, o = (l & 1) * 8;
    float acc = 0.0f;
    for (int sb = half; sb < nsb; sb += 2) {
        const u8* blk = wr + (size_t)sb * 144;
        float dd = f16_to_f32(*(const u16*)blk) * Q4S_D_UNIT;
        float s0 = q4s_scale(2 * b, blk + 2), s1 = q4s_scale(2 * b + 1, blk + 2);
        uint2 v = *(const uint2*)(blk + 16 + 16 * b + o);
        const float* xl = x + sb * 256 + 32 * b + o;
        const float* xh = xl + 16;
        float4 xl0 = *(const float4*)xl, xl1 = *(const float4*)(xl + 4);
        float4 xh0 = *(const float4*)xh, xh1 = *(const float4*)(xh + 4);
        float ql = 0.f, qh = 0.f;
        ql += grid[v.x & 15] * xl0.x + grid[(v.x >> 8) & 15] * xl0.y +
              grid[(v.x >> 16) & 15] * xl0.z + grid[(v.x >> 24) & 15] * xl0.w;
        ql += grid[v.y & 15] * xl1.x + grid[(v.y >> 8) & 15] * xl1.y +
              grid[(v.y >> 16) & 15] * xl1.z + grid[(v.y >> 24) & 15] * xl1.w;
        qh += grid[(v.x >> 4) & 15] * xh0.x + grid[(v.x >> 12) & 15] * xh0.y +
              grid[(v.x >> 20) & 15] * xh0.z + grid[(v.x >> 28) & 15] * xh0.w;
        qh += grid[(v.y >> 4) & 15] * xh1.x + grid[(v.y >> 12) & 15] * xh1.y +
              grid[(v.y >> 20) & 15] * xh1.z + grid[(v.y >> 28) & 15] * xh1.w;
        // weight = (d s[j]) grid[n], summed against x.
        acc += (dd * s0) * ql + (dd * s1) * qh;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}
