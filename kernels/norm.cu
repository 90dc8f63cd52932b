// RMSNorm of decode rows, fused with the residual add before it (and GLM-4-0414's norm of the sublayer output), as
// its own kernel.
// CPU reference: crates/glm's RmsNorm and residual adds (candle ops); GPU test: kernels/tests/gpu_kernels/decode.rs.
//
// One block of NORM_THREADS per row, each thread keeping its (at most NORM_PER_THREAD) elements in registers, so
// a row is read once and written once: a decode step has one row per sequence, and a block that loops over a
// row measured 14 µs where the memory time is well under one (benches/results/decode-overhead.md).
// Rounding follows the op-by-op decoder: the normalized row is rounded to T before the weight multiplies it, and
// the residual sum is rounded to T, so that both paths see the same values.
#include "common.cuh"

#define NORM_THREADS 1024
// Rows up to NORM_THREADS * NORM_PER_THREAD elements (the Rust side checks).
#define NORM_PER_THREAD 8

// 1 / rms of the values v[0..n) each thread holds: 1 / sqrt(mean(x²) + eps) over the row.
__device__ float inv_rms(const float (&v)[NORM_PER_THREAD], unsigned dim, float eps) {
    float sq = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; ++j) sq += v[j] * v[j];
    return 1.0f / sqrtf(block_sum(sq) / (float)dim + eps);
}

// This thread's elements of a row (zeros past its end, which add nothing to the sum of squares).
template <typename T> __device__ void load_row(const T *row, unsigned dim, float (&v)[NORM_PER_THREAD]) {
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; ++j) {
        const unsigned i = threadIdx.x + j * blockDim.x;
        v[j] = i < dim ? to_f32(row[i]) : 0.0f;
    }
}

// out = RmsNorm(v) · w for the row whose elements the threads hold, with w the thread's weights (load_row).
template <typename T>
__device__ void store_normalized(const float (&v)[NORM_PER_THREAD], const float (&w)[NORM_PER_THREAD], T *out_row,
                                 unsigned dim, float eps) {
    const float inv = inv_rms(v, dim, eps);
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; ++j) {
        const unsigned i = threadIdx.x + j * blockDim.x;
        if (i < dim) out_row[i] = scale_row_value(v[j], inv, from_f32<T>(w[j]));
    }
}

// The rows of x that common.cuh's NormedInput describes, one block a row: in.residual_out = in.residual + added (unless
// null; it may be in.residual: each thread reads its elements before writing them), in.normed_out = x. The decode
// step launches it where a projection cannot normalize its own input (f32, the generic NF4 kernel). The weights
// are read before waiting for the previous kernel (common.cuh): they do not depend on it, and their latency then
// overlaps it.
template <typename T> __device__ void residual_rms_norm(const NormedInput<T> &in, unsigned dim) {
    const size_t base = (size_t)blockIdx.x * dim;
    float w[NORM_PER_THREAD], dw[NORM_PER_THREAD], d[NORM_PER_THREAD] = {}, r[NORM_PER_THREAD];
    load_row(in.weight, dim, w);
    if (in.delta_weight != nullptr) load_row(in.delta_weight, dim, dw);
    grid_dependency_wait();
    if (in.delta != nullptr) load_row(in.delta + base, dim, d);
    load_row(in.residual + base, dim, r);
    const float delta_inv = in.delta_weight != nullptr ? inv_rms(d, dim, in.eps) : 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; ++j) {
        const unsigned i = threadIdx.x + j * blockDim.x;
        if (i >= dim) continue;
        const float added =
            in.delta_weight != nullptr ? to_f32(scale_row_value(d[j], delta_inv, from_f32<T>(dw[j]))) : d[j];
        const T sum = from_f32<T>(r[j] + added);
        if (in.residual_out != nullptr) in.residual_out[base + i] = sum;
        r[j] = to_f32(sum);
    }
    store_normalized(r, w, in.normed_out + base, dim, in.eps);
}

#define NORM_KERNELS(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                               \
        residual_rms_norm_##SUFFIX(NORMED_INPUT_PARAMS(T), unsigned dim) {                                    \
        residual_rms_norm<T>(NORMED_INPUT_ARGS(T), dim);                                                      \
    }

NORM_KERNELS(f32, float)
NORM_KERNELS(f16, __half)
NORM_KERNELS(bf16, __nv_bfloat16)
