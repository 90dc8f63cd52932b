// Shared helpers for glm-run's CUDA kernels: the NF4 codebook, bitsandbytes' block layout and its double-quantized
// absmax, the tiled on-device order of packed codes, output conversions.
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

// Per-block absmax stored as plain f32 (bitsandbytes with double quant off). `load` reads what a block stores
// (from DRAM: a kernel can issue it a step ahead), `decode` turns it into the scale (cached lookups only).
struct PlainAbsmax {
    const float *absmax;
    typedef float Stored;
    __device__ __forceinline__ Stored load(size_t block) const { return __ldg(absmax + block); }
    __device__ __forceinline__ float decode(Stored stored, size_t) const { return stored; }
    __device__ __forceinline__ float operator()(size_t block) const { return load(block); }
};

// Per-block absmax double-quantized (bitsandbytes' default): u8 code into the signed dynamic map. Both products
// are rounded separately in f32 (no fused multiply-add), as bitsandbytes and the CPU reference do.
struct NestedAbsmax {
    const uint8_t *codes;
    const float *nested_absmax;
    const float *nested_map;
    float offset;
    typedef uint8_t Stored;
    __device__ __forceinline__ Stored load(size_t block) const { return __ldg(codes + block); }
    __device__ __forceinline__ float decode(Stored code, size_t block) const {
        float scaled = __fmul_rn(__ldg(nested_map + code), __ldg(nested_absmax + block / NF4_NESTED_BLOCKSIZE));
        return __fadd_rn(scaled, offset);
    }
    __device__ __forceinline__ float operator()(size_t block) const { return decode(load(block), block); }
};

// Tiled order of the packed codes of a weight [N, K] (N % 16 == 0, K % 64 == 0), built on upload for the matmul
// kernels. A tile is 16 rows x 64 columns (512 bytes); tiles are stored strip by strip (16 rows), left to right.
// Inside a tile, lane l = 4 r + j (r < 8, j < 4) of a warp owns 16 bytes: bytes 8j..8j+7 of the tile's row r, then
// the same bytes of row r + 8 -- exactly the codes it feeds to mma.m16n8k16 (see gemv_nf4.cu), in one 16-byte
// load. The order moves whole 8-byte chunks, so it is described per chunk.
#define NF4_TILE_ROWS 16
#define NF4_TILE_COLS 64
#define NF4_TILE_BYTES (NF4_TILE_ROWS * NF4_TILE_COLS / 2)

// Where 8-byte chunk q (bitsandbytes' order) of a tiled weight with `row_chunks` chunks per row is stored.
__device__ __forceinline__ size_t nf4_tiled_chunk(size_t q, size_t row_chunks) {
    const size_t row = q / row_chunks, col = q % row_chunks;
    const size_t tile = col / 4, j = col % 4;
    const size_t strip = row / NF4_TILE_ROWS, r = row % 8, half = (row / 8) % 2;
    const size_t tiles_per_row = row_chunks / 4;
    return ((strip * tiles_per_row + tile) * 32 + r * 4 + j) * 2 + half;
}

// Which 8-byte chunk (bitsandbytes' order) is stored at chunk position p of a tiled weight: the inverse of
// nf4_tiled_chunk.
__device__ __forceinline__ size_t nf4_untiled_chunk(size_t p, size_t row_chunks) {
    const size_t half = p % 2, lane = (p / 2) % 32, tile_index = p / 64;
    const size_t tiles_per_row = row_chunks / 4;
    const size_t strip = tile_index / tiles_per_row, tile = tile_index % tiles_per_row;
    const size_t row = strip * NF4_TILE_ROWS + half * 8 + lane / 4;
    return row * row_chunks + tile * 4 + lane % 4;
}

// Where packed byte i (bitsandbytes' order) is stored: tiled_row_chunks is 0 for bitsandbytes' order.
__device__ __forceinline__ size_t nf4_packed_offset(size_t i, unsigned tiled_row_chunks) {
    if (tiled_row_chunks == 0) {
        return i;
    }
    return nf4_tiled_chunk(i / 8, tiled_row_chunks) * 8 + i % 8;
}

