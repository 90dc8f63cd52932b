// Shared helpers for glm-run's CUDA kernels: the NF4 codebook, bitsandbytes' block layout, output conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// bitsandbytes' NF4 codebook (index 7 is exactly 0.0); the same 16 values as crates/nf4.
#define NF4_CODEBOOK_INIT                                                                                   \
    {                                                                                                      \
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,  \
            -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f,                      \
            0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f,        \
            0.5626170039176941f, 0.7229568362236023f, 1.0f                                                 \
    }

// Double quantization quantizes the per-block absmax values in nested blocks of this many (bitsandbytes' fixed
// choice); the Rust side checks a state's nested blocksize against it.
#define NF4_NESTED_BLOCKSIZE 256

// Packed byte i holds elements 2i (high nibble) and 2i+1 (low nibble).
__device__ __forceinline__ uint8_t nf4_high(uint8_t byte) { return byte >> 4; }
__device__ __forceinline__ uint8_t nf4_low(uint8_t byte) { return byte & 0x0f; }

// Round-to-nearest-even conversions from the f32 result, as `half::f16::from_f32` / `bf16::from_f32` do.
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
