// NF4 matrix-vector products for decode: y = x · Wᵀ for 1..8 rows of x, W [N, K] in NF4, f32 accumulation.
// CPU reference: crates/nf4's dequantize_f32 followed by an f32 matmul; GPU test: kernels/tests/gpu_kernels/matmul.rs.
//
// gemv_nf4_tiled_* reads the tiled order of common.cuh (N % 16 == 0, K % 64 == 0, blocksize >= 64) and multiplies
// on tensor cores: one mma.m16n8k16 per 16 rows x 16 columns of W, with W as the A operand and the (up to 8)
// rows of x as the 8 columns of B. Per 64-column tile a lane makes one 16-byte load of codes; the 16 codes of one
// mma k-step come from four lanes whose columns it permutes (the same permutation on A and B leaves the dot
// product unchanged), so that a lane's codes are 8 contiguous bytes of two rows and its x values 16 contiguous
// columns (two 16-byte loads). Codes become operands through a 256-entry table byte -> pair of unscaled codebook
// values, replicated per lane in shared memory so that lookups never conflict on a bank. A tile row lies inside
// one absmax block, so its four mma results are scaled once in f32: the absmax (double-quantized or not) is
// decoded once per tile row, not per element.
//
// A tiled launch multiplies x by 1 to 3 weights of one width (GLM's q, k and v: common.cuh's GEMV_GROUP). The
// gemv_nf4_tiled_[nested_]normed_* kernels compute x themselves: RmsNorm(residual + delta) · weight (common.cuh's
// NormedInput), into dynamic shared memory, so the decode step needs no norm kernel between two projections.
//
// gemv_nf4_generic_* covers everything else (any shape and blocksize, either order, f32 x): one warp per output
// row, element by element. Correct, not fast.
#include "common.cuh"

// Tiles whose codes each warp loads before using any. Only the codes are held (4 registers a tile): each tile's x
// is loaded just before its products, from shared memory or L1, so 4 tiles fit in 64 registers.
#define GEMV_TILES_IN_FLIGHT 4
// Rows of x a launch handles (the n dimension of mma.m16n8k16).
#define GEMV_MAX_BATCH 8

// One mma k-step s (0..3) of a tile: bytes 2s and 2s + 1 of the lane's 8 bytes of row r (words w0 = words[s / 2])
// and of row r + 8 (w8 = words[2 + s / 2]); x words 2s and 2s + 1.
template <typename T, int S>
__device__ __forceinline__ void tile_step(float (&c)[4], uint32_t lane_table, const uint32_t (&words)[4],
                                          const uint32_t (&xw)[8]) {
    constexpr int LO = 2 * (S % 2), HI = LO + 1;
    const uint32_t a[4] = {
        table_lookup<LO>(lane_table, words[S / 2]),
        table_lookup<LO>(lane_table, words[2 + S / 2]),
        table_lookup<HI>(lane_table, words[S / 2]),
        table_lookup<HI>(lane_table, words[2 + S / 2]),
    };
    Mma<T>::run(c, a, xw[2 * S], xw[2 * S + 1]);
}

// Warps per block of the tiled kernel. Two blocks per SM (64 registers a thread) keep 32 warps' loads in flight.
#define GEMV_WARPS 16
#define GEMV_MIN_BLOCKS 2
// Scales a lane decodes per group of tiles: the warp decodes 16 rows x GEMV_TILES_IN_FLIGHT tiles at once.
#define GEMV_SCALES_PER_LANE (NF4_TILE_ROWS * GEMV_TILES_IN_FLIGHT / 32)
// Tiles of its first run a warp asks L2 for before waiting on the previous kernel (common.cuh): 4 KB a warp, at
// most ~17 MB over all resident warps, a third of the H100's L2.
#define GEMV_PREFETCH_TILES 8

