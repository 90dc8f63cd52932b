// Embedding lookup of the decode tokens, reading the token ids from device memory (where argmax.cu left them), so
// that the decode loop needs no host-to-device copy. CPU reference: candle's index_select on the table;
// GPU test: kernels/tests/gpu_kernels/decode.rs.
#include "common.cuh"

template <typename T>
__device__ void embed_rows(const T *__restrict__ table, const unsigned *__restrict__ tokens, T *__restrict__ out,
                           unsigned hidden) {
    const T *row = table + (size_t)tokens[blockIdx.x] * hidden;
    for (unsigned i = threadIdx.x; i < hidden; i += blockDim.x) out[(size_t)blockIdx.x * hidden + i] = row[i];
}

#define EMBEDDING_KERNEL(SUFFIX, T)                                                                            \
    extern "C" __global__ void embed_rows_##SUFFIX(const T *table, const unsigned *tokens, T *out,            \
                                                   unsigned hidden) {                                         \
        grid_dependency_wait();                                                                               \
        embed_rows<T>(table, tokens, out, hidden);                                                            \
    }

EMBEDDING_KERNEL(f32, float)
EMBEDDING_KERNEL(f16, __half)
EMBEDDING_KERNEL(bf16, __nv_bfloat16)
