// The decoding forward (LfDecodeParams): a few query tokens per sequence over a KV cache, paged
// or contiguous, read at the memory's speed.
//
// One CTA per (key split, row block, sequence and KV head). The query heads of one KV head and
// the sequence's query tokens are packed into the rows of one 16-row tile (GQA packing: row
// r = token * group + head within the group), so each cached key and value is read once per
// 16 rows. The four warps take turns over the split's keys, 16 at a time, each with its own
// cp.async ring of K/V stages and its own online-softmax state (no CTA barrier in the loop); the
// warps' states are merged through shared memory at the end. With several splits each CTA
// writes its rows normalized in f32 with their log-sum-exp, and the last CTA of a (row block,
// sequence and KV head) to finish merges its splits by log-sum-exp (merge_splits_if_last): one
// kernel, no second launch.
//
// Device-side indices are never trusted: a cache length is clamped into [0, the keys the launch
// covers] and a block-table entry into [0, num_pages), and either is reported through
// error_flag.
#pragma once

#include "longflash/params.h"
#include "longflash/tile_plan.h"
#include "policies/rope.cuh"
#include "sm80/primitives.cuh"
#include "softmax.cuh"

namespace lf {

// Built with LF_DECODE_TRACE=N (a measurement build, never the library's; load it through
// LONGFLASH_KERNEL_DIR): every CTA of the N-th decoding launch of the process (counted in CTAs of
// that launch's grid) prints its SM, its start (globaltimer, ns) and the clock cycles from its
// start at which it had issued its first loads, had them, ended its key loop, freed the ring,
// written its rows, and passed the split merge.
#if defined(LF_DECODE_TRACE)
__device__ unsigned long long lf_decode_trace_ctas;
#define LF_TRACE(i) (trace[i] = clock64())
#else
#define LF_TRACE(i) ((void)0)
#endif

template <typename T_, int D_, int STAGES_, bool ROPE_ = false, bool PADDED_ = false>
struct DecodeTraits {
    using T = T_;
    static constexpr int D = D_;
    static constexpr int kStages = STAGES_;    // K/V stages per warp
    static constexpr bool kRope = ROPE_;       // rotary positions applied in the kernel
    // The call's head dim (a multiple of 4) may be narrower than D: columns past it are
    // zero-filled on load and not stored, and rows need only be 8-byte aligned.
    static constexpr bool kPadded = PADDED_;
    static constexpr int kWarps = LF_DECODE_WARPS;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kRows = LF_DECODE_ROWS; // packed rows per CTA: one m16 tile
    static constexpr int kKeys = LF_DECODE_KEYS; // keys per warp per step: one k16 step of P V
    static constexpr int kDT = D / 8;
    static constexpr int kKSteps = D / 16;
    static constexpr int kTileBytes = kKeys * D * 2; // K or V of one step (and the Q tile)
    static constexpr int kStageBytes = 2 * kTileBytes;
    static constexpr int kRingBytes = kWarps * kStages * kStageBytes;
    // RoPE: a second Q tile (the outside-window query) and, per warp, a tile for the rotated
    // keys of a step that straddles the window edge.
    static constexpr int kQTiles = kRope ? 2 : 1;
    static constexpr int kRingOff = kQTiles * kTileBytes;
    static constexpr int kScratchOff = kRingOff + kRingBytes;
    static constexpr int kSmemBytes = kScratchOff + (kRope ? kWarps * kTileBytes : 0);
    // Q's A fragments stay in registers up to head dim 128 (32 registers); at 256 they would
    // crowd out O's 128, so Q is read from shared memory every step instead (and with RoPE,
    // whose two Q variants are read from shared memory).
    static constexpr bool kQInRegs = D <= 128 && !kRope;
    // The merge of the warps' states reuses the ring: O in f32 and three floats per row.
    static constexpr int kMergeWarpFloats = kRows * D + kRows * 3;
    static_assert(kRows == 16 && kKeys == 16, "one m16 tile of rows, one k16 step of keys");
    static_assert(kStages >= 2, "a ring needs two stages");
    static_assert(kWarps * kMergeWarpFloats * 4 <= kRingBytes, "the merge fits in the ring");
    static_assert(LF_DECODE_SPLIT_ALIGN % (kWarps * kKeys) == 0,
                  "splits start on a step of every warp");
};

// Where the cached keys (or values) of one sequence and KV head are: key j is row j % page_size
// of page block_table[j / page_size], or row j of the sequence's own entry without a table.
struct CacheRows {
    const uint16_t *base;    // element 0 of the KV head in page 0 (or in the sequence's entry)
    int64_t page_stride;     // elements between pages
    int64_t row_stride;      // elements between rows of a page
    const int32_t *table;    // the sequence's row of the block table, or nullptr
    int page_shift, page_mask, num_pages;

