// NF4 dequantize: packed 4-bit codes in bitsandbytes' layout -> f32 / f16 / bf16.
// CPU reference: crates/nf4 (Nf4Tensor::dequantize_*); GPU test: kernels/tests/gpu_dequantize.rs.
//
// Layout: element e of the flattened row-major tensor is nibble (e & 1 ? low : high) of byte e / 2 and belongs
// to block e >> blocksize_log2, whose absmax is either stored as f32 or double-quantized:
//   absmax[b] = nested_map[absmax_code[b]] * nested_absmax[b / 256] + offset
// and the value is codebook[code] * absmax[b]. Both products are rounded separately in f32 (no fused
// multiply-add), as bitsandbytes' two kernels and the CPU reference do, so all three agree bit for bit.
#include "common.cuh"

// Per-block absmax stored as plain f32 (bitsandbytes with double quant off).
struct PlainAbsmax {
    const float *absmax;
    __device__ __forceinline__ float operator()(size_t block) const { return __ldg(absmax + block); }
};

// Per-block absmax double-quantized (bitsandbytes' default): u8 code into the signed dynamic map.
struct NestedAbsmax {
    const uint8_t *codes;
    const float *nested_absmax;
    const float *nested_map;
    float offset;
    __device__ __forceinline__ float operator()(size_t block) const {
        float scaled = __fmul_rn(__ldg(nested_map + __ldg(codes + block)),
                                 __ldg(nested_absmax + block / NF4_NESTED_BLOCKSIZE));
        return __fadd_rn(scaled, offset);
    }
};

// One thread per packed byte (two outputs), grid-stride. A plain first version: the fused GEMV of issue 7 is
// where the bandwidth work goes; this one is for loading and for checking.
template <typename T, typename Absmax>
__device__ void dequantize_nf4(const uint8_t *__restrict__ packed, Absmax absmax, T *__restrict__ out,
                               size_t numel, unsigned blocksize_log2) {
    __shared__ float codebook[16];
    const float init[16] = NF4_CODEBOOK_INIT;
    if (threadIdx.x < 16) {
        codebook[threadIdx.x] = init[threadIdx.x];
    }
    __syncthreads();

    const size_t bytes = (numel + 1) / 2;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < bytes; i += stride) {
        const uint8_t byte = __ldg(packed + i);
        // blocksize is even, so both elements of a byte share a block.
        const float scale = absmax((2 * i) >> blocksize_log2);
        out[2 * i] = from_f32<T>(__fmul_rn(codebook[nf4_high(byte)], scale));
        if (2 * i + 1 < numel) {
            out[2 * i + 1] = from_f32<T>(__fmul_rn(codebook[nf4_low(byte)], scale));
        }
    }
}

#define DEQUANTIZE_NF4_KERNELS(SUFFIX, T)                                                                     \
    extern "C" __global__ void dequantize_nf4_##SUFFIX(const uint8_t *packed, const float *absmax, T *out,  \
                                                         size_t numel, unsigned blocksize_log2) {          \
        dequantize_nf4<T>(packed, PlainAbsmax{absmax}, out, numel, blocksize_log2);                        \
    }                                                                                                      \
    extern "C" __global__ void dequantize_nf4_nested_##SUFFIX(                                             \
        const uint8_t *packed, const uint8_t *absmax_codes, const float *nested_absmax,                    \
        const float *nested_map, float offset, T *out, size_t numel, unsigned blocksize_log2) {            \
        dequantize_nf4<T>(packed, NestedAbsmax{absmax_codes, nested_absmax, nested_map, offset}, out, numel, \
                          blocksize_log2);                                                                 \
    }

DEQUANTIZE_NF4_KERNELS(f32, float)
DEQUANTIZE_NF4_KERNELS(f16, __half)
DEQUANTIZE_NF4_KERNELS(bf16, __nv_bfloat16)