// Up to GEMV_GROUP tiled weights of one width multiplied in one launch (common.cuh): their strips are numbered one
// weight after the other, so a block may finish q's last strips and go on with k's.
template <typename T, typename Absmax> struct Nf4Group {
    const uint4 *packed[GEMV_GROUP];
    Absmax absmax[GEMV_GROUP];
    T *y[GEMV_GROUP];
    // Output rows (a multiple of 16) and strips of each weight.
    unsigned rows[GEMV_GROUP], strips[GEMV_GROUP];
};

// `split` (1, 2, 4, 8 or 16) warps share a strip (16 rows of W), each taking a contiguous run of its tiles,
// GEMV_TILES_IN_FLIGHT at a time (all their code loads first); a block works on GEMV_WARPS / split strips at once
// and loops over strips, so the table is built once per block. With split 1 a warp owns whole strips and writes
// their outputs itself; otherwise the warps of a strip add up their partial sums in shared memory. The host picks
// the smallest split that still gives the device enough warps. NORMED: x is computed from `norm` into dynamic
// shared memory (batch * cols elements) after the wait; else it is read from `x` through L1.
template <typename T, typename Absmax, bool NORMED>
__device__ void gemv_nf4_tiled(const Nf4Group<T, Absmax> &group, const T *__restrict__ x, const NormedInput<T> &norm,
                               unsigned cols, unsigned batch, unsigned split, unsigned blocksize_log2) {
    static_assert(GEMV_TILES_IN_FLIGHT % 2 == 0, "a warp decodes scales for pairs of tiles");
    constexpr int U = GEMV_TILES_IN_FLIGHT;
    __shared__ __align__(16) uint32_t table[NF4_CODE_TABLE_WORDS];
    __shared__ float partial[GEMV_WARPS][32][4];
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned tiles = cols / NF4_TILE_COLS;
    unsigned strips = 0;
#pragma unroll
    for (int w = 0; w < GEMV_GROUP; ++w) strips += group.strips[w];
    const unsigned strips_per_block = GEMV_WARPS / split, block_strip = warp / split;
    const unsigned run = (tiles + split - 1) / split;
    const unsigned first_tile = min(tiles, (warp % split) * run), end_tile = min(tiles, first_tile + run);
    // Weights do not depend on the previous kernel: fetch this warp's first tiles while it runs (and build the
    // table), then wait for x.
    const unsigned first_strip = blockIdx.x * strips_per_block + block_strip;
    if (lane == 0 && first_strip < strips && first_tile < end_tile) {
        unsigned local;
        const unsigned w = group_locate(group.strips, first_strip, local);
        prefetch_l2(group_pick(group.packed, w) + ((size_t)local * tiles + first_tile) * 32,
                    min(end_tile - first_tile, GEMV_PREFETCH_TILES) * NF4_TILE_BYTES);
    }
    if (NORMED && threadIdx.x == 0) {
        prefetch_l2(norm.weight, cols * sizeof(T));
        if (norm.delta_weight != nullptr) prefetch_l2(norm.delta_weight, cols * sizeof(T));
    }
    build_code_table<T>(table);
    __syncthreads();
    grid_dependency_wait();
    extern __shared__ __align__(16) uint8_t gemv_normed_x[];
    T *const xs = reinterpret_cast<T *>(gemv_normed_x);
    if (NORMED) normalize_input_rows(norm, xs, cols, batch);
    const T *const x_rows = NORMED ? xs : x;

    const uint32_t lane_table = (uint32_t)__cvta_generic_to_shared(table + lane);
    // Lane 4r + j: A rows r and r + 8, B column (row of x) r, columns 16j..16j+15 of each tile. Lanes past the
    // batch load row 0 again: B column r only feeds output column r, which is not stored.
    const unsigned r = lane / 4, j = lane % 4;
    const uint4 *x_start = reinterpret_cast<const uint4 *>(x_rows + (size_t)min(r, batch - 1) * cols + 16 * j) +
                           first_tile * 8;
    // Scales: lane λ decodes row λ % 16 of tiles λ / 16, λ / 16 + 2, ... of each group.
    const unsigned scale_row = lane % 16, scale_tile = lane / 16;

    // Every warp of the block runs the same number of iterations (a barrier is inside when split > 1).
    for (unsigned first = blockIdx.x * strips_per_block; first < strips; first += gridDim.x * strips_per_block) {
        const unsigned strip = first + block_strip;
        // The strip's weight and its strip in that weight.
        unsigned local = 0;
        const unsigned w = group_locate(group.strips, min(strip, strips - 1), local);
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (strip < strips) {
            const Absmax absmax = group_pick(group.absmax, w);
            const size_t scale_row_start = ((size_t)local * NF4_TILE_ROWS + scale_row) * cols;
            const uint4 *codes_lane = group_pick(group.packed, w) + ((size_t)local * tiles + first_tile) * 32 + lane;
            const uint4 *x_lane = x_start;
            for (unsigned tile_group = first_tile; tile_group < end_tile; tile_group += U) {
                // Past the end of the warp's run the last tile is loaded again (no branch) and not used.
                const unsigned last = end_tile - 1 - tile_group;
                uint4 codes[U];
                float scales[GEMV_SCALES_PER_LANE];
#pragma unroll
                for (int i = 0; i < GEMV_SCALES_PER_LANE; ++i) {
                    const unsigned tile = tile_group + min(scale_tile + 2 * i, last);
                    scales[i] = absmax((scale_row_start + (size_t)tile * NF4_TILE_COLS) >> blocksize_log2);
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const unsigned offset = min((unsigned)u, last);
                    codes[u] = load_streaming(codes_lane + offset * 32);
                }
                codes_lane += 32 * U;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    // Rows r and r + 8 of tile u were decoded by lanes r + 16 (u % 2) and r + 8 + 16 (u % 2). A tile
                    // past the end of the run (the last one again) is scaled by 0 rather than skipped: behind a
                    // branch the compiler issued its load only after the first tile's products, one load in flight
                    // per warp (SASS, benches/results/h200-2026-12-03.md).
                    const float keep = u <= last ? 1.0f : 0.0f;
                    const float scale0 = keep * __shfl_sync(0xffffffff, scales[u / 2], r + 16 * (u % 2));
                    const float scale8 = keep * __shfl_sync(0xffffffff, scales[u / 2], r + 8 + 16 * (u % 2));
                    const unsigned offset = min((unsigned)u, last);
                    const uint4 x0 = NORMED ? x_lane[offset * 8] : __ldg(x_lane + offset * 8);
                    const uint4 x1 = NORMED ? x_lane[offset * 8 + 1] : __ldg(x_lane + offset * 8 + 1);
                    const uint32_t words[4] = {codes[u].x, codes[u].y, codes[u].z, codes[u].w};
                    const uint32_t xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
                    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    tile_step<T, 0>(c, lane_table, words, xw);
                    tile_step<T, 1>(c, lane_table, words, xw);
                    tile_step<T, 2>(c, lane_table, words, xw);
                    tile_step<T, 3>(c, lane_table, words, xw);
                    acc[0] = fmaf(c[0], scale0, acc[0]);
                    acc[1] = fmaf(c[1], scale0, acc[1]);
                    acc[2] = fmaf(c[2], scale8, acc[2]);
                    acc[3] = fmaf(c[3], scale8, acc[3]);
                }
                x_lane += 8 * U;
            }
        }
        // Lane 4r + j holds rows r and r + 8 (acc 0-1 and 2-3) for x rows 2j and 2j + 1.
        if (split == 1) {
            if (strip < strips) {
                T *const y = group_pick(group.y, w);
                const unsigned rows = group_pick(group.rows, w);
                const size_t row = (size_t)local * NF4_TILE_ROWS + r;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const unsigned b = 2 * j + i % 2;
                    if (b < batch) {
                        y[(size_t)b * rows + row + 8 * (i / 2)] = from_f32<T>(acc[i]);
                    }
                }
            }
            continue;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            partial[warp][lane][i] = acc[i];
        }
        __syncthreads();
        for (unsigned t = threadIdx.x; t < strips_per_block * NF4_TILE_ROWS * batch; t += blockDim.x) {
            const unsigned block_local = t / (NF4_TILE_ROWS * batch), row = t % NF4_TILE_ROWS,
                           b = t / NF4_TILE_ROWS % batch;
            const unsigned src_lane = (row % 8) * 4 + b / 2, slot = (row / 8) * 2 + b % 2;
            if (first + block_local < strips) {
                float sum = 0.0f;
                for (unsigned v = block_local * split; v < (block_local + 1) * split; ++v) {
                    sum += partial[v][src_lane][slot];
                }
                unsigned out_strip;
                const unsigned out = group_locate(group.strips, first + block_local, out_strip);
                group_pick(group.y, out)[(size_t)b * group_pick(group.rows, out) +
                                         (size_t)out_strip * NF4_TILE_ROWS + row] = from_f32<T>(sum);
            }
        }
        __syncthreads();
    }
}

