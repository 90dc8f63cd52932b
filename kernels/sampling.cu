// Sampling on the GPU: one token per row of logits, chosen exactly as crates/glm's Sampler::sample chooses it for
// the same uniform number u (repetition penalty over a mask of seen tokens, temperature, top-k keeping ties, top-p,
// then the categorical draw in index order), written where the next step's embedding lookup reads it; the seen
// mask gains the token and the shared position advances by one (the end of the decode step, as argmax.cu). A row
// whose logits hold NaN or +inf, or only -inf, yields 0xffffffff, which the host reports.
// CPU reference: crates/glm's Sampler (SamplingConfig::process_logits + Sampler::sample); GPU test:
// crates/glm/tests/gpu_sampling.rs.
//
// Layout: a cluster of SAMPLE_CLUSTER blocks per row (sm_90 thread block clusters: co-scheduled, with a hardware
// barrier and each other's shared memory), each block owning a contiguous slice of the row. A row takes 3 to 12
// dependent passes over its scores (each radix pass is one): one block per row would read the whole row from L2
// every time (argmax alone measured 39 µs so); here each block reads its eighth, which stays in L1 between passes
// (the slice's scores and exps, 8 bytes a token, in the scratch), and a pass ends in cluster barriers, not launches.
// Phases:
//   1. scores = logits with the penalty and the temperature (f32, as the host), kept in scratch; maximum, flags.
//   2. top-k: radix select (3 passes of 11/11/10 bits over the order-preserving key, token counts) for the k-th
//      highest score; tokens scoring below it are removed (ties stay).
//   3. e = expf(score - max) for the remaining finite scores (a port of glibc's expf, which Rust's f32::exp calls
//      on Linux, bit-identical to glibc 2.36's on every f32), kept in scratch; their f64 sum.
//   4. top-p: the host removes tokens in ascending (score, index) order while the cumulative probability, as f32,
//      is <= 1 - top_p, and keeps the rest. A radix select over the key with probability mass histograms finds
//      the score where the cumulative mass first passes the threshold; where that score is tied, the host removes
//      the first of the tied tokens by index, and a radix select over the index finds the first it keeps. Masses
//      are integers (p * 2^62 truncated: exact sums, whatever the order of the atomics); the launcher turns the f32
//      comparison into the least mass that passes it (`need`).
//   5. the draw, over the probabilities of the kept tokens: each block's slice in segments (a warp adds up each),
//      the block and then the segment where u * total falls, and one warp walks that segment with prefix sums to
//      the first token whose cumulative sum exceeds it (as the host; its last positive token if none does).
// Each radix pass: every block histograms its slice in shared memory; block r adds up buckets 256r..256r+255 over
// the cluster (distributed shared memory) and publishes their total; every block then finds the bucket from the
// chunk totals and the one chunk (cluster_pick). Two cluster barriers, no atomics across blocks.
// The f64 sums are added in a fixed order (deterministic: the same launch gives the same tokens), not the host's
// sequential one: the choice can differ from the host's only where the target or the top-p threshold falls within
// rounding of a cumulative sum.
#include "common.cuh"

#include <cooperative_groups.h>

namespace cg = cooperative_groups;

#define SAMPLE_CLUSTER 8
#define SAMPLE_THREADS 512
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
// Radix passes: bits 31..21, 20..10, 9..0 of a 32-bit key.
#define RADIX_BUCKETS 2048
#define RADIX_PASSES 3
// Each block of the cluster adds up one chunk of the histogram's buckets over the cluster.
#define CHUNK_BUCKETS (RADIX_BUCKETS / SAMPLE_CLUSTER)
// The draw splits a block's slice into at most this many segments (4 per lane of a warp).
#define MAX_SEGMENTS 128
#define NO_TOKEN 0xffffffffu
#define FULL_MASK 0xffffffffu
// Fixed-point probability mass: p * 2^62 truncated (kernels/src/sampling.rs MASS_SCALE).
#define MASS_SCALE 0x1p62

// Row flags of phase 1.
#define FLAG_BAD 1u       // a logit is NaN or +inf
#define FLAG_CANDIDATE 2u // a logit is above -inf