// f16/bf16 operands of mma.m16n8k16 (f32 accumulators), for the NF4 matrix kernels (gemv_nf4.cu, gemm_nf4.cu).
template <typename T> struct Mma;

#define NF4_DEFINE_MMA(T, T2, PTX_TYPE, TO_BITS, FROM_F32)                                                     \
    template <> struct Mma<T> {                                                                              \
        /* The operand bits of x, rounded to nearest. */                                                     \
        static __device__ __forceinline__ uint32_t bits(float x) { return TO_BITS(FROM_F32(x)); }             \
        /* Both halves of `pair` times the matching halves of `scale`, rounded to nearest. */                 \
        static __device__ __forceinline__ uint32_t scale(uint32_t pair, uint32_t scale) {                     \
            const T2 product = __hmul2(*reinterpret_cast<const T2 *>(&pair), *reinterpret_cast<const T2 *>(&scale)); \
            return *reinterpret_cast<const uint32_t *>(&product);                                           \
        }                                                                                                    \
        /* c += a · b. */                                                                                    \
        static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { \
            asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE                                \
                ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                               \
                : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                              \
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                              \
        }                                                                                                    \
    };
NF4_DEFINE_MMA(__half, __half2, "f16", __half_as_ushort, __float2half_rn)
NF4_DEFINE_MMA(__nv_bfloat16, __nv_bfloat162, "bf16", __bfloat16_as_ushort, __float2bfloat16_rn)
#undef NF4_DEFINE_MMA

// The NF4 matrix kernels turn packed bytes into mma operands through a shared-memory table: entry b holds the
// codebook values of byte b's two codes as T (the high nibble, the earlier element, in the low half), replicated
// 32 times so that each lane reads its own copy and lookups never conflict on a bank.
#define NF4_CODE_TABLE_WORDS (256 * 32)

// Fills `table` (NF4_CODE_TABLE_WORDS words of shared memory); the caller orders it before use (__syncthreads).
template <typename T> __device__ __forceinline__ void build_code_table(uint32_t *table) {
    __shared__ uint32_t values[16];
    if (threadIdx.x < 16) {
        const float codebook[16] = NF4_CODEBOOK_INIT;
        values[threadIdx.x] = Mma<T>::bits(codebook[threadIdx.x]);
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
        const unsigned byte = i / 8;
        const uint32_t entry = values[nf4_high(byte)] | (values[nf4_low(byte)] << 16);
        reinterpret_cast<uint4 *>(table)[i] = make_uint4(entry, entry, entry, entry);
    }
}

// The table entry of byte BYTE (0..3) of w, from this lane's copy (`lane_table`: the shared-memory address of
// table + lane). Two instructions: a byte permute isolates the byte, a multiply-add addresses it (written in PTX:
// the compiler's own indexing takes four).
template <int BYTE> __device__ __forceinline__ uint32_t table_lookup(uint32_t lane_table, uint32_t w) {
    uint32_t entry;
    asm("{\n\t.reg .b32 byte;\n\t"
        "prmt.b32 byte, %1, 0, %3;\n\t"
        "mad.lo.u32 byte, byte, 128, %2;\n\t"
        "ld.shared.b32 %0, [byte];\n\t}"
        : "=r"(entry)
        : "r"(w), "r"(lane_table), "n"(0x4440 + BYTE));
    return entry;
}

// A GEMV launch multiplies x by up to GEMV_GROUP weights of one input width (GLM's q, k and v: one launch, and one
// norm per block when the GEMV normalizes x itself, instead of two launches). Their outputs (rows, or 16-row strips
// for NF4) are numbered one weight after the other; a weight of count 0 is an unused slot.
#define GEMV_GROUP 3

// The weight that output `i` belongs to (counts: outputs per weight), and `i`'s index within it.
__device__ __forceinline__ unsigned group_locate(const unsigned (&counts)[GEMV_GROUP], unsigned i, unsigned &local) {
    unsigned t = 0;
    local = i;
#pragma unroll
    for (unsigned w = 0; w + 1 < GEMV_GROUP; ++w) {
        if (t == w && local >= counts[w]) {
            local -= counts[w];
            t = w + 1;
        }
    }
    return t;
}