// Warp per output row (grid-stride), any layout, blocksize and dtype.
template <typename T, typename Absmax>
__device__ void gemv_nf4_generic(const uint8_t *__restrict__ packed, unsigned tiled_row_chunks, Absmax absmax,
                                 const T *__restrict__ x, T *__restrict__ y, size_t rows, size_t cols,
                                 unsigned batch, unsigned blocksize_log2) {
    grid_dependency_wait();
    __shared__ float codebook[16];
    const float init[16] = NF4_CODEBOOK_INIT;
    if (threadIdx.x < 16) {
        codebook[threadIdx.x] = init[threadIdx.x];
    }
    __syncthreads();
    const unsigned lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (size_t row = (size_t)blockIdx.x * warps + threadIdx.x / 32; row < rows; row += (size_t)gridDim.x * warps) {
        float acc[GEMV_MAX_BATCH] = {};
        for (size_t col = lane; col < cols; col += 32) {
            const size_t e = row * cols + col;
            const uint8_t byte = __ldg(packed + nf4_packed_offset(e / 2, tiled_row_chunks));
            const float w = __fmul_rn(codebook[e % 2 ? nf4_low(byte) : nf4_high(byte)], absmax(e >> blocksize_log2));
#pragma unroll
            for (unsigned b = 0; b < GEMV_MAX_BATCH; ++b) {
                if (b < batch) {
                    acc[b] = fmaf(w, to_f32(x[b * cols + col]), acc[b]);
                }
            }
        }
#pragma unroll
        for (unsigned b = 0; b < GEMV_MAX_BATCH; ++b) {
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) {
                acc[b] += __shfl_xor_sync(0xffffffff, acc[b], offset);
            }
            if (lane == 0 && b < batch) {
                y[b * rows + row] = from_f32<T>(acc[b]);
            }
        }
    }
}