// glibc's expf (sysdeps/ieee754/flt-32/e_expf.c, its FMA build): 2^(k/32) from a table times a cubic in the
// remainder, in f64, rounded once to f32. Checked bit for bit against glibc 2.36's expf on every f32.
__device__ __constant__ unsigned long long EXPF_TABLE[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b,
    0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715, 0x3feef1a7373aa9cb,
    0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
    0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d, 0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
};

__device__ __forceinline__ float glibc_expf(float x) {
    const unsigned bits = __float_as_uint(x), abstop = (bits >> 20) & 0x7ff;
    if (abstop >= (__float_as_uint(88.0f) >> 20)) {
        if (bits == __float_as_uint(-INFINITY)) return 0.0f;
        if (abstop >= (__float_as_uint(INFINITY) >> 20)) return x + x;
        if (x > 0x1.62e42ep6f) return INFINITY;
        if (x < -0x1.9fe368p6f) return 0.0f;
    }
    const double inv_ln2_n = 0x1.71547652b82fep+0 * 32, shift = 0x1.8p+52;
    const double c0 = 0x1.c6af84b912394p-5 / (32.0 * 32.0 * 32.0), c1 = 0x1.ebfce50fac4f3p-3 / (32.0 * 32.0),
                 c2 = 0x1.62e42ff0c52d6p-1 / 32.0;
    const double xd = x;
    double kd = __dadd_rn(__dmul_rn(inv_ln2_n, xd), shift);
    const unsigned long long ki = (unsigned long long)__double_as_longlong(kd);
    kd = __dsub_rn(kd, shift);
    const double r = __fma_rn(inv_ln2_n, xd, -kd);
    const double s = __longlong_as_double((long long)(EXPF_TABLE[ki % 32] + (ki << 47)));
    const double y = __fma_rn(__fma_rn(c0, r, c1), __dmul_rn(r, r), __fma_rn(c2, r, 1.0));
    return __double2float_rn(__dmul_rn(y, s));
}

// The f32 bits mapped to an unsigned order (f32::total_cmp's, as crates/glm's top-p sort keys), and back.
__device__ __forceinline__ unsigned order_key(float s) {
    const unsigned bits = __float_as_uint(s);
    return bits >> 31 ? ~bits : bits | 0x80000000u;
}
__device__ __forceinline__ float key_score(unsigned key) {
    return __uint_as_float(key >> 31 ? key & 0x7fffffffu : ~key);
}
// (key, index): the host's ascending (score, index) order of top-p as one integer.
__device__ __forceinline__ unsigned long long composite(unsigned key, unsigned index) {
    return (unsigned long long)key << 32 | index;
}

// f64(f32(e / sum)): a probability as the host's softmax rounds it.
__device__ __forceinline__ double probability(float e, double sum) {
    return (double)__double2float_rn(__ddiv_rn((double)e, sum));
}
__device__ __forceinline__ unsigned long long fixed_mass(double p) { return __double2ull_rz(__dmul_rn(p, MASS_SCALE)); }

// What a radix pass picked: the bucket where the running total reaches the target, and the total below it.
struct Pick {
    unsigned digit;
    unsigned long long below;
    bool found;
};

struct SampleShared {
    // This block's histogram of the current radix pass; the cluster's totals of this block's chunk of it; every
    // chunk's total over the cluster (entry r written by block r).
    unsigned long long hist[RADIX_BUCKETS];
    unsigned long long chunk[CHUNK_BUCKETS];
    unsigned long long chunk_warp[CHUNK_BUCKETS / 32];
    unsigned long long chunk_total[SAMPLE_CLUSTER];
    Pick pick;
    // What this block found in its slice, read by the whole cluster. Phase 1: FLAG_*, the largest key, the first
    // index whose score is +inf, the largest composite of a finite score. Then Σ e over the top-p candidates and
    // over the kept tokens, the total of the kept probabilities, 1 + the last index of a positive one (0: none).
    unsigned flags, max_key, first_inf;
    unsigned long long max_composite;
    double sum_candidates, sum_kept, total;
    unsigned last_positive;
    // Scratch of the block reductions, and results thread 0 works out for the block.
    double warp_partial[SAMPLE_WARPS];
    double broadcast;
    double segment_total[MAX_SEGMENTS];
    // Phase 1 over the row: the largest key, the composite of the token top-p always keeps, and whether the
    // token is already `decided` (no probabilities to draw from).
    unsigned row_max_key;
    unsigned long long row_last_candidate;
    bool decided;
    unsigned decision;
    // The draw: the block whose slice holds the target (NO_TOKEN: none, take `decision`), the cumulative sum
    // before that slice, the target.
    unsigned walker;
    double walk_start, target;
    // Block 0: the row's token, written by the thread that chose it.
    unsigned result;
};

