// Shared by every kernel of the GPU tier. The sources are compiled at run time by NVRTC, which
// has no standard headers, so the few types and conversions needed are spelled out here.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define WARP 32
#define FULL_MASK 0xffffffffu

// The sources also compile as host C++ against a small emulation of the CUDA execution model
// (tests/gpu_emu/), which defines GROK1_HOST_EMULATION and supplies these two.
#ifndef GROK1_HOST_EMULATION
// Dynamic shared memory of a block, sized at launch.
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]

// An f16 scale as stored in a block, widened exactly.
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    #pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum over the whole block; `red` holds at least blockDim.x / 32 values. Every thread gets the
// result.
__device__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & (WARP - 1), warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    return warp_sum(t);
}

__device__ float block_max(float v, float* red) {
    int lane = threadIdx.x & (WARP - 1), warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : -3.402823466e38f;
    return warp_max(t);
}

__device__ double block_sum_d(double v, double* red) {
    int lane = threadIdx.x & (WARP - 1), warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double t = lane < nw ? red[lane] : 0.0;
    return warp_sum_d(t);
}

// ggml's non-uniform 4-bit grid (src/quant/iq4_nl.rs).
__constant__ float IQ4_NL_GRID[16] = {-127.f, -104.f, -83.f, -65.f, -49.f, -35.f, -22.f, -10.f,
                                      1.f,    13.f,   25.f,  38.f,  53.f,  69.f,  89.f,  113.f};

// q4_k: the 6-bit scale and min of sub-block j from the 12 packed bytes (ggml's
// get_scale_min_k4, formats/blocks.md).
__device__ __forceinline__ void q4k_scale_min(int j, const u8* s, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *m = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
        *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// q4_s: the signed 7-bit scale of sub-block j (src/quant/q4_s.rs) from the 14 packed bytes `s`
// (block bytes 2..16): its low 4 bits in byte j / 2 (low nibble for even j), its high 3 bits at
// bits 3j .. 3j + 3 of the 48-bit little-endian integer in bytes 8..14, stored offset by 64.
// Bits 3j .. 3j + 3 lie in the two bytes from 8 + 3j / 8; for j = 15 the second is block byte 16
// (the first nibbles), read but shifted out.
// q4_s's scale is its stored f16 d times 2^-13.
#define Q4S_D_UNIT (1.0f / 8192.0f)

__device__ __forceinline__ float q4s_scale(int j, const u8* s) {
    int bit = 3 * j;
    u32 hi = ((u32)s[8 + (bit >> 3)] | ((u32)s[9 + (bit >> 3)] << 8)) >> (bit & 7);
    u32 lo = (u32)s[j >> 1] >> (4 * (j & 1));
    return (float)((int)((lo & 15) | ((hi & 7) << 4)) - 64);
}
