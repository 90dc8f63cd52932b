// Moves packed NF4 codes between bitsandbytes' order and the tiled order of common.cuh (both directions), one
// 8-byte chunk per thread. CPU reference: the chunk map is checked by kernels/tests/gpu_kernels/dequantize.rs, which uploads
// (tiles) and downloads (untiles) weights and compares the bytes and every kernel's result with crates/nf4.
#include "common.cuh"

extern "C" __global__ void tile_nf4(const uint64_t *__restrict__ bnb, uint64_t *__restrict__ tiled, size_t chunks,
                                    unsigned row_chunks) {
    for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q < chunks; q += (size_t)gridDim.x * blockDim.x) {
        tiled[nf4_tiled_chunk(q, row_chunks)] = bnb[q];
    }
}

extern "C" __global__ void untile_nf4(const uint64_t *__restrict__ tiled, uint64_t *__restrict__ bnb, size_t chunks,
                                      unsigned row_chunks) {
    for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q < chunks; q += (size_t)gridDim.x * blockDim.x) {
        bnb[q] = tiled[nf4_tiled_chunk(q, row_chunks)];
    }
}