// Sum of a u64 over a warp (exact, so any order will do).
__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// Sum of one f64 per thread in a fixed order (a tree per warp, then the warps in order); thread 0 gets it.
__device__ double block_sum_f64(SampleShared &sh, double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    __syncthreads(); // warp_partial may still be read from a previous call
    if (threadIdx.x % 32 == 0) sh.warp_partial[threadIdx.x / 32] = v;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0) {
        for (unsigned w = 0; w < SAMPLE_WARPS; ++w) total += sh.warp_partial[w];
    }
    return total;
}

// The sum over the cluster (in rank order) of each block's `slot`, which thread 0 has written; in every thread.
__device__ double cluster_sum(SampleShared &sh, const cg::cluster_group &cluster, double *slot) {
    cluster.sync();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (unsigned r = 0; r < SAMPLE_CLUSTER; ++r) total += *cluster.map_shared_rank(slot, r);
        sh.broadcast = total;
    }
    __syncthreads();
    return sh.broadcast;
}

// The bucket at which the running total of the cluster's histograms (in increasing bucket order, starting from
// `base` < `need`) first reaches `need`, and the total before it; not found if the histograms fall short. Every
// block calls it once its `hist` is complete, and all get the same pick.
__device__ Pick cluster_pick(SampleShared &sh, const cg::cluster_group &cluster, unsigned long long base,
                             unsigned long long need) {
    const unsigned rank = cluster.block_rank(), lane = threadIdx.x % 32;
    cluster.sync(); // every histogram is complete
    if (threadIdx.x < CHUNK_BUCKETS) {
        const unsigned b = rank * CHUNK_BUCKETS + threadIdx.x;
        unsigned long long total = 0;
        for (unsigned r = 0; r < SAMPLE_CLUSTER; ++r) total += cluster.map_shared_rank(sh.hist, r)[b];
        sh.chunk[threadIdx.x] = total;
        total = warp_sum_u64(total);
        if (lane == 0) sh.chunk_warp[threadIdx.x / 32] = total;
    }
    __syncthreads();
    if (threadIdx.x < SAMPLE_CLUSTER) {
        unsigned long long total = 0;
        for (unsigned w = 0; w < CHUNK_BUCKETS / 32; ++w) total += sh.chunk_warp[w];
        cluster.map_shared_rank(sh.chunk_total, threadIdx.x)[rank] = total;
    }
    cluster.sync(); // every chunk total is in every block; no one reads `hist` any more
    if (threadIdx.x < 32) {
        Pick pick = {0, base, false};
        unsigned c = 0;
        for (; c < SAMPLE_CLUSTER && pick.below + sh.chunk_total[c] < need; ++c) pick.below += sh.chunk_total[c];
        if (c < SAMPLE_CLUSTER) {
            // Chunk c holds it: each lane takes 8 consecutive buckets of it.
            constexpr unsigned PER_LANE = CHUNK_BUCKETS / 32;
            const unsigned long long *chunk = cluster.map_shared_rank(sh.chunk, c);
            unsigned long long v[PER_LANE], own = 0;
#pragma unroll
            for (unsigned k = 0; k < PER_LANE; ++k) {
                v[k] = chunk[lane * PER_LANE + k];
                own += v[k];
            }
            unsigned long long inclusive = own;
#pragma unroll
            for (unsigned offset = 1; offset < 32; offset *= 2) {
                const unsigned long long other = __shfl_up_sync(FULL_MASK, inclusive, offset);
                if (lane >= offset) inclusive += other;
            }
            unsigned long long run = pick.below + (inclusive - own);
            const bool mine = run < need && need <= run + own;
            const unsigned holder = __ffs(__ballot_sync(FULL_MASK, mine)) - 1;
            unsigned digit = 0;
            if (mine) {
                for (unsigned k = 0; k < PER_LANE; ++k) {
                    if (run + v[k] >= need) {
                        digit = c * CHUNK_BUCKETS + lane * PER_LANE + k;
                        break;
                    }
                    run += v[k];
                }
            }
            pick.digit = __shfl_sync(FULL_MASK, digit, holder);
            pick.below = __shfl_sync(FULL_MASK, run, holder);
            pick.found = true;
        }
        if (lane == 0) sh.pick = pick;
    }
    __syncthreads();
    return sh.pick;
}

