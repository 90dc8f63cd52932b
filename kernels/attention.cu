// Decode attention: one query token per sequence against the KV cache, softmax(q·Kᵀ·scale)·V in one kernel
// instead of matmul, scale, softmax and matmul with their intermediate tensors. CPU reference: the candle ops of
// crates/glm's attention; GPU tests: kernels/tests/gpu_kernels/attention.rs (through `decode_attention`, the op-by-op
// path's entry) and decode.rs (`DecodeKernels::attention_at`, the decode step's).
//
// Layout (crates/glm's preallocated cache): q [heads_total = batch*kv_heads*rep, head_dim] where the `rep`
// query heads of a kv head are consecutive; k and v [batch*kv_heads, capacity, head_dim], of which the
// first *pos + 1 tokens are valid (the position is read from device memory, so that one captured graph serves
// every step). Math in f32.
#include "common.cuh"

// Flash-decoding: one block per (sequence, kv head) and span of tokens. Its warps take the `rep` query heads
// that share the kv head (their K and V rows come from L1 after the first warp), each running the online softmax
// over the span ATTN_STEP tokens at a time (independent loads in flight); the last block of a kv head to finish
// merges the spans' partial results in span order (so results do not depend on timing). The kernel this
// replaced, one block per query head walking the tokens one at a time, measured 32 µs per layer at 160 tokens
// and 228 µs at 1100 on GLM-4-9B (benches/results/decode-overhead.md): a chain of dependent loads per token.
// Tokens a warp loads at once: 8, or 4 with 8 dims a lane (registers).
#define ATTN_STEP_FOR(DPL) ((DPL) > 4 ? 4 : 8)
// Warps (query heads at once) per block of the split kernel.
#define ATTN_MAX_WARPS 16
// Tokens a span takes at least: short contexts use few spans (less merging).
#define ATTN_MIN_SPAN 16
// Spans (the grid's y) at most, as kernels/src/decode.rs sizes the scratch.
#define ATTN_SPANS 64

