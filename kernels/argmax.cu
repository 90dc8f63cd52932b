// Greedy sampling on the GPU: the index of the first maximum of each row of logits (torch.argmax's choice among
// ties, as crates/glm's Sampler), written where the next step's embedding lookup reads it, and the end of the
// decode step: the shared position advances by one. A row holding NaN yields 0xffffffff, which the host reports.
// CPU reference: crates/glm's Sampler (greedy); GPU test: kernels/tests/gpu_kernels/decode.rs.
#include "common.cuh"

#define ARGMAX_THREADS 1024

template <typename T>
__device__ void argmax_rows(const T *__restrict__ logits, unsigned vocab, unsigned *__restrict__ tokens,
                            unsigned *__restrict__ pos) {
    __shared__ float best_s[ARGMAX_THREADS / 32];
    __shared__ unsigned index_s[ARGMAX_THREADS / 32];
    __shared__ int nan_s;
    const T *row = logits + (size_t)blockIdx.x * vocab;
    if (threadIdx.x == 0) nan_s = 0;
    __syncthreads();
    float best = -INFINITY;
    unsigned index = 0xffffffffu;
    bool nan = false;
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = to_f32(row[i]);
        nan |= isnan(v);
        // Strictly greater: the first index of this thread's maximum; -inf everywhere still yields an index.
        if (v > best || index == 0xffffffffu) {
            best = v;
            index = i;
        }
    }
    if (nan) nan_s = 1;
    // Reduce (value, index): larger value wins, the smaller index among equal values.
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(0xffffffff, best, offset);
        const unsigned other_index = __shfl_xor_sync(0xffffffff, index, offset);
        if (other > best || (other == best && other_index < index)) {
            best = other;
            index = other_index;
        }
    }
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        best_s[warp] = best;
        index_s[warp] = index;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned w = 1; w < blockDim.x / 32; ++w) {
            if (best_s[w] > best || (best_s[w] == best && index_s[w] < index)) {
                best = best_s[w];
                index = index_s[w];
            }
        }
        tokens[blockIdx.x] = nan_s ? 0xffffffffu : index;
        if (blockIdx.x == 0) *pos += 1;
    }
}

#define ARGMAX_KERNEL(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)                                             \
        argmax_rows_##SUFFIX(const T *logits, unsigned vocab, unsigned *tokens, unsigned *pos) {               \
        argmax_rows<T>(logits, vocab, tokens, pos);                                                           \
    }

ARGMAX_KERNEL(f32, float)
ARGMAX_KERNEL(f16, __half)
ARGMAX_KERNEL(bf16, __nv_bfloat16)