    // Row `j0` (a multiple of 16, so the 16 rows from it share a page) and the flag for a
    // clamped table entry.
    __device__ __forceinline__ const uint16_t *rows(int j0, bool &bad) const {
        if (table == nullptr) return base + static_cast<int64_t>(j0) * row_stride;
        const int entry = table[j0 >> page_shift];
        const int page = min(max(entry, 0), num_pages - 1);
        bad |= page != entry;
        return base + page * page_stride + static_cast<int64_t>(j0 & page_mask) * row_stride;
    }
};

// Copies kKeys rows from `src` (row stride in elements) into a swizzled [kKeys][D] tile with the
// 32 lanes of one warp; rows at or past `valid` are zero-filled and not read.
template <class Tr>
__device__ __forceinline__ void warp_load_rows(uint32_t dst, const uint16_t *src,
                                               int64_t row_stride, int valid, int head_dim,
                                               int lane) {
    constexpr int kChunks = Tr::D / 8;
    constexpr int kPerLane = Tr::kKeys * kChunks / 32;
#pragma unroll
    for (int it = 0; it < kPerLane; ++it) {
        const int idx = it * 32 + lane;
        const int r = idx / kChunks;
        const int c = (idx % kChunks) * 8;
        if constexpr (Tr::kPadded) {
            const bool row_ok = r < valid;
            cp_async_chunk<true>(dst + SwizzledTile<Tr::D>::offset(r, c),
                                 row_ok ? src + r * row_stride + c : src, row_ok, c, head_dim,
                                 src);
        } else {
            const bool ok = r < valid;
            cp_async_16(dst + SwizzledTile<Tr::D>::offset(r, c),
                        ok ? src + r * row_stride + c : src, ok);
        }
    }
}

// How a warp turns the 16 keys of a step for a RoPE score: R_pos k (the inside of the window),
// the attention factor alone (ReRoPE's outside, R_0 k), or R_{pos / leak} k (Leaky ReRoPE's
// outside). Keys j0.. sit at positions pos0...
enum class KeyTurn { Rotate, FactorOnly, RotateLeaked };

// Writes the turned 16 x D key tile `src` into `dst` (the same tile, or another) with the 32
// lanes of one warp; elements past rotary_dim are copied (untouched in place).
template <class Tr>
__device__ __forceinline__ void turn_keys(const LfRope &r, uint32_t src, uint32_t dst,
                                          int64_t pos0, KeyTurn turn, int lane) {
    using Tile = SwizzledTile<Tr::D>;
    using T = typename Tr::T;
    constexpr int kPairs = Tr::D / 2;
    const int half = r.rotary_dim / 2;
    const float af = r.attention_factor;
#if defined(LF_DECODE_ROPE_STEPS) && LF_DECODE_ROPE_STEPS
    // Built with LF_DECODE_ROPE_STEPS=1: each lane keeps its pairs (f = lane, lane + 32, ...)
    // for all 16 keys, takes the first key's angle from rope_cos_sin (f64 reduction) and steps
    // to the next keys by one rotation of the per-key angle (four FMAs; the step's own error,
    // about 4e-7 rad, adds up to about 6e-6 rad over 15 steps, far below 16-bit rounding). The
    // default computes every element's angle from scratch.
    static_assert(kPairs % 32 == 0, "whole pairs per lane");
#pragma unroll
    for (int fi = 0; fi < kPairs / 32; ++fi) {
        const int f = lane + 32 * fi;
        if (f >= half && src == dst) continue;
        int xi, yi;
        rope_pair(r, f, xi, yi);
        const bool rotary = f < half;
        float c = 1.f, sn = 0.f, dc = 1.f, ds = 0.f;
        if (rotary && turn != KeyTurn::FactorOnly) {
            const double scale = turn == KeyTurn::Rotate ? 1.0 : r.inv_leak;
            const double freq = r.inv_freq[f];
            rope_cos_sin(static_cast<double>(pos0) * scale, freq, c, sn);
            rope_cos_sin(scale, freq, dc, ds);
        }
        for (int row = 0; row < Tr::kKeys; ++row) {
            uint16_t hx, hy;
            asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hx) : "r"(src + Tile::offset(row, xi)));
            asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hy) : "r"(src + Tile::offset(row, yi)));
            if (rotary) {
                const float x = Elem<T>::to_float(hx), y = Elem<T>::to_float(hy);
                hx = Elem<T>::to_bits(af * (x * c - y * sn));
                hy = Elem<T>::to_bits(af * (x * sn + y * c));
                const float cn = c * dc - sn * ds, sn2 = sn * dc + c * ds;
                c = cn;
                sn = sn2;
            }
            asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(dst + Tile::offset(row, xi)), "h"(hx));
            asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(dst + Tile::offset(row, yi)), "h"(hy));
        }
    }
