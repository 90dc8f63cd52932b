// Dense matrix-vector products for decode: y = x · Wᵀ for 1..8 rows of x, W [N, K] in f32/f16/bf16, f32 accumulation,
// writing into a caller's buffer (the decode step's preallocated scratch), which candle's cuBLAS matmul cannot.
// CPU reference: an f64 matmul of the same values; GPU test: kernels/tests/gpu_kernels/decode.rs.
//
// One warp per output row. A launch may cover up to GEMV_GROUP weights of one input width (GLM's q, k and v of the
// same input, common.cuh), their rows numbered one weight after the other. With K a multiple of the vector width a
// lane streams 16-byte chunks of its row (DENSE_CHUNKS_IN_FLIGHT loads issued before any is used) and reads x through
// L1; otherwise element by element.
#include "common.cuh"

#define DENSE_WARPS 8
#define DENSE_MAX_BATCH 8
#define DENSE_CHUNKS_IN_FLIGHT 4
// Bytes of its row a warp asks L2 for before waiting on the previous kernel (common.cuh): a row's worth of GLM's
// hidden size in 16-bit, and for all resident warps together well under the L2.
#define DENSE_PREFETCH_BYTES 8192

// Up to GEMV_GROUP weights [n, k] of one k and their outputs [batch, n].
template <typename T> struct DenseGroup {
    const T *w[GEMV_GROUP];
    T *y[GEMV_GROUP];
    unsigned n[GEMV_GROUP];
};

// Warps loop over rows (a grid smaller than N / DENSE_WARPS blocks is allowed). NORMED: x is computed from `norm`
// into dynamic shared memory (batch * k elements, k a multiple of the vector width) after the wait; else it is read
// from `x` through L1.
template <typename T, bool NORMED>
__device__ void gemv_dense(const DenseGroup<T> &group, const T *__restrict__ x, const NormedInput<T> &norm,
                           unsigned k, unsigned batch, unsigned vectorized) {
    constexpr unsigned VEC = 16 / sizeof(T);
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned first_row = blockIdx.x * DENSE_WARPS + warp;
    unsigned n = 0;
#pragma unroll
    for (int g = 0; g < GEMV_GROUP; ++g) n += group.n[g];
    if (vectorized && lane == 0 && first_row < n) {
        unsigned local;
        const unsigned g = group_locate(group.n, first_row, local);
        prefetch_l2(group_pick(group.w, g) + (size_t)local * k, min(k * (unsigned)sizeof(T), DENSE_PREFETCH_BYTES));
    }
    if (NORMED && threadIdx.x == 0) {
        prefetch_l2(norm.weight, k * sizeof(T));
        if (norm.delta_weight != nullptr) prefetch_l2(norm.delta_weight, k * sizeof(T));
    }
    grid_dependency_wait();
    extern __shared__ __align__(16) uint8_t gemv_normed_x[];
    T *const xs = reinterpret_cast<T *>(gemv_normed_x);
    if (NORMED) normalize_input_rows(norm, xs, k, batch);
    const T *const x_rows = NORMED ? xs : x;

    for (unsigned row = first_row; row < n; row += gridDim.x * DENSE_WARPS) {
        unsigned local;
        const unsigned g = group_locate(group.n, row, local);
        const T *w_row = group_pick(group.w, g) + (size_t)local * k;
        float acc[DENSE_MAX_BATCH];
#pragma unroll
        for (int b = 0; b < DENSE_MAX_BATCH; ++b) acc[b] = 0.0f;

        if (vectorized) {
            const unsigned chunks = k / VEC;
            const uint4 *w_chunks = reinterpret_cast<const uint4 *>(w_row);
            for (unsigned base = lane; base < chunks; base += 32 * DENSE_CHUNKS_IN_FLIGHT) {
                Chunk<T> wc[DENSE_CHUNKS_IN_FLIGHT];
#pragma unroll
                for (int i = 0; i < DENSE_CHUNKS_IN_FLIGHT; ++i) {
                    const unsigned c = base + 32 * i;
                    wc[i].raw = c < chunks ? load_streaming(w_chunks + c) : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
                for (int i = 0; i < DENSE_CHUNKS_IN_FLIGHT; ++i) {
                    const unsigned c = base + 32 * i;
                    if (c >= chunks) break;
#pragma unroll
                    for (int b = 0; b < DENSE_MAX_BATCH; ++b) {
                        if (b >= batch) break;
                        const uint4 *x_chunk = reinterpret_cast<const uint4 *>(x_rows + (size_t)b * k) + c;
                        Chunk<T> xc;
                        xc.raw = NORMED ? *x_chunk : __ldg(x_chunk);
#pragma unroll
                        for (unsigned e = 0; e < VEC; ++e) {
                            acc[b] = fmaf(to_f32(wc[i].values[e]), to_f32(xc.values[e]), acc[b]);
                        }
                    }
                }
            }
        } else {
            for (unsigned col = lane; col < k; col += 32) {
                const float wv = to_f32(w_row[col]);
#pragma unroll
                for (int b = 0; b < DENSE_MAX_BATCH; ++b) {
                    if (b >= batch) break;
                    acc[b] = fmaf(wv, to_f32(x_rows[(size_t)b * k + col]), acc[b]);
                }
            }
        }
#pragma unroll
        for (int b = 0; b < DENSE_MAX_BATCH; ++b) {
            if (b >= batch) break;
            float v = acc[b];
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
            if (lane == 0) group_pick(group.y, g)[(size_t)b * group_pick(group.n, g) + local] = from_f32<T>(v);
        }
    }
}

// Weight slot I of a group: the weight, its output and its rows.
#define DENSE_SLOT_PARAMS(T, I) const T *w##I, T *y##I, unsigned n##I
#define DENSE_GROUP(T)                                                                                        \
    DenseGroup<T> {                                                                                          \
        {w0, w1, w2}, {y0, y1, y2}, { n0, n1, n2 }                                                           \
    }
#define GEMV_DENSE_KERNEL(SUFFIX, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * DENSE_WARPS)                                           \
        gemv_dense_##SUFFIX(DENSE_SLOT_PARAMS(T, 0), DENSE_SLOT_PARAMS(T, 1), DENSE_SLOT_PARAMS(T, 2),         \
                            const T *x, unsigned k, unsigned batch, unsigned vectorized) {                    \
        gemv_dense<T, false>(DENSE_GROUP(T), x, NormedInput<T>{}, k, batch, vectorized);                     \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * DENSE_WARPS)                                           \
        gemv_dense_normed_##SUFFIX(DENSE_SLOT_PARAMS(T, 0), DENSE_SLOT_PARAMS(T, 1), DENSE_SLOT_PARAMS(T, 2),  \
                                   NORMED_INPUT_PARAMS(T), unsigned k, unsigned batch) {                      \
        gemv_dense<T, true>(DENSE_GROUP(T), nullptr, NORMED_INPUT_ARGS(T), k, batch, 1);                      \
    }

GEMV_DENSE_KERNEL(f32, float)
GEMV_DENSE_KERNEL(f16, __half)
GEMV_DENSE_KERNEL(bf16, __nv_bfloat16)
