// The attention inputs of one decode token: q/k/v bias, rotary embedding of q and k, and the write of k and v into
// the preallocated KV cache at the current position, in one kernel. The position is read from device memory, so
// that one captured CUDA graph serves every decode step.
// CPU reference: crates/glm's Linear bias add, Rotary::apply (candle's rope_i) and KvCache::append;
// GPU test: kernels/tests/gpu_kernels/decode.rs.
//
// Grid (heads + 2 * kv_heads, batch): block x < heads rotates query head x into q_out [batch, heads, head_dim];
// the next kv_heads blocks rotate key heads into k_cache [batch, kv_heads, capacity, head_dim] at row *pos, the
// last kv_heads blocks copy value heads into v_cache. Rotation as GLM's interleaved rotate_half (pairs 2i, 2i+1 of
// the first rotary_dim dims), in T arithmetic with T-rounded cos/sin, as candle's rope_i computes it.
#include "common.cuh"

template <typename T>
__device__ void rotary_kv_write(const T *__restrict__ q_raw, const T *__restrict__ k_raw,
                                const T *__restrict__ v_raw, const T *__restrict__ q_bias,
                                const T *__restrict__ k_bias, const T *__restrict__ v_bias,
                                const float *__restrict__ inv_freq, const unsigned *__restrict__ pos,
                                T *__restrict__ q_out, T *__restrict__ k_cache, T *__restrict__ v_cache,
                                unsigned heads, unsigned kv_heads, unsigned head_dim, unsigned rotary_dim,
                                unsigned capacity) {
    const unsigned batch = blockIdx.y, h = blockIdx.x;
    const unsigned p = *pos;
    const T *src, *bias;
    T *dst;
    bool rotate = true;
    if (h < heads) {
        src = q_raw + ((size_t)batch * heads + h) * head_dim;
        bias = q_bias != nullptr ? q_bias + (size_t)h * head_dim : nullptr;
        dst = q_out + ((size_t)batch * heads + h) * head_dim;
    } else {
        const bool is_key = h < heads + kv_heads;
        const unsigned kv = is_key ? h - heads : h - heads - kv_heads;
        const size_t row = ((size_t)batch * kv_heads + kv) * capacity + p;
        src = (is_key ? k_raw : v_raw) + ((size_t)batch * kv_heads + kv) * head_dim;
        const T *b = is_key ? k_bias : v_bias;
        bias = b != nullptr ? b + (size_t)kv * head_dim : nullptr;
        dst = (is_key ? k_cache : v_cache) + row * head_dim;
        rotate = is_key;
    }
    for (unsigned pair = threadIdx.x; pair < head_dim / 2; pair += blockDim.x) {
        T x0 = src[2 * pair], x1 = src[2 * pair + 1];
        if (bias != nullptr) {
            x0 = from_f32<T>(to_f32(x0) + to_f32(bias[2 * pair]));
            x1 = from_f32<T>(to_f32(x1) + to_f32(bias[2 * pair + 1]));
        }
        if (rotate && 2 * pair < rotary_dim) {
            const float angle = __fmul_rn((float)p, inv_freq[pair]);
            const T c = from_f32<T>(cosf(angle)), s = from_f32<T>(sinf(angle));
            const T r0 = x0 * c - x1 * s;
            const T r1 = x0 * s + x1 * c;
            x0 = r0;
            x1 = r1;
        }
        dst[2 * pair] = x0;
        dst[2 * pair + 1] = x1;
    }
}

#define ROTARY_KERNEL(SUFFIX, T)                                                                               \
    extern "C" __global__ void rotary_kv_write_##SUFFIX(                                                      \
        const T *q_raw, const T *k_raw, const T *v_raw, const T *q_bias, const T *k_bias, const T *v_bias,     \
        const float *inv_freq, const unsigned *pos, T *q_out, T *k_cache, T *v_cache, unsigned heads,          \
        unsigned kv_heads, unsigned head_dim, unsigned rotary_dim, unsigned capacity) {                        \
        grid_dependency_wait();                                                                               \
        rotary_kv_write<T>(q_raw, k_raw, v_raw, q_bias, k_bias, v_bias, inv_freq, pos, q_out, k_cache, v_cache, \
                           heads, kv_heads, head_dim, rotary_dim, capacity);                                    \
    }

ROTARY_KERNEL(f32, float)
ROTARY_KERNEL(f16, __half)
ROTARY_KERNEL(bf16, __nv_bfloat16)