#else
    for (int idx = lane; idx < Tr::kKeys * kPairs; idx += 32) {
        const int row = idx / kPairs;
        const int f = idx % kPairs;
        if (f >= half && src == dst) continue;
        int xi, yi;
        rope_pair(r, f, xi, yi);
        uint16_t hx, hy;
        asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hx) : "r"(src + Tile::offset(row, xi)));
        asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hy) : "r"(src + Tile::offset(row, yi)));
        if (f < half) {
            const float x = Elem<T>::to_float(hx), y = Elem<T>::to_float(hy);
            float c = 1.f, sn = 0.f;
            if (turn != KeyTurn::FactorOnly) {
                const double pos = static_cast<double>(pos0 + row);
                rope_cos_sin(turn == KeyTurn::Rotate ? pos : pos * r.inv_leak, r.inv_freq[f], c,
                             sn);
            }
            hx = Elem<T>::to_bits(af * (x * c - y * sn));
            hy = Elem<T>::to_bits(af * (x * sn + y * c));
        }
        asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(dst + Tile::offset(row, xi)), "h"(hx));
        asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(dst + Tile::offset(row, yi)), "h"(hy));
    }
#endif
}

// The two Q variants of a RoPE decoding CTA, in place in its Q tiles: tile 0 R_pos(i) q~ (the
// inside of the window), tile 1 the outside-window query (R_w q~ for ReRoPE,
// R_{pos(i)/leak + w - w/leak} q~ for Leaky), q~ being q with its log-n factor; the padding rows
// past the last packed row are zero in both.
template <class Tr>
__device__ __forceinline__ void rope_decode_q(const LfRope &r, uint32_t sQ, int row0, int rows,
                                              int group, int64_t pos_first, int tid) {
    using Tile = SwizzledTile<Tr::D>;
    using T = typename Tr::T;
    constexpr int kPairs = Tr::D / 2;
    const float af = r.attention_factor;
    for (int idx = tid; idx < Tr::kRows * kPairs; idx += Tr::kThreads) {
        const int row = idx / kPairs;
        const int f = idx % kPairs;
        int xi, yi;
        rope_pair(r, f, xi, yi);
        const uint32_t ax = sQ + Tile::offset(row, xi), ay = sQ + Tile::offset(row, yi);
        uint16_t hx, hy;
        asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hx) : "r"(ax));
        asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hy) : "r"(ay));
        float x = Elem<T>::to_float(hx), y = Elem<T>::to_float(hy);
        const int pr = row0 + row;
        const double pos = static_cast<double>(pos_first + (pr < rows ? pr / group : 0));
        if (r.log_n_inv_ln_train > 0.f) {
            const float sc = fmaxf(1.f, logf(static_cast<float>(pos) + 1.f) * r.log_n_inv_ln_train);
            x *= sc;
            y *= sc;
        }
        float x0 = x, y0 = y, x1 = x, y1 = y;
        if (f < r.rotary_dim / 2) {
            const double freq = r.inv_freq[f];
            float c, sn;
            rope_cos_sin(pos, freq, c, sn);
            x0 = af * (x * c - y * sn);
            y0 = af * (x * sn + y * c);
            if (r.mode != 0) {
                const double p1 = r.mode == 1 ? static_cast<double>(r.window)
                                              : pos * r.inv_leak + r.window - r.window * r.inv_leak;
                rope_cos_sin(p1, freq, c, sn);
                x1 = af * (x * c - y * sn);
                y1 = af * (x * sn + y * c);
            }
        }
        const uint32_t o1 = Tr::kTileBytes;
        asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ax), "h"(Elem<T>::to_bits(x0)));
        asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ay), "h"(Elem<T>::to_bits(y0)));
        asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ax + o1), "h"(Elem<T>::to_bits(x1)));
        asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ay + o1), "h"(Elem<T>::to_bits(y1)));
    }
}