// The parameters of weight slot I of a group: its codes, its scales (plain or double-quantized), its output and
// output rows; and the Nf4Group made of three slots' parameters.
#define NF4_PLAIN_SLOT_PARAMS(T, I) const uint4 *packed##I, const float *absmax##I, T *y##I, unsigned rows##I
#define NF4_NESTED_SLOT_PARAMS(T, I)                                                                          \
    const uint4 *packed##I, const uint8_t *codes##I, const float *nested_absmax##I, const float *nested_map##I, \
        float offset##I, T *y##I, unsigned rows##I
#define NF4_PLAIN_SLOT(I) PlainAbsmax { absmax##I }
#define NF4_NESTED_SLOT(I) NestedAbsmax { codes##I, nested_absmax##I, nested_map##I, offset##I }
#define NF4_GROUP(T, ABSMAX, SLOT)                                                                            \
    Nf4Group<T, ABSMAX> {                                                                                    \
        {packed0, packed1, packed2}, {SLOT(0), SLOT(1), SLOT(2)}, {y0, y1, y2}, {rows0, rows1, rows2}, {       \
            rows0 / NF4_TILE_ROWS, rows1 / NF4_TILE_ROWS, rows2 / NF4_TILE_ROWS                               \
        }                                                                                                    \
    }

