// Dynamic block selection (LfBlockMeansParams, LfBlockSelectParams): the top-k key blocks of
// each query block by the score of their mean-pooled summaries, written as the CSR rows the
// block-sparse forward reads, on the GPU and without a host round trip.
//
// The pooling pass: one CTA per (block, head, batch entry) sums its block's rows in f32 (column
// pairs across the threads, row groups when a row has fewer pairs than threads) and writes their
// mean, contiguous [batch, heads, blocks, head_dim].
//
// The selection pass: one CTA per (query block, query head, batch entry). Its universe row (the
// key blocks the element mask leaves anything of, ascending, with their full flags; one list
// per query block, shared by every head and batch entry) is scored, a warp per full block: s =
// dot(query block mean, key block mean) in f32, kept as its order bits; an entry's 8-byte key
// is those bits over the complement of its position (a larger key is a larger score or, at equal
// scores, a lower block). The top_k-th largest key is found bit by bit (64 CTA-wide counts), and the row
// keeps its partial blocks and the full blocks whose key reaches it, written ascending with their
// flags from out_offsets[row] on (a prefix scan of per-thread counts over contiguous chunks).
// Shared memory: 4 bytes per entry of the longest universe row.
#pragma once

#include "common.cuh"
#include "longflash/params.h"

namespace lf {

constexpr int kSelectThreads = 128;

template <typename T> __device__ __forceinline__ void block_means(const LfBlockMeansParams &p) {
    __shared__ float2 partial[kSelectThreads];
    const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int pairs = p.head_dim / 2;
    const int groups = kSelectThreads / pairs; // head_dim <= 256: at least 1
    const int t = threadIdx.x, pair = t % pairs, g = t / pairs;
    const int r0 = blk * p.block;
    const int r1 = min(r0 + p.block, p.seqlen);
    const uint16_t *x = static_cast<const uint16_t *>(p.x) + b * p.batch_stride +
                        h * p.head_stride + 2 * pair;
    float2 s = make_float2(0.0f, 0.0f);
    if (g < groups) {
        for (int r = r0 + g; r < r1; r += groups) {
            const float2 v =
                Elem<T>::unpack(*reinterpret_cast<const uint32_t *>(x + r * p.row_stride));
            s.x += v.x;
            s.y += v.y;
        }
    }
    partial[t] = s;
    __syncthreads();
    if (t < pairs) {
        for (int j = 1; j < groups; ++j) {
            s.x += partial[t + j * pairs].x;
            s.y += partial[t + j * pairs].y;
        }
        const int blocks = (p.seqlen + p.block - 1) / p.block;
        const float n = static_cast<float>(r1 - r0);
        float *out = p.means + ((static_cast<int64_t>(b) * p.heads + h) * blocks + blk) * p.head_dim;
        *reinterpret_cast<float2 *>(out + 2 * t) = make_float2(s.x / n, s.y / n);
    }
}

// The order bits of score s (+0 and -0 equal, every NaN as +NaN): a larger value is a larger
// score, and 0 is below every score (it marks an entry that is not scored).
__device__ __forceinline__ uint32_t select_order(float s) {
    uint32_t u = __float_as_uint(s + 0.0f);
    if (s != s) u = 0x7fc00000u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The 8-byte key of the entry at position i of a universe row with order bits ord: a larger key
// is a larger score or, at equal scores, a lower position, which is a lower key block (a row is
// ascending).
__device__ __forceinline__ unsigned long long select_key(uint32_t ord, int i) {
    return (static_cast<unsigned long long>(ord) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
}

__device__ __forceinline__ void select_flag_error(const LfBlockSelectParams &p) {
    if (p.error_flag != nullptr) atomicOr(p.error_flag, 1);
}

__device__ __forceinline__ void block_select(const LfBlockSelectParams &p) {
    extern __shared__ uint32_t ord[]; // [max_row]: order bits of each entry's score, 0 if unscored
    __shared__ int counts[kSelectThreads];
    __shared__ unsigned int total;
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    constexpr int kWarps = kSelectThreads / 32;
    const int d = p.head_dim;
    const int64_t row = (static_cast<int64_t>(b) * p.heads_q + h) * p.num_q_blocks + qb;
    // Offsets outside the lists (a raw caller's error) leave the row empty and set the flag.
    int u0 = p.uni_offsets[qb];
    int len = p.uni_offsets[qb + 1] - u0;
    if (u0 < 0 || len < 0 || len > p.max_row || u0 > p.uni_len - len) {
        if (t == 0) select_flag_error(p);
        u0 = 0;
        len = 0;
    }
    const int hk = h / (p.heads_q / p.heads_kv);
    const float *qm = p.q_means + row * d;
    const float *km = p.k_means + (static_cast<int64_t>(b) * p.heads_kv + hk) * p.num_k_blocks * d;
    float qv[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[i] = (lane + 32 * i < d) ? qm[lane + 32 * i] : 0.0f;

    // Score every full block of the universe row (a warp per block); partial and unusable
    // entries get key 0.
    for (int i = warp; i < len; i += kWarps) {
        const int kb = p.uni_cols[u0 + i];
        const bool usable = kb >= 0 && kb < p.num_k_blocks;
        uint32_t bits = 0;
        if (usable && p.uni_full[u0 + i] != 0) {
            const float *k = km + static_cast<int64_t>(kb) * d;
            float s = 0.0f;
#pragma unroll
            for (int c = 0; c < 8; ++c)
                if (lane + 32 * c < d) s = fmaf(qv[c], k[lane + 32 * c], s);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            bits = select_order(s);
        }
        if (lane == 0) {
            ord[i] = bits;
            if (!usable) select_flag_error(p);
        }
    }
    if (t == 0) total = 0;
    __syncthreads();

    // The threshold: the top_k-th largest key among the full blocks (1 keeps them all when they
    // are top_k or fewer). Bit by bit from the top: keep a bit when top_k keys still reach it.
    int full_count = 0;
    for (int i = t; i < len; i += kSelectThreads) full_count += ord[i] != 0;
    atomicAdd(&total, static_cast<unsigned int>(full_count));
    __syncthreads();
    const bool select_all = total <= static_cast<unsigned int>(p.top_k);
    __syncthreads();
    unsigned long long threshold = 1;
    if (!select_all) {
        unsigned long long prefix = 0;
        for (int bit = 63; bit >= 0; --bit) {
            const unsigned long long cand = prefix | (1ull << bit);
            int n = 0;
            for (int i = t; i < len; i += kSelectThreads) n += ord[i] != 0 && select_key(ord[i], i) >= cand;
            if (t == 0) total = 0;
            __syncthreads();
            atomicAdd(&total, static_cast<unsigned int>(n));
            __syncthreads();
            if (total >= static_cast<unsigned int>(p.top_k)) prefix = cand;
            __syncthreads();
        }
        threshold = prefix;
    }

    // Each thread's contiguous chunk of the row, its kept count, an exclusive scan, the writes.
    const int chunk = (len + kSelectThreads - 1) / kSelectThreads;
    const int c0 = min(t * chunk, len), c1 = min(c0 + chunk, len);
    auto kept = [&](int i) {
        const int kb = p.uni_cols[u0 + i];
        if (kb < 0 || kb >= p.num_k_blocks) return false;
        return p.uni_full[u0 + i] == 0 || (ord[i] != 0 && select_key(ord[i], i) >= threshold);
    };
    int mine = 0;
    for (int i = c0; i < c1; ++i) mine += kept(i);
    counts[t] = mine;
    __syncthreads();
    if (t < 32) {
        // Exclusive scan of the 128 counts by the first warp, four per lane.
        int v[4], sum = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            v[j] = counts[4 * t + j];
            sum += v[j];
        }
        int incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        int run = incl - sum;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            counts[4 * t + j] = run;
            run += v[j];
        }
        if (t == 31) total = static_cast<unsigned int>(incl);
    }
    __syncthreads();
    const int o0 = p.out_offsets[row];
    int room = p.out_offsets[row + 1] - o0;
    if (o0 < 0 || room < 0 || o0 > p.out_len - room) room = 0;
    if (t == 0 && static_cast<int>(total) != room) select_flag_error(p);
    int pos = counts[t];
    for (int i = c0; i < c1; ++i) {
        if (!kept(i)) continue;
        if (pos < room) {
            p.out_cols[o0 + pos] = p.uni_cols[u0 + i];
            p.out_full[o0 + pos] = p.uni_full[u0 + i] != 0;
        }
        ++pos;
    }
}

} // namespace lf

#define LF_DEFINE_BLOCK_MEANS_KERNEL(NAME, T)                                                     \
    extern "C" __global__ void __launch_bounds__(lf::kSelectThreads, 8)                            \
        NAME(const __grid_constant__ LfBlockMeansParams p) {                                       \
        lf::block_means<T>(p);                                                                    \
    }

#define LF_DEFINE_BLOCK_SELECT_KERNEL(NAME)                                                       \
    extern "C" __global__ void __launch_bounds__(lf::kSelectThreads, 8)                            \
        NAME(const __grid_constant__ LfBlockSelectParams p) {                                      \
        lf::block_select(p);                                                                      \
    }
