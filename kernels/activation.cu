// The MLP activation of GLM: silu(gate) · up over the fused gate_up projection [rows, 2 · inter] (gate first).
// CPU reference: crates/glm's Mlp (candle's silu and mul); GPU test: kernels/tests/gpu_kernels/decode.rs.
// silu is computed in f32 and rounded to T before the product, as the op-by-op decoder rounds it.
#include "common.cuh"

template <typename T>
__device__ void silu_mul(const T *__restrict__ gate_up, T *__restrict__ out, unsigned inter, size_t total) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / inter, col = i % inter;
        const float g = to_f32(gate_up[row * 2 * inter + col]);
        const T silu = from_f32<T>(g / (1.0f + expf(-g)));
        out[i] = from_f32<T>(to_f32(silu) * to_f32(gate_up[row * 2 * inter + inter + col]));
    }
}

#define ACTIVATION_KERNEL(SUFFIX, T)                                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *gate_up, T *out, unsigned inter, size_t total) {      \
        grid_dependency_wait();                                                                               \
        silu_mul<T>(gate_up, out, inter, total);                                                              \
    }

ACTIVATION_KERNEL(f32, float)
ACTIVATION_KERNEL(f16, __half)
ACTIVATION_KERNEL(bf16, __nv_bfloat16)