// Radix select over this row: the 32-bit key at which the running total of `weight` (over the elements `keyed`
// says take part, in increasing key order, from `base`) first reaches `need`; `pick.below` is the total of the
// keys below it. Passes before `first_pass` are skipped (every key is known to be 0 in their bits). Not found if
// the whole row falls short (only possible in the first pass). `keyed(i, key)` returns whether element i takes
// part and its key; `weight(i)` its weight, for the elements whose key matches the digits chosen so far.
template <typename Keyed, typename Weight>
__device__ Pick radix_select(SampleShared &sh, const cg::cluster_group &cluster, unsigned lo, unsigned hi,
                             unsigned first_pass, unsigned long long base, unsigned long long need, Keyed keyed,
                             Weight weight, unsigned &key) {
    unsigned fixed = 0, value = 0; // the bits decided so far, and their value
    Pick pick = {0, base, true};
    for (unsigned pass = first_pass; pass < RADIX_PASSES; ++pass) {
        const unsigned shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
        const unsigned digits = pass == 2 ? 0x3ffu : 0x7ffu;
        for (unsigned b = threadIdx.x; b < RADIX_BUCKETS; b += SAMPLE_THREADS) sh.hist[b] = 0;
        __syncthreads();
        for (unsigned i = lo + threadIdx.x; i < hi; i += SAMPLE_THREADS) {
            unsigned k;
            if (keyed(i, k) && (k & fixed) == value) {
                const unsigned long long w = weight(i);
                if (w != 0) atomicAdd(&sh.hist[(k >> shift) & digits], w);
            }
        }
        __syncthreads();
        pick = cluster_pick(sh, cluster, pick.below, need);
        if (!pick.found) return pick;
        fixed |= digits << shift;
        value |= pick.digit << shift;
    }
    key = value;
    return pick;
}

