// A small emulation of the CUDA execution model on the host, enough to run the GPU tier's
// kernels (src/gpu/cu/) as plain C++ and check their logic without a GPU: every thread of a block
// is an OS thread, blocks run one after another, __syncthreads is a barrier of the block's
// threads and warp shuffles exchange values through a per-warp slot array between two barriers
// of the warp's 32 threads. `__shared__` variables become function statics, which is sound
// because only one block runs at a time.
//
// What it cannot find: anything about the real hardware (alignment faults of vector loads,
// memory-model races across blocks, register pressure, speed). It checks indexing, nibble
// orders, reductions, masks and bounds.

#define GROK1_HOST_EMULATION 1

#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__
#define __shared__ static
#define __launch_bounds__(n)

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

static std::vector<unsigned char> emu_dyn_smem;
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu_dyn_smem.data())

static std::barrier<>* emu_block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
static std::vector<uint64_t> emu_warp_slots;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a scalar");
    unsigned t = threadIdx.x, lane = t & 31, base = t - lane;
    auto& bar = *emu_warp_barriers[t / 32];
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu_warp_slots[t] = bits;
    bar.arrive_and_wait();
    uint64_t other = emu_warp_slots[base + (lane ^ (unsigned)mask)];
    bar.arrive_and_wait();
    T r;
    std::memcpy(&r, &other, sizeof(T));
    return r;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// IEEE binary16 to binary32, exact (subnormals included).
inline float f16_to_f32(unsigned short h) {
    unsigned sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
    float v;
    if (exp == 0) v = std::ldexp((float)man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp((float)(man | 1024), (int)exp - 25);
    return sign ? -v : v;
}