// S = Q K^T for 16 rows x 16 keys from shared tiles (Q's A fragments from `qa` when the traits
// keep them in registers).
template <class Tr>
__device__ __forceinline__ void decode_scores(float (&s)[2][4], uint32_t sQ, uint32_t sK,
                                              const uint32_t (&qa)[Tr::kQInRegs ? Tr::kKSteps : 1][4],
                                              int lane) {
    using T = typename Tr::T;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    const SwizzledCursor<Tr::D> qcur(sQ, lane & 15, lane >> 4);
    const SwizzledCursor<Tr::D> kcur(sK, (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
#pragma unroll
    for (int ks = 0; ks < Tr::kKSteps; ++ks) {
        uint32_t a[4];
        if constexpr (Tr::kQInRegs) {
#pragma unroll
            for (int x = 0; x < 4; ++x) a[x] = qa[ks][x];
        } else {
            ldmatrix_x4(a, qcur.at(0, ks * 2));
        }
        uint32_t kb[4];
        ldmatrix_x4(kb, kcur.at(0, ks * 2));
        Mma<T>::mma(s[0], a, kb[0], kb[1]);
        Mma<T>::mma(s[1], a, kb[2], kb[3]);
    }
}

// With several splits: counts this CTA's split in as done and, in the CTA that is the last of
// its (row block, sequence and KV head), merges every split's rows by log-sum-exp into o and lse
// (its own included), so no second kernel runs. Every CTA's partial rows are published (a
// release by its thread 0 after a barrier) with its arrival on the group's counter
// (split_counters, zero before the launch); the last CTA, having seen every arrival, reads the
// partials through L2 and sets the counter back to 0. Each thread takes (row, 4 columns) items
// with a share of the splits (a power of two of adjacent lanes per item when there are fewer
// items than threads), merged online (running maximum, sum and weighted O, sixteen splits' loads
// at a time: each round waits about 2000 cycles on L2, measured), then its lanes' shares are
// merged by shuffles.
template <class Tr>
__device__ __noinline__ bool merge_splits_if_last(const LfDecodeParams &p, unsigned char *smem) {
    using Elt = Elem<typename Tr::T>;
    const int tid = threadIdx.x;
    volatile int *last_flag = reinterpret_cast<volatile int *>(smem); // the Q tile is free now
    // Every thread's partial rows are ordered before thread 0's arrival by the barrier, and
    // published by its release; the last arrival's acquire, passed on by the second barrier,
    // makes every split's rows visible to this CTA's reads (the pattern of a grid semaphore,
    // without a sequentially consistent fence per thread).
    __syncthreads();
    if (tid == 0) {
        int *counter = p.split_counters + static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
        int before;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;"
                     : "=r"(before)
                     : "l"(counter)
                     : "memory");
        const bool last = before == p.num_splits - 1;
        if (last) atomicExch(counter, 0);
        *last_flag = last;
    }
    __syncthreads();
    if (!*last_flag) return false;

    // Read again rather than kept from the kernel's start, and not inlined: either way the
    // mainloop's register allocation at head dim 256 spilled.
    const int b = blockIdx.z / p.heads_kv;
    const int hk = blockIdx.z % p.heads_kv;
    const int group = p.heads_q / p.heads_kv;
    const int seqlen_q = p.mask.seqlen_q;
    const int rows = seqlen_q * group;
    const int row0 = blockIdx.y * Tr::kRows;
    const int width = Tr::kPadded ? p.head_dim : Tr::D;
    const int quads = width / 4;
    const int nrows = min(Tr::kRows, rows - row0);
    const int items = nrows * quads;
    // Lanes per item: the largest power of two (at most 32) that leaves an item for each group.
    int per = 1;
    while (per < 32 && items * per * 2 <= Tr::kThreads) per *= 2;
    const int64_t lse_split = static_cast<int64_t>(p.batch) * p.heads_q * seqlen_q;
    const int64_t o_split = lse_split * width;
    const int splits = p.num_splits;
    // Every lane runs every round (the shuffles need whole warps); with per > 1 there is one.
    for (int base = 0; base < items * per; base += Tr::kThreads) {
        const int item = (base + tid) / per;
        const bool active = item < items;
        const int it = active ? item : 0;
        const int r = it / quads;
        const int c = (it % quads) * 4;
        const int pr = row0 + r;
        const int t = pr / group;
        const int h = hk * group + pr % group;
        const int64_t lse_row = (static_cast<int64_t>(b) * p.heads_q + h) * seqlen_q + t;
        const int64_t o_row = ((static_cast<int64_t>(b) * seqlen_q + t) * p.heads_q + h) * width + c;
        float m = -INFINITY, l = 0.f;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        constexpr int kBatch = 16;
        for (int s0 = active ? tid % per : splits; s0 < splits; s0 += kBatch * per) {
            float x[kBatch];
            float4 y[kBatch];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int s = s0 + u * per;
                x[u] = s < splits ? __ldcg(p.partial_lse + s * lse_split + lse_row) : -INFINITY;
                y[u] = s < splits ? __ldcg(reinterpret_cast<const float4 *>(p.partial_o + s * o_split + o_row))
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
            }
            float mx = m;
#pragma unroll
            for (int u = 0; u < kBatch; ++u) mx = fmaxf(mx, x[u]);
            if (mx == -INFINITY) continue; // no split so far saw a key of this row
            const float a = __expf(m - mx);
            l *= a;
            acc.x *= a;
            acc.y *= a;
            acc.z *= a;
            acc.w *= a;
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const float w = __expf(x[u] - mx); // 0 for a split that saw no key (O of 0)
                l += w;
                acc.x += w * y[u].x;
                acc.y += w * y[u].y;
                acc.z += w * y[u].z;
                acc.w += w * y[u].w;
            }
            m = mx;
        }
        // The item's lanes (adjacent, a power of two) merge their shares.
        for (int off = 1; off < per; off *= 2) {
            const float mo = __shfl_xor_sync(0xffffffffu, m, off);
            const float lo = __shfl_xor_sync(0xffffffffu, l, off);
            float4 ao;
            ao.x = __shfl_xor_sync(0xffffffffu, acc.x, off);
            ao.y = __shfl_xor_sync(0xffffffffu, acc.y, off);
            ao.z = __shfl_xor_sync(0xffffffffu, acc.z, off);
            ao.w = __shfl_xor_sync(0xffffffffu, acc.w, off);
            const float mx = fmaxf(m, mo);
            const float a = mx == -INFINITY ? 0.f : __expf(m - mx);
            const float bo = mx == -INFINITY ? 0.f : __expf(mo - mx);
            l = l * a + lo * bo;
            acc.x = acc.x * a + ao.x * bo;
            acc.y = acc.y * a + ao.y * bo;
            acc.z = acc.z * a + ao.z * bo;
            acc.w = acc.w * a + ao.w * bo;
            m = mx;
        }
        if (!active || tid % per != 0) continue;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        uint16_t *out = static_cast<uint16_t *>(p.o) + b * p.o_batch_stride + t * p.o_row_stride +
                        h * p.o_head_stride + c;
        *reinterpret_cast<uint2 *>(out) =
            make_uint2(Elt::pack(acc.x * inv, acc.y * inv), Elt::pack(acc.z * inv, acc.w * inv));
        if (p.lse != nullptr && c == 0) p.lse[lse_row] = l > 0.f ? m + __logf(l) : -INFINITY;
    }
    return true;
}