// v[t] by selects, so that arrays of kernel parameters stay in registers (an indexed load would spill them).
template <typename V> __device__ __forceinline__ V group_pick(const V (&v)[GEMV_GROUP], unsigned t) {
    V picked = v[0];
#pragma unroll
    for (unsigned w = 1; w < GEMV_GROUP; ++w) {
        if (t == w) picked = v[w];
    }
    return picked;
}

// Round-to-nearest-even conversions from the f32 result, as `half::f16::from_f32` / `bf16::from_f32` do.
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Exact widening to f32.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// 16 bytes of weights, which a GEMV reads once: kept out of L1, which holds x.
__device__ __forceinline__ uint4 load_streaming(const uint4 *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Programmatic dependent launch (sm_90): a kernel launched with the programmatic-serialization attribute may start
// while the kernel before it in the stream still runs (the decode step launches so, kernels/src/launch.rs), so that
// its launch and whatever it does first (weight prefetches) overlap that kernel's tail. It must read and write
// nothing another kernel writes, nor write anything another kernel reads, before this returns: the wait returns
// once the previous kernel has completed and its writes are visible, and that kernel waited for the one before
// it. Then the next kernel may start. Launched plainly, both instructions are no-ops.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Asks L2 to fetch `bytes` (a multiple of 16) of read-only data at 16-byte aligned `p` (weights), without
// registers or L1: a kernel issues it before grid_dependency_wait so that the fetch overlaps the previous kernel.
__device__ __forceinline__ void prefetch_l2(const void *p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// T(T(x · inv) · w): RmsNorm's two roundings (norm.cu, and the GEMVs that normalize their input).
template <typename T> __device__ __forceinline__ T scale_row_value(float x, float inv, T w) {
    return from_f32<T>(to_f32(from_f32<T>(x * inv)) * to_f32(w));
}

// 16 bytes of a row of T.
template <typename T> union Chunk {
    uint4 raw;
    T values[16 / sizeof(T)];
};

// The input rows of a GEMV that normalizes them itself (the decode step's RMSNorms fused into the projection after
// them): x = RmsNorm(residual + added) · weight, where added is delta, RmsNorm(delta) · delta_weight (GLM-4-0414's
// norm of the sublayer output) or nothing (delta null). Every block computes all rows of x into its shared memory,
// which saves a launch and a single-block kernel's latency between two GEMVs (benches/results/decode-overhead.md);
// block 0 also writes the sum to residual_out (another buffer than residual, which the other blocks still read)
// and, unless null, x to normed_out. Rounding as norm.cu's residual_rms_norm.
template <typename T> struct NormedInput {
    const T *residual;
    const T *delta;
    const T *delta_weight;
    const T *weight;
    T *residual_out;
    T *normed_out;
    float eps;
};

// A kernel's NormedInput<T> parameters, in order, and the struct made of them.
#define NORMED_INPUT_PARAMS(T)                                                                               \
    const T *residual, const T *delta, const T *delta_weight, const T *norm_weight, T *residual_out,         \
        T *normed_out, float eps
#define NORMED_INPUT_ARGS(T)                                                                                 \
    NormedInput<T> { residual, delta, delta_weight, norm_weight, residual_out, normed_out, eps }

// 16-byte chunks of a row a thread loads before using any.
#define NORMED_CHUNKS_IN_FLIGHT 2

// Sum of one float per thread over warps [first_warp, first_warp + warps) of the block, added in a fixed order, so
// that every block computes the same x. All threads of the block call it.
__device__ __forceinline__ float group_sum(float v, unsigned first_warp, unsigned warps) {
    __shared__ float partial[32];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    __syncthreads(); // `partial` may still be read from a previous call
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
    for (unsigned w = first_warp; w < first_warp + warps; ++w) total += partial[w];
    return total;
}

// Chunks c = base + i * stride (i < NORMED_CHUNKS_IN_FLIGHT, c < count) of `src` into `dst`, all loads first.
template <typename T>
__device__ __forceinline__ void load_chunks(Chunk<T> (&dst)[NORMED_CHUNKS_IN_FLIGHT], const T *src, unsigned base,
                                            unsigned stride, unsigned count) {
#pragma unroll
    for (int i = 0; i < NORMED_CHUNKS_IN_FLIGHT; ++i) {
        const unsigned c = base + i * stride;
        dst[i].raw = c < count ? reinterpret_cast<const uint4 *>(src)[c] : make_uint4(0, 0, 0, 0);
    }
}

// Writes x [batch, dim] (dim a multiple of 16 / sizeof(T)) to `xs` in shared memory; a group of
// blockDim.x / 32 / batch warps handles each row. Call after grid_dependency_wait; ends with a barrier.
template <typename T>
__device__ void normalize_input_rows(const NormedInput<T> &in, T *xs, unsigned dim, unsigned batch) {
    constexpr unsigned VEC = 16 / sizeof(T), N = NORMED_CHUNKS_IN_FLIGHT;
    const unsigned warps = blockDim.x / 32 / batch, warp = threadIdx.x / 32;
    const unsigned b = min(warp / warps, batch - 1), first_warp = b * warps;
    // Warps past the last group take part in the barriers with nothing to do.
    const unsigned count = warp < batch * warps ? dim / VEC : 0;
    const unsigned first = threadIdx.x - first_warp * 32, stride = warps * 32;
    const size_t row = (size_t)b * dim;
    uint4 *x = reinterpret_cast<uint4 *>(xs + row);
    const bool writer = blockIdx.x == 0;
    // A delta norm without a delta adds nothing.
    const T *const delta_weight = in.delta != nullptr ? in.delta_weight : nullptr;

    float delta_inv = 0.0f;
    if (delta_weight != nullptr) {
        float sq = 0.0f;
        for (unsigned base = first; base < count; base += N * stride) {
            Chunk<T> d[N];
            load_chunks(d, in.delta + row, base, stride, count);
#pragma unroll
            for (unsigned i = 0; i < N; ++i)
#pragma unroll
                for (unsigned e = 0; e < VEC; ++e) sq += to_f32(d[i].values[e]) * to_f32(d[i].values[e]);
        }
        delta_inv = 1.0f / sqrtf(group_sum(sq, first_warp, warps) / (float)dim + in.eps);
    }
    float sq = 0.0f;
    for (unsigned base = first; base < count; base += N * stride) {
        Chunk<T> r[N], d[N], dw[N];
        load_chunks(r, in.residual + row, base, stride, count);
        if (in.delta != nullptr) load_chunks(d, in.delta + row, base, stride, count);
        if (delta_weight != nullptr) load_chunks(dw, delta_weight, base, stride, count);
#pragma unroll
        for (unsigned i = 0; i < N; ++i) {
            const unsigned c = base + i * stride;
            if (c >= count) break;
#pragma unroll
            for (unsigned e = 0; e < VEC; ++e) {
                const float added = in.delta == nullptr ? 0.0f
                                    : delta_weight != nullptr
                                        ? to_f32(scale_row_value(to_f32(d[i].values[e]), delta_inv, dw[i].values[e]))
                                        : to_f32(d[i].values[e]);
                r[i].values[e] = from_f32<T>(to_f32(r[i].values[e]) + added);
                sq += to_f32(r[i].values[e]) * to_f32(r[i].values[e]);
            }
            x[c] = r[i].raw;
            if (writer && in.residual_out != nullptr) reinterpret_cast<uint4 *>(in.residual_out + row)[c] = r[i].raw;
        }
    }
    const float inv = 1.0f / sqrtf(group_sum(sq, first_warp, warps) / (float)dim + in.eps);
    // Each thread reads back only the chunks it wrote.
    for (unsigned base = first; base < count; base += N * stride) {
        Chunk<T> w[N];
        load_chunks(w, in.weight, base, stride, count);
#pragma unroll
        for (unsigned i = 0; i < N; ++i) {
            const unsigned c = base + i * stride;
            if (c >= count) break;
            Chunk<T> s;
            s.raw = x[c];
#pragma unroll
            for (unsigned e = 0; e < VEC; ++e) s.values[e] = scale_row_value(to_f32(s.values[e]), inv, w[i].values[e]);
            x[c] = s.raw;
            if (writer && in.normed_out != nullptr) reinterpret_cast<uint4 *>(in.normed_out + row)[c] = s.raw;
        }
    }
    __syncthreads();
}

// Sum of one float per thread over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) { return group_sum(v, 0, blockDim.x / 32); }
