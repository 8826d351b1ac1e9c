// Causal grouped-query attention over a GPU-resident f32 KV cache, with Grok's soft-capped logits
// and pad-key mask (docs: grok1-model.md section 2.2; CPU twin: src/model/attention.rs).
//
// One block per (query head, query token); dynamic shared memory holds the query and one score
// per key. Query t sits at position p0 + t and sees keys s <= p0 + t whose token is not padding;
// logits are cap * tanh(mult * q.k / cap); masked keys get -1e30. A query that sees no key gets
// the mean of all p0 + T values, which is what the release's -1e30 fill gives.
//
// q, out: [T][n_q * head_dim]; kc, vc: [n_kv][capacity][head_dim]; key_valid: [>= p0 + T] bytes.

#define MASKED (-1e30f)

extern "C" __global__ void attention(const float* q, const float* kc, const float* vc,
                                     const u8* key_valid, float* out, int T, int p0, int n_q,
                                     int n_kv, int head_dim, int capacity, float mult, float cap) {
    DYNAMIC_SHARED(float, sh);
    __shared__ float red[32];
    int h = blockIdx.x, t = blockIdx.y;
    int lane = threadIdx.x & (WARP - 1), warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    int qd = n_q * head_dim;
    int g = h / (n_q / n_kv);  // contiguous groups of query heads share a KV head
    int n_keys = p0 + T, visible = p0 + t + 1;
    float* qs = sh;               // [head_dim]
    float* sc = sh + head_dim;    // [n_keys]
    const float* kh = kc + (size_t)g * capacity * head_dim;
    const float* vh = vc + (size_t)g * capacity * head_dim;
    float* o = out + (size_t)t * qd + (size_t)h * head_dim;

    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) qs[i] = q[(size_t)t * qd + h * head_dim + i];
    __syncthreads();

    // Scores: a warp per key, lanes split the head dimension.
    float inv_cap = 1.0f / cap;
    for (int s = warp; s < visible; s += nw) {
        float v = MASKED;
        if (key_valid[s]) {
            const float* kr = kh + (size_t)s * head_dim;
            float p = 0.0f;
            for (int i = lane; i < head_dim; i += WARP) p += qs[i] * kr[i];
            p = warp_sum(p) * mult;
            v = cap * tanhf(p * inv_cap);
        }
        if (lane == 0) sc[s] = v;
    }
    __syncthreads();
    float m = MASKED;
    for (int s = threadIdx.x; s < visible; s += blockDim.x) m = fmaxf(m, sc[s]);
    m = block_max(m, red);

    if (m == MASKED) {
        float w = 1.0f / (float)n_keys;
        for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
            float acc = 0.0f;
            for (int s = 0; s < n_keys; s++) acc += vh[(size_t)s * head_dim + i];
            o[i] = acc * w;
        }
        return;
    }

    float sum = 0.0f;
    for (int s = threadIdx.x; s < visible; s += blockDim.x) {
        float e = key_valid[s] ? expf(sc[s] - m) : 0.0f;
        sc[s] = e;
        sum += e;
    }
    sum = block_sum(sum, red);  // its barriers also publish sc[] to every thread
    float inv = 1.0f / sum;

    // Weighted sum of values: threads across the head dimension, so each key's row is read
    // contiguously.
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < visible; s++) {
            float w = sc[s];
            if (w != 0.0f) acc += w * vh[(size_t)s * head_dim + i];
        }
        o[i] = acc * inv;
    }
}
