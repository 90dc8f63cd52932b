// NF4 matrix products for prefill: y = x · Wᵀ for many rows of x (tokens), W [N, K] in NF4 in the tiled order of
// common.cuh (N % 16 == 0, K % 64 == 0, blocksize >= 64), x and y f16/bf16, f32 accumulation. CPU reference:
// crates/nf4's dequantize_f32 followed by an f64 product; GPU test: kernels/tests/gpu_kernels/gemm.rs.
//
// mma.m16n8k16 with W as the A operand (16 rows x 16 columns) and 8 tokens of x as the 8 columns of B. A warp owns
// STRIPS strips (16 rows each) of a block's rows and all of the block's 8 * GROUPS tokens: it turns each 16 x 64
// tile of its strips into A fragments in registers once (one 16-byte word of codes per lane, a byte -> pair of
// codebook values table in shared memory, replicated per lane so lookups never conflict on a bank) and multiplies
// them with every group of 8 tokens, so a weight is decoded once per block. The columns inside a tile are permuted
// as in the tiled order (lane 4r + j holds columns 16j..16j+15 of rows r and r + 8), identically for x, which
// leaves every dot product unchanged. A tile row lies inside one absmax block: its scale is decoded once per tile
// (in f32) and multiplies the decoded codebook pairs in the operand type, so W enters the mma rounded to f16/bf16
// as dequantize + cuBLAS has it, and each (strip, token group) accumulates straight into its f32 accumulators.
// Scaling each tile's f32 mma results instead, as the GEMV does, needs a fresh accumulator per tile (four
// dependent mma a tile, or 64 more registers a lane); it measured no faster on the H100 (542 vs 528 µs for
// gate_up at 512 tokens), with relative errors 3.5e-4 (f16) and 2.9e-3 (bf16) against 5.9e-4 and 3.6e-3 here.
//
// The block's W tiles and x tiles go through a GEMM_STAGES-deep cp.async pipeline in shared memory; x rows are
// stored with their 16-byte chunks XOR-swizzled by token so that the lanes' 16-byte reads do not conflict. Token
// rows past the end load the last row again (their outputs are not stored), strips past the end the last strip.
#include "common.cuh"

// Warps per block, all along W's rows: every warp reads all of the block's tokens.
#define GEMM_WARPS 8
// Tiles (64 columns of K) in flight in shared memory.
#define GEMM_STAGES 4
static_assert(GEMM_STAGES >= 3, "a tile is decoded one iteration before its mma");

__device__ __forceinline__ void gemm_cp_async16(void *shared, const void *global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((uint32_t)__cvta_generic_to_shared(shared)),
                 "l"(global)
                 : "memory");
}

__device__ __forceinline__ void gemm_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int PENDING> __device__ __forceinline__ void gemm_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// Dynamic shared memory a launch of this configuration needs (the host computes the same in kernels/src/gemm.rs).
template <int STRIPS, int GROUPS> constexpr unsigned gemm_shared_bytes() {
    return 4 * NF4_CODE_TABLE_WORDS + GEMM_STAGES * (GEMM_WARPS * STRIPS * NF4_TILE_BYTES + GROUPS * 8 * 2 * NF4_TILE_COLS);
}

