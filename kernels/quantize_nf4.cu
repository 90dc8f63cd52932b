// NF4 quantize on the device: f32 / f16 / bf16 -> packed codes, absmax, and the double quantization of absmax,
// byte-identical to crates/nf4 (which reproduces bitsandbytes 0.50 on the CPU); every operation below is rounded
// as there (explicit _rn intrinsics: no fused multiply-add unless the reference fuses too).
// CPU reference: nf4::Nf4Tensor::quantize_*; GPU test: kernels/tests/gpu_kernels/quantize.rs compares the bytes.
//
// The mean that double quantization subtracts is computed on the host between the two kernels (nf4::torch_mean,
// torch's summation order), so the offset matches to the bit; absmax has one value per 64 weights, a small
// download.
#include "common.cuh"

// bitsandbytes clamps absmax to 1e-38 (as f32: a subnormal) before dividing by it.
#define ABSMAX_FLOOR ((float)1e-38)
// Entries of bitsandbytes' lookup table from a value in [-1, 1] to its nearest dynamic-map code.
#define DYNAMIC_LUT_SIZE 65536

// First pass: one warp per block of `blocksize` elements (the last may be partial), grid-stride. Writes the
// block's codes (where nf4_packed_offset puts them) and its absmax; a non-finite element records its index in
// *first_bad (atomicMin) and leaves the block unwritten, since the host then refuses the whole tensor.
template <typename T>
__device__ void quantize_nf4_blocks(const T *__restrict__ values, size_t numel, unsigned blocksize,
                                    uint8_t *__restrict__ packed, unsigned tiled_row_chunks,
                                    float *__restrict__ absmax, unsigned long long *first_bad) {
    const float codebook[16] = NF4_CODEBOOK_INIT;
    float thresholds[15];
#pragma unroll
    for (int i = 0; i < 15; ++i) {
        thresholds[i] = __fdiv_rn(__fadd_rn(codebook[i], codebook[i + 1]), 2.0f);
    }
    const unsigned lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const size_t blocks = (numel + blocksize - 1) / blocksize;
    for (size_t block = (size_t)blockIdx.x * warps + threadIdx.x / 32; block < blocks;
         block += (size_t)gridDim.x * warps) {
        const size_t start = block * blocksize;
        const unsigned n = (unsigned)min((size_t)blocksize, numel - start);
        float max_abs = 0.0f;
        unsigned long long bad = ~0ull;
        for (unsigned i = lane; i < n; i += 32) {
            const float v = to_f32(values[start + i]);
            if (!isfinite(v)) {
                bad = min(bad, (unsigned long long)(start + i));
            }
            max_abs = fmaxf(max_abs, fabsf(v));
        }
        const bool any_bad = __any_sync(0xffffffff, bad != ~0ull);
        if (any_bad) {
            if (bad != ~0ull) {
                atomicMin(first_bad, bad);
            }
            continue;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) {
            max_abs = fmaxf(max_abs, __shfl_xor_sync(0xffffffff, max_abs, offset));
        }
        // Full blocks multiply by the reciprocal and store the unclamped absmax; the partial last block divides
        // by the clamped absmax and stores that (bitsandbytes' CPU path).
        const bool full = n == blocksize;
        const float floored = fmaxf(max_abs, ABSMAX_FLOOR);
        const float inv = __fdiv_rn(1.0f, floored);
        for (unsigned pair = lane; pair < (n + 1) / 2; pair += 32) {
            unsigned byte = 0;
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const unsigned i = 2 * pair + k;
                // An odd count pads with 0.0, which encodes as the codebook's zero.
                const float v = i < n ? to_f32(values[start + i]) : 0.0f;
                const float scaled = fminf(fmaxf(full ? __fmul_rn(v, inv) : __fdiv_rn(v, floored), -1.0f), 1.0f);
                unsigned rank = 0;
#pragma unroll
                for (int t = 0; t < 15; ++t) {
                    rank += scaled > thresholds[t];
                }
                byte = (byte << 4) | rank;
            }
            packed[nf4_packed_offset(start / 2 + pair, tiled_row_chunks)] = (uint8_t)byte;
        }
        if (lane == 0) {
            absmax[block] = full ? max_abs : floored;
        }
    }
}

