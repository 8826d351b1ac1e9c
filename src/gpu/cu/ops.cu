// The element-wise pieces of the forward pass, in f32, with the semantics of src/model/ops.rs.

// out[r] = scale * x[r] / sqrt(mean(x[r]^2) + eps) for each row r (one block per row). With
// `accumulate`, out[r] += that instead (the post-norm residual add). The mean of squares is
// summed in f64, as on the CPU.
extern "C" __global__ void rms_norm_rows(const float* x, const float* scale, float* out, int d,
                                         float eps, int accumulate) {
    __shared__ double red[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* orow = out + (size_t)blockIdx.x * d;
    double ss = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += (double)xr[i] * (double)xr[i];
    ss = block_sum_d(ss, red);
    float inv = 1.0f / sqrtf((float)(ss / (double)d) + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = scale[i] * (xr[i] * inv);
        orow[i] = accumulate ? orow[i] + v : v;
    }
}

// Rotate-half RoPE on [n_tok][n_heads][head_dim], token t at position pos0 + t: lane i pairs
// with lane i + head_dim/2. Phases in f64 and rounded once, as on the CPU (an f32 pos * freq loses
// accuracy at long positions). One thread per (token, head, pair).
extern "C" __global__ void rope_rows(float* x, int n_tok, int n_heads, int head_dim, int pos0,
                                     double theta) {
    int half = head_dim / 2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n_tok * n_heads * half;
    if (idx >= total) return;
    int i = (int)(idx % half);
    long long th = idx / half;  // token * n_heads + head
    int t = (int)(th / n_heads);
    double inv_freq = 1.0 / pow(theta, (double)(2 * i) / (double)head_dim);
    double s, c;
    sincos((double)(pos0 + t) * inv_freq, &s, &c);
    float cf = (float)c, sf = (float)s;
    float* h = x + th * head_dim;
    float a = h[i], b = h[i + half];
    h[i] = a * cf - b * sf;
    h[i + half] = b * cf + a * sf;
}

// Numerically stable softmax of each row of [n][len], in place (one block per row).
extern "C" __global__ void softmax_rows(float* x, int len) {
    __shared__ float red[32];
    float* r = x + (size_t)blockIdx.x * len;
    float m = -3.402823466e38f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) m = fmaxf(m, r[i]);
    m = block_max(m, red);
    float s = 0.0f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        float e = expf(r[i] - m);
        r[i] = e;
        s += e;
    }
    s = block_sum(s, red);
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < len; i += blockDim.x) r[i] *= inv;
}

__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float c = 0.7978846f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

extern "C" __global__ void gelu_tanh(float* x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = gelu_tanh_f(x[i]);
}

// The GeGLU product of an expert: gate = gelu_tanh(gate) * up.
extern "C" __global__ void geglu(float* gate, const float* up, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) gate[i] = gelu_tanh_f(gate[i]) * up[i];
}

// dst[i] = src[idx[i]] for rows of length d: the tokens routed to one expert.
extern "C" __global__ void gather_rows(const float* src, const int* idx, float* dst, int n,
                                       int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * d) return;
    int r = (int)(i / d), c = (int)(i % d);
    dst[i] = src[(size_t)idx[r] * d + c];
}

// dst[idx[i]] += g[i] * src[i] for rows of length d: an expert's weighted output back to its
// tokens. The indices of one call are distinct (a token picks an expert at most once), so no two
// threads write the same element.
extern "C" __global__ void scatter_add_rows(const float* src, const int* idx, const float* g,
                                            float* dst, int n, int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * d) return;
    int r = (int)(i / d), c = (int)(i % d);
    dst[(size_t)idx[r] * d + c] += g[r] * src[i];
}

// Store new keys and values ([n][n_kv * head_dim], token-major) into one layer's cache,
// [n_kv][capacity][head_dim], at positions pos0 .. pos0 + n.
extern "C" __global__ void kv_write(const float* k, const float* v, float* kc, float* vc, int n,
                                    int n_kv, int head_dim, int capacity, int pos0) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n * n_kv * head_dim;
    if (i >= total) return;
    int lane = (int)(i % head_dim);
    long long tg = i / head_dim;
    int g = (int)(tg % n_kv), t = (int)(tg / n_kv);
    size_t dst = ((size_t)g * capacity + pos0 + t) * head_dim + lane;
    kc[dst] = k[i];
    vc[dst] = v[i];
}