// Block (blockIdx.x, blockIdx.y): tokens 8 * GROUPS * blockIdx.x.., strips GEMM_WARPS * STRIPS * blockIdx.y..
template <typename T, int STRIPS, int GROUPS, typename Absmax>
__device__ void gemm_nf4(const uint4 *__restrict__ packed, Absmax absmax, const T *__restrict__ x,
                         T *__restrict__ y, unsigned tokens, unsigned rows, unsigned cols, unsigned blocksize_log2) {
    static_assert(STRIPS * NF4_TILE_ROWS <= 32, "a lane decodes at most one scale per tile");
    constexpr int BLOCK_STRIPS = GEMM_WARPS * STRIPS, BLOCK_TOKENS = 8 * GROUPS;
    // x tile: 64 columns = 8 chunks of 16 bytes per token.
    constexpr int X_CHUNKS = BLOCK_TOKENS * 8, W_CHUNKS = BLOCK_STRIPS * 32;
    extern __shared__ __align__(16) uint32_t shared[];
    uint32_t *table = shared;
    uint4 *w_stages = reinterpret_cast<uint4 *>(shared + NF4_CODE_TABLE_WORDS);
    uint4 *x_stages = w_stages + GEMM_STAGES * W_CHUNKS;

    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned tiles = cols / NF4_TILE_COLS, strips = rows / NF4_TILE_ROWS;
    const unsigned token0 = blockIdx.x * BLOCK_TOKENS, strip0 = blockIdx.y * BLOCK_STRIPS;

    // Stage s of tile t: W tiles of the block's strips, then x columns 64t..64t+63 of its tokens.
    auto load_tile = [&](unsigned t, unsigned stage) {
        if (t < tiles) {
            for (unsigned c = threadIdx.x; c < W_CHUNKS; c += blockDim.x) {
                const unsigned strip = min(strip0 + c / 32, strips - 1);
                gemm_cp_async16(w_stages + stage * W_CHUNKS + c, packed + ((size_t)strip * tiles + t) * 32 + c % 32);
            }
            for (unsigned c = threadIdx.x; c < X_CHUNKS; c += blockDim.x) {
                const unsigned token = c / 8, chunk = c % 8;
                const T *src = x + (size_t)min(token0 + token, tokens - 1) * cols + (size_t)t * NF4_TILE_COLS + 8 * chunk;
                gemm_cp_async16(x_stages + stage * X_CHUNKS + token * 8 + (chunk ^ (token % 8)), src);
            }
        }
        // Empty groups past the end keep the group count (and so the wait below) uniform.
        gemm_cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; ++s) {
        load_tile(s, s);
    }

    build_code_table<T>(table);
    // (The first barrier of the main loop orders the table before its use.)

    const uint32_t lane_table = (uint32_t)__cvta_generic_to_shared(table + lane);
    const unsigned r = lane / 4, j = lane % 4;
    // Scales: lane λ decodes row λ % (16 STRIPS) of the warp's rows: what a block stores is loaded two tiles ahead
    // (from DRAM), decoded one tile ahead (cached lookups), so neither wait stalls the tile in progress.
    const unsigned scale_strip = min(strip0 + warp * STRIPS + (lane / 16) % STRIPS, strips - 1);
    const size_t scale_row_start = ((size_t)scale_strip * NF4_TILE_ROWS + lane % 16) * cols;
    auto block_of = [&](unsigned t) {
        return (scale_row_start + (size_t)min(t, tiles - 1) * NF4_TILE_COLS) >> blocksize_log2;
    };

    // a[s][k]: A fragment of k-step k (columns 16j + 4k..16j + 4k + 3) of strip s of the tile in `stage`: bytes
    // 2k, 2k + 1 of the lane's 8 bytes of row r (words 0-1, scaled by row r's absmax) and of row r + 8 (words 2-3).
    auto decode_tile = [&](unsigned stage, float scale, uint32_t (&a)[STRIPS][4][4]) {
        const uint4 *w_tile = w_stages + stage * W_CHUNKS + warp * STRIPS * 32 + lane;
#pragma unroll
        for (int s = 0; s < STRIPS; ++s) {
            const uint4 q = w_tile[s * 32];
            const uint32_t words[4] = {q.x, q.y, q.z, q.w};
            const uint32_t bits0 = Mma<T>::bits(__shfl_sync(0xffffffff, scale, 16 * s + r));
            const uint32_t bits8 = Mma<T>::bits(__shfl_sync(0xffffffff, scale, 16 * s + r + 8));
            const uint32_t scale0 = bits0 | (bits0 << 16), scale8 = bits8 | (bits8 << 16);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                // Bytes 2 (k % 2) and 2 (k % 2) + 1 (constants once unrolled).
                const uint32_t w0 = words[k / 2], w8 = words[2 + k / 2];
                const bool odd = k % 2;
                a[s][k][0] = Mma<T>::scale(odd ? table_lookup<2>(lane_table, w0) : table_lookup<0>(lane_table, w0), scale0);
                a[s][k][1] = Mma<T>::scale(odd ? table_lookup<2>(lane_table, w8) : table_lookup<0>(lane_table, w8), scale8);
                a[s][k][2] = Mma<T>::scale(odd ? table_lookup<3>(lane_table, w0) : table_lookup<1>(lane_table, w0), scale0);
                a[s][k][3] = Mma<T>::scale(odd ? table_lookup<3>(lane_table, w8) : table_lookup<1>(lane_table, w8), scale8);
            }
        }
    };

    float acc[STRIPS][GROUPS][4];
#pragma unroll
    for (int s = 0; s < STRIPS; ++s)