// DPL dims per lane (head_dim <= 32 * DPL), lane l holding dims DPL·l .. DPL·l + DPL - 1.
template <typename T, int DPL>
__device__ void decode_attention_split(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                                       T *__restrict__ out, unsigned rep, unsigned capacity, unsigned len,
                                       unsigned head_dim, float scale, unsigned *counters, float2 *partial_ml,
                                       float *partial_acc) {
    constexpr int ATTN_STEP = ATTN_STEP_FOR(DPL);
    const unsigned group = blockIdx.x, spans = gridDim.y, span = blockIdx.y;
    const unsigned chunk = (max(ATTN_MIN_SPAN, (len + spans - 1) / spans) + ATTN_STEP - 1) / ATTN_STEP * ATTN_STEP;
    const unsigned active = (len + chunk - 1) / chunk;
    if (span >= active) return;
    const unsigned start = span * chunk, end = min(len, start + chunk);
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const T *k_head = k + (size_t)group * capacity * head_dim;
    const T *v_head = v + (size_t)group * capacity * head_dim;
    const unsigned dim0 = lane * DPL;

    for (unsigned h = warp; h < rep; h += warps) {
        const unsigned head = group * rep + h;
        float qv[DPL], acc[DPL];
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
            qv[j] = dim0 + j < head_dim ? to_f32(q[(size_t)head * head_dim + dim0 + j]) : 0.0f;
            acc[j] = 0.0f;
        }
        float m = -INFINITY, l = 0.0f;
        for (unsigned t = start; t < end; t += ATTN_STEP) {
            // All the step's K and V loads first: one memory latency per step, not two per token.
            float kx[ATTN_STEP][DPL], vx[ATTN_STEP][DPL], s[ATTN_STEP];
#pragma unroll
            for (int i = 0; i < ATTN_STEP; ++i) {
                const bool valid = t + i < end;
                const size_t row = (size_t)(t + i) * head_dim + dim0;
#pragma unroll
                for (int j = 0; j < DPL; ++j) {
                    const bool load = valid && dim0 + j < head_dim;
                    kx[i][j] = load ? to_f32(k_head[row + j]) : 0.0f;
                    vx[i][j] = load ? to_f32(v_head[row + j]) : 0.0f;
                }
            }
#pragma unroll
            for (int i = 0; i < ATTN_STEP; ++i) {
                s[i] = 0.0f;
#pragma unroll
                for (int j = 0; j < DPL; ++j) s[i] += qv[j] * kx[i][j];
            }
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
                for (int i = 0; i < ATTN_STEP; ++i) s[i] += __shfl_xor_sync(0xffffffff, s[i], offset);
            }
            float m_new = m;
#pragma unroll
            for (int i = 0; i < ATTN_STEP; ++i) {
                s[i] = t + i < end ? s[i] * scale : -INFINITY;
                m_new = fmaxf(m_new, s[i]);
            }
            // The step's first token is always valid, so m_new is finite.
            const float correction = expf(m - m_new);
            l *= correction;
#pragma unroll
            for (int j = 0; j < DPL; ++j) acc[j] *= correction;
#pragma unroll
            for (int i = 0; i < ATTN_STEP; ++i) {
                const float p = expf(s[i] - m_new);
                l += p;
#pragma unroll
                for (int j = 0; j < DPL; ++j) acc[j] += p * vx[i][j];
            }
            m = m_new;
        }
        const size_t slot = (size_t)head * spans + span;
        if (lane == 0) partial_ml[slot] = make_float2(m, l);
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
            if (dim0 + j < head_dim) partial_acc[slot * head_dim + dim0 + j] = acc[j];
        }
    }

    // The last block of this kv head to get here merges the spans (as argmax.cu merges its blocks).
    __shared__ bool last;
    __shared__ float weight_s[ATTN_MAX_WARPS][ATTN_SPANS];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counters + group, 1) == active - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (unsigned h = warp; h < rep; h += warps) {
        const size_t first_slot = (size_t)(group * rep + h) * spans;
        float m_all = -INFINITY;
        for (unsigned i = lane; i < active; i += 32) m_all = fmaxf(m_all, __ldcg(partial_ml + first_slot + i).x);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffff, m_all, offset));
        float l_all = 0.0f;
        for (unsigned i = lane; i < active; i += 32) {
            const float2 ml = __ldcg(partial_ml + first_slot + i);
            const float w = expf(ml.x - m_all);
            weight_s[warp][i] = w;
            l_all += ml.y * w;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) l_all += __shfl_xor_sync(0xffffffff, l_all, offset);
        __syncwarp();
        // Each lane's loads are independent of one another: several in flight, four running sums.
        for (unsigned d = lane; d < head_dim; d += 32) {
            const float *acc = partial_acc + first_slot * head_dim + d;
            const float *w = weight_s[warp];
            float o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f;
            unsigned i = 0;
            for (; i + 4 <= active; i += 4) {
                o0 += __ldcg(acc + (size_t)i * head_dim) * w[i];
                o1 += __ldcg(acc + (size_t)(i + 1) * head_dim) * w[i + 1];
                o2 += __ldcg(acc + (size_t)(i + 2) * head_dim) * w[i + 2];
                o3 += __ldcg(acc + (size_t)(i + 3) * head_dim) * w[i + 3];
            }
            for (; i < active; ++i) o0 += __ldcg(acc + (size_t)i * head_dim) * w[i];
            out[(first_slot / spans) * head_dim + d] = from_f32<T>(((o0 + o1) + (o2 + o3)) / l_all);
        }
        __syncwarp();
    }
    if (threadIdx.x == 0) counters[group] = 0;
}

#define DECODE_ATTENTION_AT_KERNEL(SUFFIX, T)                                                                \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_MAX_WARPS) decode_attention_at_##SUFFIX(         \
        const T *q, const T *k, const T *v, T *out, unsigned rep, unsigned capacity, const unsigned *pos,   \
        unsigned head_dim, float scale, unsigned *counters, float2 *partial_ml, float *partial_acc) {       \
        grid_dependency_wait();                                                                            \
        const unsigned len = *pos + 1;                                                                     \
        if (head_dim <= 64) {                                                                              \
            decode_attention_split<T, 2>(q, k, v, out, rep, capacity, len, head_dim, scale, counters,        \
                                         partial_ml, partial_acc);                                         \
        } else if (head_dim <= 128) {                                                                      \
            decode_attention_split<T, 4>(q, k, v, out, rep, capacity, len, head_dim, scale, counters,        \
                                         partial_ml, partial_acc);                                         \
        } else {                                                                                           \
            decode_attention_split<T, 8>(q, k, v, out, rep, capacity, len, head_dim, scale, counters,        \
                                         partial_ml, partial_acc);                                         \
        }                                                                                                  \
    }

DECODE_ATTENTION_AT_KERNEL(f32, float)
DECODE_ATTENTION_AT_KERNEL(f16, __half)
DECODE_ATTENTION_AT_KERNEL(bf16, __nv_bfloat16)
