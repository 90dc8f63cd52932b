// Greedy sampling on the GPU: the index of the first maximum of each row of logits (torch.argmax's choice among
// ties, as crates/glm's Sampler), written where the next step's embedding lookup reads it, and the end of the
// decode step: the shared position advances by one. A row holding NaN yields 0xffffffff, which the host reports.
// CPU reference: crates/glm's Sampler (greedy); GPU test: kernels/tests/gpu_kernels/decode.rs.
//
// ARGMAX_BLOCKS blocks per row each reduce a strided share of the row to (value, index) in a scratch buffer; the
// last block of a row to finish (counted with an atomic) reduces those and resets the counter for the next call.
// Scratch per row (ARGMAX_ROW_BYTES, the same layout whatever the row count): the counter (8 bytes with padding),
// the blocks' values, the blocks' indices.
// One block per row measured 39 µs on a 151552-token vocabulary, the split a few (decode-overhead.md).
#include "common.cuh"

#define ARGMAX_THREADS 256
#define ARGMAX_BLOCKS 64
#define ARGMAX_ROW_BYTES (8 + ARGMAX_BLOCKS * 8)

// No element seen: any element beats it, so a row of -inf still yields its first index.
#define ARGMAX_NONE 0xffffffffu

// (value, index) with the larger value, the smaller index among equal values; a NaN value wins (it marks a row
// holding NaN); an index of ARGMAX_NONE is no candidate.
__device__ __forceinline__ void better(float &best, unsigned &index, float other, unsigned other_index) {
    if (other_index == ARGMAX_NONE || (index != ARGMAX_NONE && isnan(best))) return;
    if (index == ARGMAX_NONE || isnan(other) || other > best || (other == best && other_index < index)) {
        best = other;
        index = other_index;
    }
}

// Reduces (value, index) over the block; thread 0 gets the result.
__device__ void block_best(float &best, unsigned &index) {
    __shared__ float best_s[ARGMAX_THREADS / 32];
    __shared__ unsigned index_s[ARGMAX_THREADS / 32];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(0xffffffff, best, offset);
        const unsigned other_index = __shfl_xor_sync(0xffffffff, index, offset);
        better(best, index, other, other_index);
    }
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        best_s[warp] = best;
        index_s[warp] = index;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned w = 1; w < blockDim.x / 32; ++w) better(best, index, best_s[w], index_s[w]);
    }
}

template <typename T>
__device__ void argmax_rows(const T *__restrict__ logits, unsigned vocab, unsigned *__restrict__ tokens,
                            unsigned *__restrict__ pos, uint8_t *scratch) {
    const unsigned row = blockIdx.y;
    uint8_t *row_scratch = scratch + (size_t)row * ARGMAX_ROW_BYTES;
    unsigned *done = reinterpret_cast<unsigned *>(row_scratch);
    float *part_value = reinterpret_cast<float *>(row_scratch + 8);
    unsigned *part_index = reinterpret_cast<unsigned *>(row_scratch + 8 + ARGMAX_BLOCKS * 4);
    const T *values = logits + (size_t)row * vocab;
    float best = -INFINITY;
    unsigned index = ARGMAX_NONE;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < vocab; i += gridDim.x * blockDim.x) {
        better(best, index, to_f32(values[i]), i);
    }
    block_best(best, index);
    __shared__ bool last;
    if (threadIdx.x == 0) {
        part_value[blockIdx.x] = best;
        part_index[blockIdx.x] = index;
        __threadfence();
        last = atomicAdd(done, 1) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    best = -INFINITY;
    index = ARGMAX_NONE;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
        better(best, index, __ldcg(part_value + b), __ldcg(part_index + b));
    }
    block_best(best, index);
    if (threadIdx.x == 0) {
        tokens[row] = isnan(best) ? 0xffffffffu : index; // ARGMAX_NONE only for an empty row
        *done = 0;
        if (row == 0) *pos += 1;
    }
}

#define ARGMAX_KERNEL(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)                                             \
        argmax_rows_##SUFFIX(const T *logits, unsigned vocab, unsigned *tokens, unsigned *pos,                 \
                             uint8_t *scratch) {                                                               \
        grid_dependency_wait();                                                                               \
        argmax_rows<T>(logits, vocab, tokens, pos, scratch);                                                  \
    }

ARGMAX_KERNEL(f32, float)
ARGMAX_KERNEL(f16, __half)
ARGMAX_KERNEL(bf16, __nv_bfloat16)