#pragma unroll
        for (int g = 0; g < GROUPS; ++g)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[s][g][i] = 0.0f;

    // Tile 0 decoded before the loop; iteration t decodes tile t + 1 while it multiplies tile t, so the lookups'
    // latency overlaps the mma of the other tile.
    uint32_t a[STRIPS][4][4];
    gemm_cp_async_wait<GEMM_STAGES - 2>();
    __syncthreads(); // also orders the table
    decode_tile(0, absmax(block_of(0)), a);
    float next_scale = absmax(block_of(1));
    typename Absmax::Stored stored1 = absmax.load(block_of(2)), stored2 = absmax.load(block_of(3));

    for (unsigned t = 0; t < tiles; ++t) {
        const float scale = next_scale;
        next_scale = absmax.decode(stored1, block_of(t + 2));
        stored1 = stored2;
        stored2 = absmax.load(block_of(t + 4));

        // Tiles up to t + 1 have landed (GEMM_STAGES - 1 + t groups committed).
        gemm_cp_async_wait<GEMM_STAGES - 3>();
        __syncthreads();
        // The stage it overwrites held tile t - 1, whose x was last read in iteration t - 1 and its codes in
        // iteration t - 2, which every warp has finished.
        load_tile(t + GEMM_STAGES - 1, (t + GEMM_STAGES - 1) % GEMM_STAGES);

        // Past the last tile this decodes a stale stage, unused.
        uint32_t a_next[STRIPS][4][4];
        decode_tile((t + 1) % GEMM_STAGES, scale, a_next);

        const uint4 *x_tile = x_stages + (t % GEMM_STAGES) * X_CHUNKS;
        // Half h of the tile (k-steps 2h, 2h + 1) of token 8g + r is its chunk 2j + h (columns 16j + 8h..), stored
        // swizzled by token % 8 = r. Every mma of a k-step is independent of the others, so they overlap.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint4 b[GROUPS];
#pragma unroll
            for (int g = 0; g < GROUPS; ++g) {
                b[g] = x_tile[(8 * g + r) * 8 + ((2 * j + h) ^ r)];
            }
#pragma unroll
            for (int k = 2 * h; k < 2 * h + 2; ++k) {
#pragma unroll
                for (int s = 0; s < STRIPS; ++s) {
#pragma unroll
                    for (int g = 0; g < GROUPS; ++g) {
                        Mma<T>::run(acc[s][g], a[s][k], k % 2 ? b[g].z : b[g].x, k % 2 ? b[g].w : b[g].y);
                    }
                }
            }
        }
#pragma unroll
        for (int s = 0; s < STRIPS; ++s)
#pragma unroll
            for (int k = 0; k < 4; ++k)
#pragma unroll
                for (int i = 0; i < 4; ++i) a[s][k][i] = a_next[s][k][i];
    }
    gemm_cp_async_wait<0>();

    // Lane 4r + j holds rows r (acc 0-1) and r + 8 (acc 2-3) of each strip for tokens 2j and 2j + 1 of each group.
#pragma unroll
    for (int s = 0; s < STRIPS; ++s) {
        const unsigned strip = strip0 + warp * STRIPS + s;
        if (strip >= strips) {
            continue;
        }
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const unsigned token = token0 + 8 * g + 2 * j + i % 2;
                if (token < tokens) {
                    y[(size_t)token * rows + strip * NF4_TILE_ROWS + r + 8 * (i / 2)] = from_f32<T>(acc[s][g][i]);
                }
            }
        }
    }
}

// Blocks per SM a configuration is compiled for: 2x8 holds 64 accumulators and two tiles' A fragments a lane
// (168 registers: one block); 1x2 fits two blocks or more (64 registers).
#define GEMM_MIN_BLOCKS(STRIPS, GROUPS) ((STRIPS) * (GROUPS) >= 8 ? 1 : 2)

// gemm_nf4_[nested_]<dtype>_<strips>x<groups>: blocks of 128 * strips rows x 8 * groups tokens.
#define GEMM_NF4_KERNELS(SUFFIX, T, STRIPS, GROUPS)                                                            \
    extern "C" __global__ void __launch_bounds__(32 * GEMM_WARPS, GEMM_MIN_BLOCKS(STRIPS, GROUPS))                                           \
        gemm_nf4_##SUFFIX##_##STRIPS##x##GROUPS(const uint4 *packed, const float *absmax, const T *x, T *y,   \
                                                 unsigned tokens, unsigned rows, unsigned cols,              \
                                                 unsigned blocksize_log2) {                                  \
        gemm_nf4<T, STRIPS, GROUPS>(packed, PlainAbsmax{absmax}, x, y, tokens, rows, cols, blocksize_log2);  \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * GEMM_WARPS, GEMM_MIN_BLOCKS(STRIPS, GROUPS))                                           \
        gemm_nf4_nested_##SUFFIX##_##STRIPS##x##GROUPS(                                                        \
            const uint4 *packed, const uint8_t *absmax_codes, const float *nested_absmax,                      \
            const float *nested_map, float offset, const T *x, T *y, unsigned tokens, unsigned rows,           \
            unsigned cols, unsigned blocksize_log2) {                                                          \
        gemm_nf4<T, STRIPS, GROUPS>(packed, NestedAbsmax{absmax_codes, nested_absmax, nested_map, offset}, x,  \
                                    y, tokens, rows, cols, blocksize_log2);                                    \
    }

#define GEMM_NF4_CONFIGS(STRIPS, GROUPS)                                                                       \
    GEMM_NF4_KERNELS(f16, __half, STRIPS, GROUPS)                                                              \
    GEMM_NF4_KERNELS(bf16, __nv_bfloat16, STRIPS, GROUPS)

GEMM_NF4_CONFIGS(1, 2)
GEMM_NF4_CONFIGS(2, 8)
