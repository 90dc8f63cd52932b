// Decode attention: one query token per sequence against the KV cache, softmax(q·Kᵀ·scale)·V in one kernel
// instead of matmul, scale, softmax and matmul with their intermediate tensors.
// CPU reference: the candle ops of crates/glm's attention (GPU test: kernels/tests/gpu_kernels/attention.rs).
//
// Layout (crates/glm's preallocated cache): q [heads_total = batch*kv_heads*rep, head_dim] where the `rep`
// query heads of a kv head are consecutive; k and v [batch*kv_heads, capacity, head_dim], of which the
// first `len` tokens are valid. One block per query head; each warp runs an online softmax over a strided
// subset of the tokens, and the warps' partial results are merged at the end. Math in f32.
#include "common.cuh"

#define ATTN_WARPS 8
// Dims per lane: head_dim <= 32 * ATTN_MAX_DIMS_PER_LANE.
#define ATTN_MAX_DIMS_PER_LANE 8

template <typename T>
__device__ void decode_attention(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                                 T *__restrict__ out, unsigned rep, unsigned capacity, unsigned len,
                                 unsigned head_dim, float scale) {
    __shared__ float q_s[32 * ATTN_MAX_DIMS_PER_LANE];
    __shared__ float m_s[ATTN_WARPS], l_s[ATTN_WARPS];
    __shared__ float acc_s[ATTN_WARPS][32 * ATTN_MAX_DIMS_PER_LANE];

    const unsigned head = blockIdx.x;
    const unsigned kv = head / rep;
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
        q_s[d] = to_f32(q[(size_t)head * head_dim + d]);
    }
    __syncthreads();

    const T *k_head = k + (size_t)kv * capacity * head_dim;
    const T *v_head = v + (size_t)kv * capacity * head_dim;
    float m = -INFINITY, l = 0.0f;
    float acc[ATTN_MAX_DIMS_PER_LANE];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_DIMS_PER_LANE; ++j) acc[j] = 0.0f;

    for (unsigned t = warp; t < len; t += ATTN_WARPS) {
        const T *k_row = k_head + (size_t)t * head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_DIMS_PER_LANE; ++j) {
            const unsigned d = lane + 32 * j;
            if (d < head_dim) dot += q_s[d] * to_f32(k_row[d]);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffff, dot, offset);
        const float s = dot * scale;
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * correction + p;
        const T *v_row = v_head + (size_t)t * head_dim;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_DIMS_PER_LANE; ++j) {
            const unsigned d = lane + 32 * j;
            if (d < head_dim) acc[j] = acc[j] * correction + p * to_f32(v_row[d]);
        }
        m = m_new;
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < ATTN_MAX_DIMS_PER_LANE; ++j) {
        const unsigned d = lane + 32 * j;
        if (d < head_dim) acc_s[warp][d] = acc[j];
    }
    __syncthreads();

    // Merge the warps: a warp that saw no token has m = -inf and weight 0.
    float m_all = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; ++w) m_all = fmaxf(m_all, m_s[w]);
    float l_all = 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w) l_all += l_s[w] * expf(m_s[w] - m_all);
    for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) o += acc_s[w][d] * expf(m_s[w] - m_all);
        out[(size_t)head * head_dim + d] = from_f32<T>(o / l_all);
    }
}

#define DECODE_ATTENTION_KERNEL(SUFFIX, T)                                                                   \
    extern "C" __global__ void decode_attention_##SUFFIX(const T *q, const T *k, const T *v, T *out,       \
                                                         unsigned rep, unsigned capacity, unsigned len,    \
                                                         unsigned head_dim, float scale) {                \
        grid_dependency_wait();                                                                            \
        decode_attention<T>(q, k, v, out, rep, capacity, len, head_dim, scale);                           \
    }

// The decode step's variant: the cache holds *pos + 1 tokens (the current one written by rotary.cu), read from
// device memory so that a captured graph serves every position.
#define DECODE_ATTENTION_AT_KERNEL(SUFFIX, T)                                                                \
    extern "C" __global__ void decode_attention_at_##SUFFIX(const T *q, const T *k, const T *v, T *out,    \
                                                            unsigned rep, unsigned capacity,               \
                                                            const unsigned *pos, unsigned head_dim,        \
                                                            float scale) {                                 \
        grid_dependency_wait();                                                                            \
        decode_attention<T>(q, k, v, out, rep, capacity, *pos + 1, head_dim, scale);                      \
    }

DECODE_ATTENTION_KERNEL(f32, float)
DECODE_ATTENTION_KERNEL(f16, __half)
DECODE_ATTENTION_KERNEL(bf16, __nv_bfloat16)
DECODE_ATTENTION_AT_KERNEL(f32, float)
DECODE_ATTENTION_AT_KERNEL(f16, __half)
DECODE_ATTENTION_AT_KERNEL(bf16, __nv_bfloat16)
