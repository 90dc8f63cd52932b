// NF4 dequantize: packed 4-bit codes -> f32 / f16 / bf16 (the prefill path expands weights with it before cuBLAS).
// CPU reference: crates/nf4 (Nf4Tensor::dequantize_*); GPU test: kernels/tests/gpu_kernels/dequantize.rs.
//
// Layout: element e of the flattened row-major tensor is nibble (e & 1 ? low : high) of byte e / 2 (stored where
// nf4_packed_offset puts it: bitsandbytes' order or the tiled one) and belongs to block e >> blocksize_log2, whose
// absmax is either stored as f32 or double-quantized:
//   absmax[b] = nested_map[absmax_code[b]] * nested_absmax[b / 256] + offset
// and the value is codebook[code] * absmax[b]. Both products are rounded separately in f32 (no fused
// multiply-add), as bitsandbytes' two kernels and the CPU reference do, so all three agree bit for bit.
#include "common.cuh"

// Elements per 8-byte chunk of codes. A thread takes one 16-byte unit of the stored codes (two chunks: in
// bitsandbytes' order 32 consecutive elements, in the tiled order 16 of each of two rows), one aligned load.
// Blocksizes are at least 32, so a chunk lies in one block and takes one absmax decode. (Measured on the H100: one
// 4-byte piece per thread, with fully coalesced 16-byte stores, was 1.5x slower.)
#define DEQUANTIZE_CHUNK 16

// 16 consecutive outputs as 16-byte stores (out is 16-byte aligned: candle allocates 256-byte aligned buffers).
template <typename T> __device__ __forceinline__ void store_chunk(T *out, const float (&v)[DEQUANTIZE_CHUNK]) {
    constexpr int PER_STORE = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < DEQUANTIZE_CHUNK; i += PER_STORE) {
        union {
            uint4 vec;
            T elems[PER_STORE];
        } pack;
#pragma unroll
        for (int k = 0; k < PER_STORE; ++k) {
            pack.elems[k] = from_f32<T>(v[i + k]);
        }
        *reinterpret_cast<uint4 *>(out + i) = pack.vec;
    }
}

// The 16 outputs of a chunk (its 8 bytes in lo, hi) whose first element is element `first` of the tensor.
template <typename T, typename Absmax>
__device__ __forceinline__ void dequantize_chunk(uint32_t lo, uint32_t hi, size_t first, const float *codebook,
                                                 Absmax absmax, T *out, unsigned blocksize_log2) {
    const float scale = absmax(first >> blocksize_log2);
    float v[DEQUANTIZE_CHUNK];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const uint8_t byte = ((i < 4 ? lo : hi) >> (8 * (i % 4))) & 0xff;
        v[2 * i] = __fmul_rn(codebook[nf4_high(byte)], scale);
        v[2 * i + 1] = __fmul_rn(codebook[nf4_low(byte)], scale);
    }
    store_chunk(out + first, v);
}

// One thread per whole 16-byte unit (grid-stride); in bitsandbytes' order the last numel % 32 elements one per
// thread (a tiled weight has whole units only).
template <typename T, typename Absmax>
__device__ void dequantize_nf4(const uint8_t *__restrict__ packed, unsigned tiled_row_chunks, Absmax absmax,
                               T *__restrict__ out, size_t numel, unsigned blocksize_log2) {
    __shared__ float codebook[16];
    const float init[16] = NF4_CODEBOOK_INIT;
    if (threadIdx.x < 16) {
        codebook[threadIdx.x] = init[threadIdx.x];
    }
    __syncthreads();

    constexpr size_t UNIT = 2 * DEQUANTIZE_CHUNK;
    const size_t units = numel / UNIT;
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t u = first; u < units; u += stride) {
        const uint4 codes = __ldg(reinterpret_cast<const uint4 *>(packed) + u);
        const size_t chunk0 = tiled_row_chunks ? nf4_untiled_chunk(2 * u, tiled_row_chunks) : 2 * u;
        const size_t chunk1 = tiled_row_chunks ? nf4_untiled_chunk(2 * u + 1, tiled_row_chunks) : 2 * u + 1;
        dequantize_chunk(codes.x, codes.y, chunk0 * DEQUANTIZE_CHUNK, codebook, absmax, out, blocksize_log2);
        dequantize_chunk(codes.z, codes.w, chunk1 * DEQUANTIZE_CHUNK, codebook, absmax, out, blocksize_log2);
    }
    for (size_t e = units * UNIT + first; e < numel; e += stride) {
        const uint8_t byte = __ldg(packed + nf4_packed_offset(e / 2, tiled_row_chunks));
        out[e] = from_f32<T>(__fmul_rn(codebook[e % 2 ? nf4_low(byte) : nf4_high(byte)], absmax(e >> blocksize_log2)));
    }
}

#define DEQUANTIZE_NF4_KERNELS(SUFFIX, T)                                                                     \
    extern "C" __global__ void dequantize_nf4_##SUFFIX(const uint8_t *packed, unsigned tiled_row_chunks,     \
                                                         const float *absmax, T *out, size_t numel,        \
                                                         unsigned blocksize_log2) {                        \
        dequantize_nf4<T>(packed, tiled_row_chunks, PlainAbsmax{absmax}, out, numel, blocksize_log2);      \
    }                                                                                                      \
    extern "C" __global__ void dequantize_nf4_nested_##SUFFIX(                                             \
        const uint8_t *packed, unsigned tiled_row_chunks, const uint8_t *absmax_codes,                     \
        const float *nested_absmax, const float *nested_map, float offset, T *out, size_t numel,           \
        unsigned blocksize_log2) {                                                                         \
        dequantize_nf4<T>(packed, tiled_row_chunks,                                                        \
                          NestedAbsmax{absmax_codes, nested_absmax, nested_map, offset}, out, numel,       \
                          blocksize_log2);                                                                 \
    }

DEQUANTIZE_NF4_KERNELS(f32, float)
DEQUANTIZE_NF4_KERNELS(f16, __half)
DEQUANTIZE_NF4_KERNELS(bf16, __nv_bfloat16)