template <class Tr>
__device__ __forceinline__ void decode_fwd(const LfDecodeParams &p, const LfRope *rope = nullptr) {
    using T = typename Tr::T;
    using Elt = Elem<T>;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sRing = sQ + Tr::kRingOff;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int tq = lane & 3;
#if defined(LF_DECODE_TRACE)
    long long trace[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    unsigned long long t_start;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_start));
    LF_TRACE(0);
#endif

    const int split = blockIdx.x;
    const int rb = blockIdx.y;
    const int b = blockIdx.z / p.heads_kv;
    const int hk = blockIdx.z % p.heads_kv;
    const int group = p.heads_q / p.heads_kv;
    const int seqlen_q = p.mask.seqlen_q;
    const int rows = seqlen_q * group;
    const int row0 = rb * Tr::kRows;

    // The sequence's keys, clamped into what the launch covers (and the table's capacity).
    bool bad = false;
    int len = p.mask.seqlen_k;
    if (p.cache_seqlens != nullptr) {
        const int x = p.cache_seqlens[b];
        len = min(max(x, 0), p.mask.seqlen_k);
        bad |= len != x;
    }
    const bool paged = p.block_table != nullptr;
    CacheRows kc{static_cast<const uint16_t *>(p.k) + hk * p.k_head_stride +
                     (paged ? 0 : b * p.k_page_stride),
                 p.k_page_stride,
                 p.k_row_stride,
                 paged ? p.block_table + b * p.block_table_stride : nullptr,
                 p.page_shift,
                 p.page_size - 1,
                 p.num_pages};
    CacheRows vc = kc;
    vc.base = static_cast<const uint16_t *>(p.v) + hk * p.v_head_stride +
              (paged ? 0 : b * p.v_page_stride);
    vc.page_stride = p.v_page_stride;
    vc.row_stride = p.v_row_stride;

    // Row r (packed) is query token min(r / group, seqlen_q - 1) (the clamp only touches the
    // padding rows of the last block, which are never stored); its keys are [lo, hi).
    const int64_t diag = static_cast<int64_t>(len) - seqlen_q;
    const int wl = p.mask.window_left, wr = p.mask.window_right;
    auto clamp_key = [&](int64_t x) -> int {
        return static_cast<int>(x < 0 ? 0 : (x > len ? len : x));
    };
    auto key_lo = [&](int t) -> int { return wl < 0 ? 0 : clamp_key(t + diag - wl); };
    auto key_hi = [&](int t) -> int { return wr < 0 ? len : clamp_key(t + diag + wr + 1); };
    const int t_first = min(row0 / group, seqlen_q - 1);
    const int t_last = min((row0 + Tr::kRows - 1) / group, seqlen_q - 1);
    // Keys some row of the block sees, and keys every row sees (a step inside needs no mask).
    const int union_lo = key_lo(t_first), union_hi = key_hi(t_last);
    const int all_lo = key_lo(t_last), all_hi = key_hi(t_first);
    int row_lo[2], row_hi[2], row_t[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int t = min((row0 + g + 8 * r) / group, seqlen_q - 1);
        row_t[r] = t;
        row_lo[r] = key_lo(t);
        row_hi[r] = key_hi(t);
    }
    const int split_lo = split * p.keys_per_split;
    const int k_lo = max(union_lo, split_lo);
    const int k_hi = min(union_hi, split_lo + p.keys_per_split);
    const int first = k_lo / Tr::kKeys;
    const int steps = k_hi > k_lo ? (k_hi + Tr::kKeys - 1) / Tr::kKeys - first : 0;
    // Warp w takes steps w, w + kWarps, ...
    const int my_steps = steps > warp ? (steps - warp + Tr::kWarps - 1) / Tr::kWarps : 0;

    const uint32_t sWarp = sRing + warp * Tr::kStages * Tr::kStageBytes;
    auto load_step = [&](int n) {
        const int j0 = (first + warp + n * Tr::kWarps) * Tr::kKeys;
        const uint32_t sK = sWarp + (n % Tr::kStages) * Tr::kStageBytes;
        warp_load_rows<Tr>(sK, kc.rows(j0, bad), kc.row_stride, len - j0, p.head_dim, lane);
        warp_load_rows<Tr>(sK + Tr::kTileBytes, vc.rows(j0, bad), vc.row_stride, len - j0,
                           p.head_dim, lane);
    };

    // Q: the block's packed rows (zeros past the last), in the group of the first stage.
    {
        constexpr int kChunks = Tr::D / 8;
        const uint16_t *q = static_cast<const uint16_t *>(p.q) + b * p.q_batch_stride;
        for (int idx = tid; idx < Tr::kRows * kChunks; idx += Tr::kThreads) {
            const int r = idx / kChunks;
            const int c = (idx % kChunks) * 8;
            const int pr = row0 + r;
            const bool ok = pr < rows;
            const int t = ok ? pr / group : 0;
            const int h = hk * group + (ok ? pr % group : 0);
            if constexpr (Tr::kPadded)
                cp_async_chunk<true>(sQ + SwizzledTile<Tr::D>::offset(r, c),
                                     q + t * p.q_row_stride + h * p.q_head_stride + c, ok, c,
                                     p.head_dim, q);
            else
                cp_async_16(sQ + SwizzledTile<Tr::D>::offset(r, c),
                            q + t * p.q_row_stride + h * p.q_head_stride + c, ok);
        }
    }