// Second pass (double quant): one thread block of 256 per nested block, grid-stride. `absmax - offset` scaled by
// its block's largest magnitude, snapped to one of 65536 grid points in [-1, 1], and coded as bitsandbytes'
// lookup table codes that point: the number of midpoints of the dynamic map below it.
extern "C" __global__ void quantize_nf4_absmax(const float *__restrict__ absmax, size_t blocks, float offset,
                                               const float *__restrict__ nested_map, uint8_t *__restrict__ codes,
                                               float *__restrict__ nested_absmax) {
    __shared__ float midpoints[255];
    __shared__ float warp_max[NF4_NESTED_BLOCKSIZE / 32];
    for (unsigned i = threadIdx.x; i < 255; i += blockDim.x) {
        midpoints[i] = __fmul_rn(0.5f, __fadd_rn(nested_map[i], nested_map[i + 1]));
    }
    const size_t nested_blocks = (blocks + NF4_NESTED_BLOCKSIZE - 1) / NF4_NESTED_BLOCKSIZE;
    for (size_t nested = blockIdx.x; nested < nested_blocks; nested += gridDim.x) {
        const size_t i = nested * NF4_NESTED_BLOCKSIZE + threadIdx.x;
        const float centered = i < blocks ? __fsub_rn(absmax[i], offset) : 0.0f;
        float max_abs = fabsf(centered);
#pragma unroll
        for (int step = 16; step > 0; step /= 2) {
            max_abs = fmaxf(max_abs, __shfl_xor_sync(0xffffffff, max_abs, step));
        }
        if (threadIdx.x % 32 == 0) {
            warp_max[threadIdx.x / 32] = max_abs;
        }
        __syncthreads();
        max_abs = 0.0f;
#pragma unroll
        for (int w = 0; w < NF4_NESTED_BLOCKSIZE / 32; ++w) {
            max_abs = fmaxf(max_abs, warp_max[w]);
        }
        if (i < blocks) {
            unsigned code = 0;
            if (max_abs != 0.0f) {
                const float scaled = fminf(fmaxf(__fmul_rn(centered, __fdiv_rn(1.0f, max_abs)), -1.0f), 1.0f);
                const unsigned point =
                    (unsigned)__fmaf_rn(__fmul_rn(__fadd_rn(scaled, 1.0f), 0.5f), (float)(DYNAMIC_LUT_SIZE - 1), 0.5f);
                const float grid = __fsub_rn(__fdiv_rn(2.0f * (float)point, (float)(DYNAMIC_LUT_SIZE - 1)), 1.0f);
                unsigned hi = 255;
                while (code < hi) {
                    const unsigned mid = (code + hi) / 2;
                    if (midpoints[mid] < grid) {
                        code = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
            }
            codes[i] = (uint8_t)code;
        }
        if (threadIdx.x == 0) {
            nested_absmax[nested] = max_abs;
        }
        __syncthreads();
    }
}

#define QUANTIZE_NF4_KERNELS(SUFFIX, T)                                                                        \
    extern "C" __global__ void quantize_nf4_blocks_##SUFFIX(const T *values, size_t numel, unsigned blocksize, \
                                                              uint8_t *packed, unsigned tiled_row_chunks,     \
                                                              float *absmax, unsigned long long *first_bad) { \
        quantize_nf4_blocks<T>(values, numel, blocksize, packed, tiled_row_chunks, absmax, first_bad);       \
    }

QUANTIZE_NF4_KERNELS(f32, float)
QUANTIZE_NF4_KERNELS(f16, __half)
QUANTIZE_NF4_KERNELS(bf16, __nv_bfloat16)
