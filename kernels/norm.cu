// RMSNorm of decode rows, fused with the residual add before it (and GLM-4-0414's norm of the sublayer output).
// CPU reference: crates/glm's RmsNorm and residual adds (candle ops); GPU test: kernels/tests/gpu_kernels/decode.rs.
//
// One block per row. Rounding follows the op-by-op decoder: the normalized row is rounded to T before the weight
// multiplies it, and the residual sum is rounded to T, so that both paths see the same values.
#include "common.cuh"

// 1 / rms(row) in f32, as RmsNorm computes it: 1 / sqrt(mean(x²) + eps).
template <typename T> __device__ float inv_rms(const T *row, unsigned dim, float eps) {
    float sq = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = to_f32(row[i]);
        sq += v * v;
    }
    return 1.0f / sqrtf(block_sum(sq) / (float)dim + eps);
}

// T(T(x · inv) · w): RmsNorm's two roundings.
template <typename T> __device__ __forceinline__ T scale_row_value(T x, float inv, T w) {
    return from_f32<T>(to_f32(from_f32<T>(to_f32(x) * inv)) * to_f32(w));
}

// out = RmsNorm(x) · weight, per row of `dim`.
template <typename T>
__device__ void rms_norm(const T *__restrict__ x, const T *__restrict__ weight, T *__restrict__ out, unsigned dim,
                         float eps) {
    const T *row = x + (size_t)blockIdx.x * dim;
    T *out_row = out + (size_t)blockIdx.x * dim;
    const float inv = inv_rms(row, dim, eps);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) out_row[i] = scale_row_value(row[i], inv, weight[i]);
}

// residual += delta (with `delta_weight` non-null: residual += RmsNorm(delta) · delta_weight), then
// out = RmsNorm(residual) · weight. Each thread rereads only the elements it wrote, so no barrier is needed
// between the passes beyond the reductions'.
template <typename T>
__device__ void residual_rms_norm(T *__restrict__ residual, const T *__restrict__ delta,
                                  const T *__restrict__ delta_weight, const T *__restrict__ weight,
                                  T *__restrict__ out, unsigned dim, float eps) {
    const size_t base = (size_t)blockIdx.x * dim;
    T *res = residual + base;
    const T *d = delta + base;
    const float delta_inv = delta_weight != nullptr ? inv_rms(d, dim, eps) : 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
        const T add = delta_weight != nullptr ? scale_row_value(d[i], delta_inv, delta_weight[i]) : d[i];
        res[i] = from_f32<T>(to_f32(res[i]) + to_f32(add));
    }
    const float inv = inv_rms(res, dim, eps);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) out[base + i] = scale_row_value(res[i], inv, weight[i]);
}

#define NORM_KERNELS(SUFFIX, T)                                                                               \
    extern "C" __global__ void rms_norm_##SUFFIX(const T *x, const T *weight, T *out, unsigned dim, float eps) { \
        rms_norm<T>(x, weight, out, dim, eps);                                                                \
    }                                                                                                         \
    extern "C" __global__ void residual_rms_norm_##SUFFIX(T *residual, const T *delta, const T *delta_weight, \
                                                          const T *weight, T *out, unsigned dim, float eps) { \
        residual_rms_norm<T>(residual, delta, delta_weight, weight, out, dim, eps);                           \
    }

NORM_KERNELS(f32, float)
NORM_KERNELS(f16, __half)
NORM_KERNELS(bf16, __nv_bfloat16)