#pragma unroll
    for (int s = 0; s < Tr::kStages - 1; ++s) {
        if (s < my_steps) load_step(s);
        cp_async_commit();
    }
    LF_TRACE(1);
    cp_async_wait<Tr::kStages - 2>();
    __syncthreads(); // Q (copied by every thread) visible to every warp
    LF_TRACE(2);
    // Positions: key j at off + j, query token t at off + len - seqlen_q + t.
    const int64_t pos_off = Tr::kRope && rope->position_offsets ? rope->position_offsets[b] : 0;
    if constexpr (Tr::kRope) {
        rope_decode_q<Tr>(*rope, sQ, row0, rows, group, pos_off + diag, tid);
        __syncthreads(); // both Q variants written
    }

    uint32_t qa[Tr::kQInRegs ? Tr::kKSteps : 1][4];
    if constexpr (Tr::kQInRegs) {
        const SwizzledCursor<Tr::D> qcur(sQ, lane & 15, lane >> 4);
#pragma unroll
        for (int ks = 0; ks < Tr::kKSteps; ++ks) ldmatrix_x4(qa[ks], qcur.at(0, ks * 2));
    }

    float o[Tr::kDT][4];
    float row_base[2] = {kNoBase, kNoBase}, row_sum[2] = {0.f, 0.f}, exp_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int dt = 0; dt < Tr::kDT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
    const float scale_log2 = p.softmax_scale_log2;

    for (int n = 0; n < my_steps; ++n) {
        cp_async_wait<Tr::kStages - 2>();
        __syncwarp(); // step n's rows visible to the warp; every lane is done with step n - 1
        if (n + Tr::kStages - 1 < my_steps) load_step(n + Tr::kStages - 1);
        cp_async_commit();

        const uint32_t sK = sWarp + (n % Tr::kStages) * Tr::kStageBytes;
        const uint32_t sV = sK + Tr::kTileBytes;
        const int j0 = (first + warp + n * Tr::kWarps) * Tr::kKeys;

        // S = Q K^T for 16 rows x 16 keys; with RoPE, by the side of the window the step's
        // (query, key) pairs are on: relative positions diag + t - j of this step's keys.
        float s[2][4];
        if constexpr (!Tr::kRope) {
            decode_scores<Tr>(s, sQ, sK, qa, lane);
        } else {
            const LfRope &r = *rope;
            const int64_t rel_max = diag + t_last - j0;
            const int64_t rel_min = diag + t_first - (j0 + Tr::kKeys - 1);
            const bool all_in = r.mode == 0 || rel_max < r.window;
            const bool all_out = !all_in && rel_min >= r.window;
            const KeyTurn out_turn = r.mode == 2 ? KeyTurn::RotateLeaked : KeyTurn::FactorOnly;
            const bool turn_out = r.mode == 2 || r.attention_factor != 1.f;
            const int64_t pos0 = pos_off + j0;
            if (all_in) {
                turn_keys<Tr>(r, sK, sK, pos0, KeyTurn::Rotate, lane);
                __syncwarp();
                decode_scores<Tr>(s, sQ, sK, qa, lane);
            } else if (all_out) {
                if (turn_out) {
                    turn_keys<Tr>(r, sK, sK, pos0, out_turn, lane);
                    __syncwarp();
                }
                decode_scores<Tr>(s, sQ + Tr::kTileBytes, sK, qa, lane);
            } else {
                // Straddling: the inside keys into the warp's scratch tile, the outside ones in
                // place, both scores, and each element takes its side's.
                const uint32_t sKin = sQ + Tr::kScratchOff + warp * Tr::kTileBytes;
                turn_keys<Tr>(r, sK, sKin, pos0, KeyTurn::Rotate, lane);
                __syncwarp();
                if (turn_out) turn_keys<Tr>(r, sK, sK, pos0, out_turn, lane);
                __syncwarp();
                float s_out[2][4];
                decode_scores<Tr>(s, sQ, sKin, qa, lane);
                decode_scores<Tr>(s_out, sQ + Tr::kTileBytes, sK, qa, lane);
#pragma unroll
                for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                    for (int j = 0; j < 2; ++j)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int key = j0 + j * 8 + tq * 2 + c;
                            if (diag + row_t[rr] - key >= r.window) s[j][2 * rr + c] = s_out[j][2 * rr + c];
                        }
            }
        }

        if (j0 < all_lo || j0 + Tr::kKeys > all_hi) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int key = j0 + j * 8 + tq * 2 + c;
                        if (key < row_lo[r] || key >= row_hi[r]) s[j][2 * r + c] = -INFINITY;
                    }
        }
        if (!Tr::kRope && p.key_mask != nullptr) {
            // The caller's per-key mask (a byte per key, read below the length only; the plain
            // kernel's alone), addressed from the parameters here rather than kept in a
            // register through the loop.
            const uint8_t *key_mask = p.key_mask + b * p.key_mask_batch_stride;
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int key = j0 + j * 8 + tq * 2 + c;
                    if (key >= len || __ldg(key_mask + key) == 0) {
                        s[j][c] = -INFINITY;
                        s[j][2 + c] = -INFINITY;
                    }
                }
        }

        float alpha[2];
        bool rescale = false;