// The segment of a block's slice where the draw's target falls, and the cumulative sum before it, from the
// segment totals (warp 0 of the walking block; lane l holds segments 4l..4l+3): the first segment with a positive
// total whose end passes the target. False if none does (rounding: the block total said otherwise).
__device__ bool find_segment(const SampleShared &sh, unsigned segments, double start, double target,
                             unsigned &segment, double &before) {
    const unsigned lane = threadIdx.x % 32;
    double own = 0.0;
    for (unsigned k = 0; k < 4; ++k) {
        if (4 * lane + k < segments) own += sh.segment_total[4 * lane + k];
    }
    double inclusive = own;
#pragma unroll
    for (unsigned offset = 1; offset < 32; offset *= 2) {
        const double other = __shfl_up_sync(FULL_MASK, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    const double exclusive = __shfl_up_sync(FULL_MASK, inclusive, 1);
    double run = start + (lane == 0 ? 0.0 : exclusive);
    unsigned found = NO_TOKEN;
    for (unsigned k = 0; k < 4 && 4 * lane + k < segments; ++k) {
        const double t = sh.segment_total[4 * lane + k];
        if (t > 0.0 && run + t > target) {
            found = 4 * lane + k;
            break;
        }
        run += t;
    }
    const unsigned ballot = __ballot_sync(FULL_MASK, found != NO_TOKEN);
    if (ballot == 0) return false;
    const unsigned holder = __ffs(ballot) - 1;
    segment = __shfl_sync(FULL_MASK, found, holder);
    before = __shfl_sync(FULL_MASK, run, holder);
    return true;
}

// The first token of [begin, end) with a positive probability whose cumulative sum (from `start`, a prefix sum per
// 32 tokens) exceeds `target`, else the last with a positive probability (one warp).
template <typename Prob>
__device__ unsigned walk_segment(unsigned begin, unsigned end, double start, double target, Prob prob) {
    const unsigned lane = threadIdx.x % 32;
    unsigned last = NO_TOKEN;
    double carry = start;
    for (unsigned base = begin; base < end; base += 32) {
        const unsigned i = base + lane;
        const double p = i < end ? prob(i) : 0.0;
        double inclusive = p;
#pragma unroll
        for (unsigned offset = 1; offset < 32; offset *= 2) {
            const double other = __shfl_up_sync(FULL_MASK, inclusive, offset);
            if (lane >= offset) inclusive += other;
        }
        const unsigned claim = __ballot_sync(FULL_MASK, p > 0.0 && carry + inclusive > target);
        if (claim != 0) return base + __ffs(claim) - 1;
        const unsigned positive = __ballot_sync(FULL_MASK, p > 0.0);
        if (positive != 0) last = base + 31 - __clz(positive);
        carry += __shfl_sync(FULL_MASK, inclusive, 31);
    }
    return last;
}

// The token of this cluster's row; returns true in the one thread (of the cluster) that knows it.
template <typename T>
__device__ bool choose_token(SampleShared &sh, const cg::cluster_group &cluster, const T *__restrict__ logits,
                             unsigned vocab, double u, const uint8_t *seen, float *scores, float *exps,
                             float temperature, float penalty, unsigned top_k, unsigned long long top_p_need,
                             unsigned &token) {
    const unsigned rank = cluster.block_rank();
    const unsigned per = (vocab + SAMPLE_CLUSTER - 1) / SAMPLE_CLUSTER;
    const unsigned lo = min(rank * per, vocab), hi = min(lo + per, vocab);
    const bool leader = rank == 0 && threadIdx.x == 0;

    // 1. Scores as the host's logits processors leave them before top-k.
    {
        unsigned flags = 0, max_key = 0, first_inf = NO_TOKEN;
        unsigned long long max_composite = 0;
        for (unsigned i = lo + threadIdx.x; i < hi; i += SAMPLE_THREADS) {
            const float x = to_f32(logits[i]);
            flags |= isnan(x) || x == INFINITY ? FLAG_BAD : x > -INFINITY ? FLAG_CANDIDATE : 0u;
            float s = x;
            if (seen != nullptr && seen[i]) s = s < 0.0f ? __fmul_rn(s, penalty) : __fdiv_rn(s, penalty);
            s = __fdiv_rn(s, temperature);
            scores[i] = s;
            const unsigned key = order_key(s);
            max_key = max(max_key, key);
            if (s == INFINITY) first_inf = min(first_inf, i);
            else if (s > -INFINITY) max_composite = max(max_composite, composite(key, i));
        }
        atomicOr(&sh.flags, flags);
        atomicMax(&sh.max_key, max_key);
        atomicMin(&sh.first_inf, first_inf);
        atomicMax(&sh.max_composite, max_composite);
    }
    cluster.sync();
    if (threadIdx.x == 0) {
        unsigned flags = 0, max_key = 0, first_inf = NO_TOKEN;
        unsigned long long max_composite = 0;
        for (unsigned r = 0; r < SAMPLE_CLUSTER; ++r) {
            const SampleShared &other = *cluster.map_shared_rank(&sh, r);
            flags |= other.flags;
            max_key = max(max_key, other.max_key);
            first_inf = min(first_inf, other.first_inf);
            max_composite = max(max_composite, other.max_composite);
        }
        sh.row_max_key = max_key;
        sh.row_last_candidate = max_composite;
        // Where the host has no probabilities to draw from: it reports bad logits (NaN, +inf, all -inf); scores
        // made +inf by the temperature give NaN probabilities and it takes the first maximum, as it does when
        // the penalty leaves every score -inf.
        sh.decided = true;
        if (flags & FLAG_BAD || !(flags & FLAG_CANDIDATE)) sh.decision = NO_TOKEN;
        else if (first_inf != NO_TOKEN) sh.decision = first_inf;
        else if (max_key == order_key(-INFINITY)) sh.decision = 0;
        else sh.decided = false;
    }
    __syncthreads();
    if (sh.decided) {
        token = sh.decision;
        return leader;
    }
    const float max_score = key_score(sh.row_max_key);
    const unsigned long long last_candidate = sh.row_last_candidate;

    // 2. Top-k: the k-th highest score (the k-th smallest inverted key); lower scores are removed.
    float kth = -INFINITY;
    if (top_k > 0 && top_k < vocab) {
        unsigned inverted = 0;
        radix_select(
            sh, cluster, lo, hi, 0, 0, top_k,
            [&](unsigned i, unsigned &k) {
                k = ~order_key(scores[i]);
                return true;
            },
            [](unsigned) { return 1ull; }, inverted);
        kth = key_score(~inverted);
    }
    // The top-p candidates: finite scores that top-k keeps.
    auto candidate = [kth](float s) { return s > -INFINITY && s >= kth; };

    // 3. Unnormalized probabilities of the candidates and their sum.
    double sum = 0.0;
    for (unsigned i = lo + threadIdx.x; i < hi; i += SAMPLE_THREADS) {
        const float s = scores[i];
        if (candidate(s)) {
            const float e = glibc_expf(__fsub_rn(s, max_score));
            exps[i] = e;
            sum += e;
        }
    }
    sum = block_sum_f64(sh, sum);
    if (threadIdx.x == 0) sh.sum_candidates = sum;
    const double sum_candidates = cluster_sum(sh, cluster, &sh.sum_candidates);

    // 4. Top-p: the kept tokens are the candidates from `boundary` on in (key, index) order.
    unsigned long long boundary = 0;
    double sum_kept = sum_candidates;
    if (top_p_need != 0) {
        unsigned key = 0;
        const Pick pick = radix_select(
            sh, cluster, lo, hi, 0, 0, top_p_need,
            [&](unsigned i, unsigned &k) {
                const float s = scores[i];
                k = order_key(s);
                return candidate(s);
            },
            [&](unsigned i) { return fixed_mass(probability(exps[i], sum_candidates)); }, key);
        if (!pick.found) {
            boundary = last_candidate; // nothing passes the threshold: the host keeps only its last token
        } else {
            // Tokens tied at `key` are removed in index order while the mass stays short of `need`: the first
            // `ties` - 1 of them.
            const unsigned long long each =
                fixed_mass(probability(glibc_expf(__fsub_rn(key_score(key), max_score)), sum_candidates));
            const unsigned long long ties = (top_p_need - pick.below + each - 1) / each;
            unsigned index = 0;
            if (ties > 1) {
                const unsigned first_pass = (vocab - 1) >> 21 ? 0 : (vocab - 1) >> 10 ? 1 : 2;
                radix_select(
                    sh, cluster, lo, hi, first_pass, 0, ties,
                    [&](unsigned i, unsigned &k) {
                        const float s = scores[i];
                        k = i;
                        return candidate(s) && order_key(s) == key;
                    },
                    [](unsigned) { return 1ull; }, index);
            }
            boundary = composite(key, index);
        }
        sum = 0.0;
        for (unsigned i = lo + threadIdx.x; i < hi; i += SAMPLE_THREADS) {
            const float s = scores[i];
            if (candidate(s) && composite(order_key(s), i) >= boundary) sum += exps[i];
        }
        sum = block_sum_f64(sh, sum);
        if (threadIdx.x == 0) sh.sum_kept = sum;
        sum_kept = cluster_sum(sh, cluster, &sh.sum_kept);
    }
    auto prob = [&](unsigned i) {
        const float s = scores[i];
        return candidate(s) && composite(order_key(s), i) >= boundary ? probability(exps[i], sum_kept) : 0.0;
    };

    // 5. The draw. Segment totals of this block's slice (a warp per segment), the block's total.
    const unsigned segment_len = max(32u, ((per + MAX_SEGMENTS - 1) / MAX_SEGMENTS + 31) & ~31u);
    const unsigned segments = (hi - lo + segment_len - 1) / segment_len;
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned last = 0;
    for (unsigned g = warp; g < segments; g += SAMPLE_WARPS) {
        const unsigned begin = lo + g * segment_len, end = min(begin + segment_len, hi);
        double part = 0.0;
        for (unsigned i = begin + lane; i < end; i += 32) {
            const double p = prob(i);
            part += p;
            if (p > 0.0) last = i + 1;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) part += __shfl_xor_sync(FULL_MASK, part, offset);
        if (lane == 0) sh.segment_total[g] = part;
    }
    atomicMax(&sh.last_positive, last);
    __syncthreads();
    if (warp == 0) {
        double own = 0.0;
        for (unsigned k = 0; k < 4 && 4 * lane + k < segments; ++k) own += sh.segment_total[4 * lane + k];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) own += __shfl_xor_sync(FULL_MASK, own, offset);
        if (lane == 0) sh.total = own;
    }
    cluster.sync();
    // The blocks' cumulative totals in order, the target, and the block where it falls.
    if (threadIdx.x == 0) {
        double before = 0.0, start = 0.0;
        unsigned walker = NO_TOKEN, last_positive = 0;
        double totals[SAMPLE_CLUSTER];
        for (unsigned r = 0; r < SAMPLE_CLUSTER; ++r) {
            const SampleShared &other = *cluster.map_shared_rank(&sh, r);
            totals[r] = other.total;
            last_positive = max(last_positive, other.last_positive);
        }
        double total = 0.0;
        for (unsigned r = 0; r < SAMPLE_CLUSTER; ++r) total += totals[r];
        const double target = __dmul_rn(u, total);
        for (unsigned r = 0; r < SAMPLE_CLUSTER && walker == NO_TOKEN; ++r) {
            if (totals[r] > 0.0 && before + totals[r] > target) {
                walker = r;
                start = before;
            }
            before += totals[r];
        }
        sh.walker = walker;
        sh.walk_start = start;
        sh.target = target;
        // No block passes the target (u * total rounded up to the total): the host's last positive token.
        sh.decision = last_positive - 1;
    }
    __syncthreads();
    if (sh.walker == NO_TOKEN) {
        token = sh.decision;
        return leader;
    }
    if (rank != sh.walker || warp != 0) return false;
    unsigned segment;
    double before;
    if (!find_segment(sh, segments, sh.walk_start, sh.target, segment, before)) {
        token = sh.last_positive - 1;
    } else {
        const unsigned begin = lo + segment * segment_len;
        token = walk_segment(begin, min(begin + segment_len, hi), before, sh.target, prob);
    }
    return lane == 0;
}

template <typename T>
__device__ void sample_rows(const T *logits, unsigned vocab, unsigned *tokens, unsigned *pos, const double *uniforms,
                            uint8_t *seen, float *scratch, float temperature, float penalty, unsigned top_k,
                            unsigned long long top_p_need) {
    __shared__ SampleShared sh;
    const cg::cluster_group cluster = cg::this_cluster();
    const unsigned row = blockIdx.y;
    if (threadIdx.x == 0) {
        sh.flags = 0;
        sh.max_key = 0;
        sh.first_inf = NO_TOKEN;
        sh.max_composite = 0;
        sh.last_positive = 0;
        sh.result = NO_TOKEN;
    }
    __syncthreads();
    grid_dependency_wait();
    const size_t offset = (size_t)row * vocab;
    uint8_t *row_seen = seen != nullptr ? seen + offset : nullptr;
    float *scores = scratch + 2 * offset;
    unsigned token = NO_TOKEN;
    if (choose_token(sh, cluster, logits + offset, vocab, uniforms[row], row_seen, scores, scores + vocab,
                     temperature, penalty, top_k, top_p_need, token)) {
        *cluster.map_shared_rank(&sh.result, 0) = token;
    }
    // Also keeps every block's shared memory alive until the others are done reading it.
    __syncwarp();
    cluster.sync();
    if (cluster.block_rank() == 0 && threadIdx.x == 0) {
        tokens[row] = sh.result;
        if (row_seen != nullptr && sh.result < vocab) row_seen[sh.result] = 1;
        if (row == 0) *pos += 1;
    }
}

#define SAMPLE_KERNEL(SUFFIX, T)                                                                               \
    extern "C" __global__ void __cluster_dims__(SAMPLE_CLUSTER, 1, 1) __launch_bounds__(SAMPLE_THREADS, 1)   \
        sample_rows_##SUFFIX(const T *logits, unsigned vocab, unsigned *tokens, unsigned *pos,                 \
                             const double *uniforms, uint8_t *seen, float *scratch, float temperature,         \
                             float penalty, unsigned top_k, unsigned long long top_p_need) {                   \
        sample_rows<T>(logits, vocab, tokens, pos, uniforms, seen, scratch, temperature, penalty, top_k,      \
                       top_p_need);                                                                           \
    }

SAMPLE_KERNEL(f32, float)
SAMPLE_KERNEL(f16, __half)
SAMPLE_KERNEL(bf16, __nv_bfloat16)
