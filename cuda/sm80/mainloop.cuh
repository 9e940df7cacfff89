// The sm_80 forward mainloop (mma.sync, ldmatrix, cp.async): one CTA per (query tile, head,
// batch), a loop over the key tiles chosen by a tile iterator, scores from a score policy, an
// element mask applied only on partial tiles, an online softmax in registers, and P @ V with P
// kept in registers.
//
//   Traits  tile shape and element type (FwdTraits)
//   Iter    which key tiles a query tile visits, last to first, and whether each is full
//   Mask    which (row, key) elements are visible inside a partial tile
//   Score   S = Q K^T for one key tile (the hook for fused RoPE / ReRoPE scores)
//   Keys    where an item's key rows come from; QPrep what happens to the loaded Q tile
//
// Pipeline (FlashAttention-2): K and V each have one shared buffer; V_j is copied while
// S_j = Q K_j^T and its softmax run, and K_{j+1} is copied while O += P_j V_j runs.
#pragma once

#include "../common.cuh"
#include "longflash/params.h"
#include "longflash/tile_plan.h"
#include "../softmax.cuh"
#include "primitives.cuh"
#include "../policies/sources.cuh"

namespace lf {

template <typename T_, int D_, int BR_, int BC_, int NWARPS_, int QVARIANTS_ = 1,
          bool PADDED_ = false>
struct FwdTraits {
    using T = T_;
    static constexpr int D = D_;
    // The call's head dim (LfFwdParams::head_dim, a multiple of 4) may be narrower than the
    // tile's D: columns past it are zero-filled on load and not stored, and rows need only be
    // 8-byte aligned (copies and stores of 8 bytes).
    static constexpr bool kPadded = PADDED_;
    static constexpr int BR = BR_;
    static constexpr int BC = BC_;
    static constexpr int kWarps = NWARPS_;
    static constexpr int kThreads = NWARPS_ * 32;
    static constexpr int kWarpRows = BR / kWarps; // query rows owned by one warp
    static constexpr int kMT = kWarpRows / 16;    // m16 tiles per warp
    static constexpr int kNT = BC / 8;            // n8 tiles of S per warp row block
    static constexpr int kDT = D / 8;             // n8 tiles of O
    static constexpr int kKSteps = D / 16;        // k16 steps of Q K^T
    static constexpr int kQBytes = BR * D * 2;
    static constexpr int kKVBytes = BC * D * 2;
    static constexpr int kQVariants = QVARIANTS_; // Q tiles in shared memory (ReRoPE: 2)
    static constexpr int kSmemBytes = kQVariants * kQBytes + 2 * kKVBytes;
    using Tile = SwizzledTile<D>;              // shared-memory layout of the Q, K, V tiles
    static_assert(kWarpRows % 16 == 0, "each warp owns whole m16 tiles");
    static_assert(BC % 16 == 0 && D % 16 == 0, "tiles are whole k16 steps");
};

// ---- score policy ----------------------------------------------------------------------------

// S = Q K^T for the warp's rows and one key tile, from swizzled shared tiles.
struct PlainScore {
    template <class Tr>
    __device__ __forceinline__ static void compute(float (&s)[Tr::kMT][Tr::kNT][4], uint32_t sQ,
                                                   uint32_t sK, int warp_row0, int lane) {
        const SwizzledCursor<Tr::D> qc(sQ, warp_row0 + (lane & 15), lane >> 4);
        const SwizzledCursor<Tr::D> kc(sK, (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
#pragma unroll
        for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
            for (int nt = 0; nt < Tr::kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < Tr::kKSteps; ++ks) {
            uint32_t qa[Tr::kMT][4];
#pragma unroll
            for (int mt = 0; mt < Tr::kMT; ++mt)
                ldmatrix_x4(qa[mt], qc.at(mt * 16, ks * 2));
#pragma unroll
            for (int np = 0; np < Tr::kNT / 2; ++np) {
                uint32_t kb[4];
                ldmatrix_x4(kb, kc.at(np * 16, ks * 2));
#pragma unroll
                for (int mt = 0; mt < Tr::kMT; ++mt) {
                    Mma<typename Tr::T>::mma(s[mt][2 * np], qa[mt], kb[0], kb[1]);
                    Mma<typename Tr::T>::mma(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
                }
            }
        }
    }
};

// ---- the skeleton ----------------------------------------------------------------------------

// Where row 0 of (batch entry b, head h) sits in the LSE: [batch, heads_q, seqlen_q].
struct DenseLse {
    __device__ __forceinline__ int64_t operator()(const LfFwdParams &p, int b, int h,
                                                  int seqlen_q) const {
        return (static_cast<int64_t>(b) * p.heads_q + h) * seqlen_q;
    }
};

// Copies ROWS rows of a Q, K or V tile: all D columns, or the call's head dim with the rest
// zero-filled when the tile is wider (Tr::kPadded).
template <class Tr, int ROWS>
__device__ __forceinline__ void load_rows(uint32_t dst, const uint16_t *src, int64_t row_stride,
                                          int valid_rows, int head_dim, int tid) {
    if constexpr (Tr::kPadded)
        load_tile_async_cols<ROWS, Tr::D, Tr::kThreads>(dst, src, row_stride, valid_rows,
                                                        head_dim, tid);
    else
        load_tile_async<ROWS, Tr::D, Tr::kThreads>(dst, src, row_stride, valid_rows, tid);
}

// Copies ROWS rows gathered by `row_ptr` (see load_tile_gather_async), padded as load_rows.
template <class Tr, int ROWS, class RowPtr>
__device__ __forceinline__ void load_rows_gather(uint32_t dst, const RowPtr &row_ptr,
                                                 const uint16_t *fallback, int valid_rows,
                                                 int head_dim, int tid) {
    load_tile_gather_async<ROWS, Tr::D, Tr::kThreads, Tr::kPadded>(
        dst, row_ptr, fallback, valid_rows, Tr::kPadded ? head_dim : Tr::D, tid);
}

template <class Tr, class Iter, class Mask, class Score, class Keys, class QPrep,
          class LseAt = DenseLse>
__device__ __forceinline__ void attention_fwd_tile(const LfFwdParams &p, const Iter &iter,
                                                   const Mask &mask, const Keys &keys,
                                                   const QPrep &q_prep, int qt, int h, int b,
                                                   const LseAt &lse_at = LseAt{}) {
    using T = typename Tr::T;
    using Elt = Elem<T>;
    using Tile = SwizzledTile<Tr::D>;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK = sQ + Tr::kQVariants * Tr::kQBytes;
    const uint32_t sV = sK + Tr::kKVBytes;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int warp_row0 = warp * Tr::kWarpRows;
    const int g = lane >> 2; // accumulator row within an m16 tile (and g + 8)
    const int tq = lane & 3; // accumulator column pair within an n8 tile

    const int seqlen_q = p.mask.seqlen_q;
    const int seqlen_k = p.mask.seqlen_k;
    const int q0 = qt * Tr::BR;
    const int hk = h / (p.heads_q / p.heads_kv);

    const uint16_t *q_ptr = static_cast<const uint16_t *>(p.q) + b * p.q_batch_stride +
                            h * p.q_head_stride + q0 * p.q_row_stride;
    const uint16_t *v_ptr =
        static_cast<const uint16_t *>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

    float o[Tr::kMT][Tr::kDT][4];
    // row_base is the exponent base of P (see below); row_sum adds the rounded P (what P V
    // weights), and normalizes O; exp_sum adds the exact exponentials, for the log-sum-exp.
    float row_base[Tr::kMT][2], row_sum[Tr::kMT][2], exp_sum[Tr::kMT][2];
#pragma unroll
    for (int mt = 0; mt < Tr::kMT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < Tr::kDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.f;
        row_base[mt][0] = row_base[mt][1] = kNoBase;
        row_sum[mt][0] = row_sum[mt][1] = 0.f;
        exp_sum[mt][0] = exp_sum[mt][1] = 0.f;
    }

    const SwizzledCursor<Tr::D> vc(sV, (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
    const int n_tiles = iter.count();
    // Rows of key tile kt of variant v's source from its first on (loads zero-fill past them):
    // seqlen_k, or the source's own length where it has one (OwnsValues).
    auto key_rows = [&](int v, int kt) {
        if constexpr (OwnsValues<Keys>::value)
            return keys.rows(v, kt, Tr::BC);
        else
            return seqlen_k - kt * Tr::BC;
    };
    const float scale_log2 = p.softmax_scale_log2;
    if (n_tiles > 0) {
        load_rows<Tr, Tr::BR>(sQ, q_ptr, p.q_row_stride, seqlen_q - q0, p.head_dim, tid);
        {
            const int kt = iter.tile(0), v = iter.variant(0);
            if constexpr (GathersRows<Keys>::value) {
                const int k0 = kt * Tr::BC;
                load_rows_gather<Tr, Tr::BC>(sK, [&](int r) { return keys.k_row(k0 + r); },
                                             keys.k, seqlen_k - k0, p.head_dim, tid);
            } else {
                load_rows<Tr, Tr::BC>(sK, keys.tile(v, kt, Tr::BC), keys.stride(v),
                                      key_rows(v, kt), p.head_dim, tid);
            }
        }
        cp_async_commit();
    }

    for (int n = 0; n < n_tiles; ++n) {
        const int kt = iter.tile(n);
        const int k0 = kt * Tr::BC;
        cp_async_wait<0>();
        __syncthreads(); // K_kt (and Q) visible to all; everyone is done with V of the last tile
        if (n == 0) q_prep(sQ, warp_row0, lane, q0); // each warp prepares its own Q rows
        if constexpr (GathersRows<Keys>::value)
            load_rows_gather<Tr, Tr::BC>(sV, [&](int r) { return keys.v_row(k0 + r); }, keys.v,
                                         seqlen_k - k0, p.head_dim, tid);
        else if constexpr (OwnsValues<Keys>::value)
            load_rows<Tr, Tr::BC>(sV, keys.v_tile(iter.variant(n), kt, Tr::BC),
                                  keys.v_row_stride(iter.variant(n)),
                                  keys.rows(iter.variant(n), kt, Tr::BC), p.head_dim, tid);
        else
            load_rows<Tr, Tr::BC>(sV, v_ptr + k0 * p.v_row_stride, p.v_row_stride,
                                  seqlen_k - k0, p.head_dim, tid);
        cp_async_commit();

        float s[Tr::kMT][Tr::kNT][4];
        // Q variant: the item's variant where the kernel keeps several Q tiles (RoPE's outside
        // query); a kernel with one Q tile (a memory item's variant picks its keys only) uses it.
        const int qv = Tr::kQVariants > 1 ? iter.variant(n) : 0;
        Score::template compute<Tr>(s, sQ + qv * Tr::kQBytes, sK, warp_row0, lane);

        if (!iter.is_full(n)) {
#pragma unroll
            for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    mask_row(s[mt], r, tq,
                             mask.row_keys(iter, n, q0 + warp_row0 + mt * 16 + g + r * 8, k0,
                                           Tr::BC));
        }

        // Online softmax: new exponent base, rescale what was accumulated, P = exp2(S' - base)
        // with S' = S * scale * log2(e).
        float alpha[Tr::kMT][2];
        bool rescale = false;
#pragma unroll
        for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                alpha[mt][r] = move_base(row_base[mt][r], row_sum[mt][r], exp_sum[mt][r],
                                         row_max(s[mt], r), scale_log2, rescale);
        // The base of a row moves only when its maximum passes the next integer (in log2 units),
        // so most tiles of a long row leave every base of the warp unchanged: skip the
        // multiplications by 1 then (a warp-uniform branch).
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
                for (int dt = 0; dt < Tr::kDT; ++dt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[mt][dt][e] *= alpha[mt][e >> 1];
        }
#pragma unroll
        for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                exp_row(s[mt], r, scale_log2, row_base[mt][r], exp_sum[mt][r]);

        cp_async_wait<0>();
        __syncthreads(); // V_kt visible; everyone is done reading K_kt
        if (n + 1 < n_tiles) {
            const int kn = iter.tile(n + 1), v = iter.variant(n + 1);
            if constexpr (GathersRows<Keys>::value) {
                const int kn0 = kn * Tr::BC;
                load_rows_gather<Tr, Tr::BC>(sK, [&](int r) { return keys.k_row(kn0 + r); },
                                             keys.k, seqlen_k - kn0, p.head_dim, tid);
            } else {
                load_rows<Tr, Tr::BC>(sK, keys.tile(v, kn, Tr::BC), keys.stride(v),
                                      key_rows(v, kn), p.head_dim, tid);
            }
            cp_async_commit();
        }

        // O += P V: the S accumulators of n8 tiles 2kk and 2kk+1 are exactly the A fragment of
        // a k16 step, so P goes from registers to the tensor cores without shared memory.
#pragma unroll
        for (int kk = 0; kk < Tr::BC / 16; ++kk) {
            uint32_t pa[Tr::kMT][4];
#pragma unroll
            for (int mt = 0; mt < Tr::kMT; ++mt)
                pack_p<T>(s[mt], kk, pa[mt], row_sum[mt][0], row_sum[mt][1]);
#pragma unroll
            for (int dp = 0; dp < Tr::kDT / 2; ++dp) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, vc.at(kk * 16, dp * 2));
#pragma unroll
                for (int mt = 0; mt < Tr::kMT; ++mt) {
                    Mma<typename Tr::T>::mma(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
                    Mma<typename Tr::T>::mma(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }

    // Epilogue: O / l, LSE = base * ln(2) + ln(l); a row that saw no key gives 0 and -inf.
    // O is staged through the warp's own rows of the Q tile for 16-byte stores.
    constexpr float kLn2 = 0.693147180559945309f;
#pragma unroll
    for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = quad_sum(row_sum[mt][r]);
            const float le = quad_sum(exp_sum[mt][r]); // every lane: the shuffles need the full warp
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = warp_row0 + mt * 16 + g + r * 8;
#pragma unroll
            for (int dt = 0; dt < Tr::kDT; ++dt) {
                uint32_t packed = Elt::pack(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sQ + Tile::offset(row, dt * 8 + tq * 2)),
                             "r"(packed));
            }
            if (p.lse != nullptr && tq == 0 && q0 + row < seqlen_q) {
                const float lse = le > 0.f ? fmaf(row_base[mt][r], kLn2, logf(le)) : -INFINITY;
                p.lse[lse_at(p, b, h, seqlen_q) + q0 + row] = lse;
            }
        }
    __syncthreads();
    uint16_t *o_ptr = static_cast<uint16_t *>(p.o) + b * p.o_batch_stride + h * p.o_head_stride +
                      q0 * p.o_row_stride;
    constexpr int kChunks = Tr::D / 8;
#pragma unroll
    for (int it = 0; it < Tr::BR * kChunks / Tr::kThreads; ++it) {
        int idx = it * Tr::kThreads + tid;
        int r = idx / kChunks;
        int c = (idx % kChunks) * 8;
        if (q0 + r < seqlen_q && (!Tr::kPadded || c < p.head_dim)) {
            uint4 val;
            asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(val.x), "=r"(val.y), "=r"(val.z), "=r"(val.w)
                         : "r"(sQ + Tile::offset(r, c)));
            uint16_t *dst = o_ptr + r * p.o_row_stride + c;
            if constexpr (Tr::kPadded) {
                // 8 bytes at a time: rows may be only 8-byte aligned, and the head may end in
                // the middle of the chunk (a head dim that is a multiple of 4).
                *reinterpret_cast<uint2 *>(dst) = make_uint2(val.x, val.y);
                if (c + 4 < p.head_dim) *reinterpret_cast<uint2 *>(dst + 4) = make_uint2(val.z, val.w);
            } else {
                *reinterpret_cast<uint4 *>(dst) = val;
            }
        }
    }
}

} // namespace lf