#pragma unroll
        for (int r = 0; r < 2; ++r)
            alpha[r] = move_base(row_base[r], row_sum[r], exp_sum[r], row_max(s, r), scale_log2,
                                 rescale);
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int dt = 0; dt < Tr::kDT; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e >> 1];
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) exp_row(s, r, scale_log2, row_base[r], exp_sum[r]);

        // O += P V, P from registers.
        uint32_t pa[4];
        pack_p<T>(s, 0, pa, row_sum[0], row_sum[1]);
        const SwizzledCursor<Tr::D> vcur(sV, (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
#pragma unroll
        for (int dp = 0; dp < Tr::kDT / 2; ++dp) {
            uint32_t vb[4];
            ldmatrix_x4_trans(vb, vcur.at(0, dp * 2));
            Mma<T>::mma(o[2 * dp], pa, vb[0], vb[1]);
            Mma<T>::mma(o[2 * dp + 1], pa, vb[2], vb[3]);
        }
    }
    LF_TRACE(3);
    cp_async_wait<0>();
    if (bad && p.error_flag != nullptr) atomicOr(p.error_flag, 1);
    __syncthreads(); // every warp is done with the ring: it now holds the merge
    LF_TRACE(4);

    // Each warp's state: O unnormalized [16][D] f32, then (base, sum, exp_sum) per row.
    float *merge = reinterpret_cast<float *>(smem + Tr::kRingOff);
    {
        float *mo = merge + warp * Tr::kMergeWarpFloats;
        float *ms = mo + Tr::kRows * Tr::D;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = g + 8 * r;
            const float l = quad_sum(row_sum[r]);
            const float le = quad_sum(exp_sum[r]);
            if (tq == 0) {
                ms[row * 3 + 0] = row_base[r];
                ms[row * 3 + 1] = l;
                ms[row * 3 + 2] = le;
            }
#pragma unroll
            for (int dt = 0; dt < Tr::kDT; ++dt)
                *reinterpret_cast<float2 *>(mo + row * Tr::D + dt * 8 + tq * 2) =
                    make_float2(o[dt][2 * r], o[dt][2 * r + 1]);
        }
    }
    __syncthreads();

    constexpr float kLn2 = 0.693147180559945309f;
    constexpr int kQuads = Tr::D / 4;
    for (int idx = tid; idx < Tr::kRows * kQuads; idx += Tr::kThreads) {
        const int row = idx / kQuads;
        const int c = (idx % kQuads) * 4;
        const int pr = row0 + row;
        if (pr >= rows || (Tr::kPadded && c >= p.head_dim)) continue;
        float base = kNoBase;
#pragma unroll
        for (int w = 0; w < Tr::kWarps; ++w)
            base = fmaxf(base, merge[w * Tr::kMergeWarpFloats + Tr::kRows * Tr::D + row * 3]);
        float l = 0.f, le = 0.f;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < Tr::kWarps; ++w) {
            const float *mw = merge + w * Tr::kMergeWarpFloats;
            const float *st = mw + Tr::kRows * Tr::D + row * 3;
            const float a = exp2_step(st[0], base);
            l += a * st[1];
            le += a * st[2];
            const float4 x = *reinterpret_cast<const float4 *>(mw + row * Tr::D + c);
            acc.x += a * x.x;
            acc.y += a * x.y;
            acc.z += a * x.z;
            acc.w += a * x.w;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const float lse = le > 0.f ? fmaf(base, kLn2, logf(le)) : -INFINITY;
        const int t = pr / group;
        const int h = hk * group + pr % group;
        if (p.num_splits == 1) {
            uint16_t *out = static_cast<uint16_t *>(p.o) + b * p.o_batch_stride +
                            t * p.o_row_stride + h * p.o_head_stride + c;
            *reinterpret_cast<uint2 *>(out) =
                make_uint2(Elt::pack(acc.x * inv, acc.y * inv), Elt::pack(acc.z * inv, acc.w * inv));
            if (p.lse != nullptr && c == 0)
                p.lse[(static_cast<int64_t>(b) * p.heads_q + h) * seqlen_q + t] = lse;
        } else {
            const int64_t prow =
                (static_cast<int64_t>(split) * p.batch + b) * seqlen_q * p.heads_q +
                static_cast<int64_t>(t) * p.heads_q + h;
            const int64_t width = Tr::kPadded ? p.head_dim : Tr::D;
            *reinterpret_cast<float4 *>(p.partial_o + prow * width + c) =
                make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
            if (c == 0)
                p.partial_lse[((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + h) *
                                  seqlen_q +
                              t] = lse;
        }
    }
    LF_TRACE(5);
    bool merged = false;
    if (p.num_splits > 1) merged = merge_splits_if_last<Tr>(p, smem);
    LF_TRACE(6);
#if defined(LF_DECODE_TRACE)
    if (tid == 0) {
        const unsigned long long ctas =
            static_cast<unsigned long long>(gridDim.x) * gridDim.y * gridDim.z;
        const unsigned long long n = atomicAdd(&lf_decode_trace_ctas, 1ull);
        if (n / ctas == LF_DECODE_TRACE) {
            unsigned sm;
            asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
            printf("LFTRACE %d %d %d sm %u start %llu steps %d merged %d "
                   "c %lld %lld %lld %lld %lld %lld\n",
                   blockIdx.x, blockIdx.y, blockIdx.z, sm, t_start, my_steps, int(merged),
                   trace[1] - trace[0], trace[2] - trace[0], trace[3] - trace[0],
                   trace[4] - trace[0], trace[5] - trace[0], trace[6] - trace[0]);
        }
    }
#else
    (void)merged;
#endif
}

} // namespace lf

// The decoding kernel NAME for element type T and head dimension D (PADDED: for a head narrower
// than D, a multiple of 4, in D-wide tiles).
#define LF_DEFINE_DECODE_KERNEL(NAME, T, D, PADDED)                                               \
    using NAME##_traits = lf::DecodeTraits<T, D, LF_DECODE_STAGES_D##D, false, PADDED>;           \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfDecodeParams p) {                                          \
        lf::decode_fwd<NAME##_traits>(p);                                                         \
    }

// The decoding kernel with rotary positions applied inside (RoPE, ReRoPE, Leaky ReRoPE over an
// un-rotated cache), for element type T and head dimension D (PADDED as above).
#define LF_DEFINE_DECODE_ROPE_KERNEL(NAME, T, D, PADDED)                                          \
    using NAME##_traits = lf::DecodeTraits<T, D, LF_DECODE_ROPE_STAGES_D##D, true, PADDED>;       \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfDecodeRopeParams p) {                                      \
        lf::decode_fwd<NAME##_traits>(p.base, &p.rope);                                           \
    }