// gemv_nf4_tiled_[nested_][normed_]<suffix>: x from a buffer or normalized by the kernel, times 1 to 3 weights.
#define GEMV_NF4_TILED_KERNEL(NAME, T, ABSMAX, SLOT_PARAMS, SLOT, NORMED, INPUT_PARAMS, INPUT_ARGS)           \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS, GEMV_MIN_BLOCKS)                          \
        NAME(SLOT_PARAMS(T, 0), SLOT_PARAMS(T, 1), SLOT_PARAMS(T, 2), INPUT_PARAMS, unsigned cols,           \
             unsigned batch, unsigned split, unsigned blocksize_log2) {                                      \
        gemv_nf4_tiled<T, ABSMAX, NORMED>(NF4_GROUP(T, ABSMAX, SLOT), INPUT_ARGS, cols, batch, split,        \
                                          blocksize_log2);                                                   \
    }
#define GEMV_X_PARAMS(T) const T *x
#define GEMV_X_ARGS(T) x, NormedInput<T> {}
#define GEMV_NORMED_ARGS(T) nullptr, NORMED_INPUT_ARGS(T)
#define GEMV_NF4_TILED_KERNELS(SUFFIX, T)                                                                     \
    GEMV_NF4_TILED_KERNEL(gemv_nf4_tiled_##SUFFIX, T, PlainAbsmax, NF4_PLAIN_SLOT_PARAMS, NF4_PLAIN_SLOT,     \
                          false, GEMV_X_PARAMS(T), GEMV_X_ARGS(T))                                           \
    GEMV_NF4_TILED_KERNEL(gemv_nf4_tiled_nested_##SUFFIX, T, NestedAbsmax, NF4_NESTED_SLOT_PARAMS,            \
                          NF4_NESTED_SLOT, false, GEMV_X_PARAMS(T), GEMV_X_ARGS(T))                          \
    GEMV_NF4_TILED_KERNEL(gemv_nf4_tiled_normed_##SUFFIX, T, PlainAbsmax, NF4_PLAIN_SLOT_PARAMS,              \
                          NF4_PLAIN_SLOT, true, NORMED_INPUT_PARAMS(T), GEMV_NORMED_ARGS(T))                 \
    GEMV_NF4_TILED_KERNEL(gemv_nf4_tiled_nested_normed_##SUFFIX, T, NestedAbsmax, NF4_NESTED_SLOT_PARAMS,     \
                          NF4_NESTED_SLOT, true, NORMED_INPUT_PARAMS(T), GEMV_NORMED_ARGS(T))

#define GEMV_NF4_GENERIC_KERNELS(SUFFIX, T)                                                                      \
    extern "C" __global__ void gemv_nf4_generic_##SUFFIX(const uint8_t *packed, unsigned tiled_row_chunks,      \
                                                           const float *absmax, const T *x, T *y, size_t rows,  \
                                                           size_t cols, unsigned batch, unsigned blocksize_log2) { \
        gemv_nf4_generic<T>(packed, tiled_row_chunks, PlainAbsmax{absmax}, x, y, rows, cols, batch,             \
                            blocksize_log2);                                                                    \
    }                                                                                                           \
    extern "C" __global__ void gemv_nf4_generic_nested_##SUFFIX(                                                \
        const uint8_t *packed, unsigned tiled_row_chunks, const uint8_t *absmax_codes, const float *nested_absmax, \
        const float *nested_map, float offset, const T *x, T *y, size_t rows, size_t cols, unsigned batch,      \
        unsigned blocksize_log2) {                                                                              \
        gemv_nf4_generic<T>(packed, tiled_row_chunks,                                                           \
                            NestedAbsmax{absmax_codes, nested_absmax, nested_map, offset}, x, y, rows, cols,    \
                            batch, blocksize_log2);                                                             \
    }

GEMV_NF4_TILED_KERNELS(f16, __half)
GEMV_NF4_TILED_KERNELS(bf16, __nv_bfloat16)
GEMV_NF4_GENERIC_KERNELS(f32, float)
GEMV_NF4_GENERIC_KERNELS(f16, __half)
GEMV_NF4_GENERIC_KERNELS(bf16, __nv_bfloat16)
