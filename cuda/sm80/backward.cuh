// The sm_80 backward mainloops (mma.sync, ldmatrix, cp.async) of exact attention, FlashAttention-2
// style: P is recomputed from Q, K and the forward's log-sum-exp, never stored.
//
//   attention_bwd_kv   one CTA per (key tile, key/value head, batch entry). K and V stay in shared
//                      memory, dK and dV in registers, while the CTA walks the query tiles that see
//                      its key tile (a query-tile iterator) for every query head of the group.
//                      Each step:
//                        1. S^T = K Q^T and dP^T = V dO^T (rows are keys), P^T = exp2(S^T *
//                           scale * log2(e) - LSE * log2(e)), dS^T = P^T (dP^T - D), the element
//                           mask on partial tiles; P^T and dS^T go to shared memory, rounded to
//                           the element type;
//                        2. dV += P^T dO and dK += dS^T Q;
//                        3. dQ += dS K, added to an f32 accumulator in global memory (red.add),
//                           unless the call is deterministic.
//   attention_bwd_dq   the deterministic mode's dQ: one CTA per (query tile, query head, batch
//                      entry) over the forward's plan, S, dP and dS recomputed per key tile with
//                      the forward's score code, dQ in registers, written once.
//
// Policies as in the forward: a tile iterator (which tiles, and whether each is full) and an
// element mask (per query row, the keys it sees), so a block-sparse backward plugs in a key-major
// iterator over the same mainloops.
#pragma once

#include "../common.cuh"
#include "longflash/params.h"
#include "longflash/tile_plan.h"
#include "../softmax.cuh"
#include "mainloop.cuh"
#include "primitives.cuh"

namespace lf {

// ---- tiles ---------------------------------------------------------------------------------------

// A [rows][W] tile of 16-bit elements in shared memory, rows of W/8 16-byte chunks, swizzled so
// that the 8 rows an ldmatrix reads and the rows a quarter-warp stores fall in distinct banks: for
// W >= 64 chunk c of row r sits at c ^ (r & 7) (SwizzledTile's layout, so load_tile_async fills
// it), for W = 32 (four chunks, two rows per 128 bytes) at c ^ ((r >> 1) & 3).
template <int W> struct BwdTile {
    static_assert(W == 32 || W % 64 == 0, "tile rows of 32 elements or a multiple of 64");
    static __device__ __forceinline__ int phase(int r) { return W >= 64 ? (r & 7) : ((r >> 1) & 3); }
    // Byte offset of element (r, c).
    static __device__ __forceinline__ uint32_t offset(int r, int c) {
        return static_cast<uint32_t>((r * W + (((c >> 3) ^ phase(r)) << 3) + (c & 7)) * 2);
    }
};

// A lane's ldmatrix cursor into a BwdTile<W>: the lane addresses row r0 + R and chunk h + C, with
// R a multiple of 8 (which keeps the row's swizzle phase) and C even (h is 0 or 1), so every
// address is a base and an XOR with a per-lane constant.
template <int W> struct BwdCursor {
    uint32_t base;
    uint32_t y;
    __device__ __forceinline__ BwdCursor(uint32_t tile, int r0, int h)
        : base(tile + static_cast<uint32_t>(r0 * W * 2)),
          y(static_cast<uint32_t>(h ^ BwdTile<W>::phase(r0))) {}
    __device__ __forceinline__ uint32_t at(int R, int C) const {
        return base + static_cast<uint32_t>(R * W * 2) + ((static_cast<uint32_t>(C) ^ y) << 4);
    }
};

// The four operand patterns of m16n8k16 from shared tiles (see the fragment layouts in
// softmax.cuh). A is m16 x k16, B two n8 x k16 blocks (registers 0, 1 for the first, 2, 3 for the
// second).
//   A from a [M][K] tile:  cursor a_rows(tile, m0) at (16 mt, 2 ks)      ldmatrix
//   A from a [K][M] tile:  cursor a_cols(tile)     at (16 ks, m0/8 + 2 mt) ldmatrix.trans
//   B from a [N][K] tile:  cursor b_rows(tile, n0) at (16 np, 2 ks)      ldmatrix
//   B from a [K][N] tile:  cursor b_cols(tile)     at (16 ks, n0/8 + 2 np) ldmatrix.trans
template <int W> __device__ __forceinline__ BwdCursor<W> a_rows(uint32_t tile, int m0, int lane) {
    return BwdCursor<W>(tile, m0 + (lane & 15), lane >> 4);
}
template <int W> __device__ __forceinline__ BwdCursor<W> a_cols(uint32_t tile, int lane) {
    return BwdCursor<W>(tile, (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
}
template <int W> __device__ __forceinline__ BwdCursor<W> b_rows(uint32_t tile, int n0, int lane) {
    return BwdCursor<W>(tile, n0 + (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
}
template <int W> __device__ __forceinline__ BwdCursor<W> b_cols(uint32_t tile, int lane) {
    return BwdCursor<W>(tile, (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
}

// acc[MT][NT] += A B^T over KSTEPS k16 steps for one warp: A's m16 tiles mt at rows m0 + 16 mt,
// B's n8 tiles at columns n0 + 8 nt (m0 / n0 inside the cursor for untransposed operands, as
// chunk offsets a_c0 = m0 / 8, b_c0 = n0 / 8 for transposed ones).
template <typename T, int MT, int NT, int KSTEPS, bool kATrans, bool kBTrans, int WA, int WB>
__device__ __forceinline__ void warp_mma(float (&acc)[MT][NT][4], const BwdCursor<WA> &a, int a_c0,
                                         const BwdCursor<WB> &b, int b_c0) {
    static_assert(NT % 2 == 0, "B operands come two n8 blocks at a time");
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
        uint32_t af[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (kATrans)
                ldmatrix_x4_trans(af[mt], a.at(16 * ks, a_c0 + 2 * mt));
            else
                ldmatrix_x4(af[mt], a.at(16 * mt, 2 * ks));
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t bf[4];
            if constexpr (kBTrans)
                ldmatrix_x4_trans(bf, b.at(16 * ks, b_c0 + 2 * np));
            else
                ldmatrix_x4(bf, b.at(16 * np, 2 * ks));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                Mma<T>::mma(acc[mt][2 * np], af[mt], bf[0], bf[1]);
                Mma<T>::mma(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
            }
        }
    }
}

template <int MT, int NT> __device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// Stores a warp's accumulators (rows m0 + 16 mt + g (+ 8), columns n0 + 8 nt + 2 tq (+ 1)) into a
// BwdTile<W>, each value times `mul` and rounded to T.
template <typename T, int W, int MT, int NT>
__device__ __forceinline__ void store_acc(uint32_t tile, const float (&acc)[MT][NT][4], int m0,
                                          int n0, int lane, float mul) {
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const uint32_t packed = Elem<T>::pack(acc[mt][nt][2 * r] * mul,
                                                      acc[mt][nt][2 * r + 1] * mul);
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(
                                 tile + BwdTile<W>::offset(m0 + 16 * mt + g + 8 * r,
                                                           n0 + 8 * nt + 2 * tq)),
                             "r"(packed));
            }
}

// Copies rows [0, valid_rows) of a [ROWS][D] shared tile to global memory (row stride in
// elements), 16 bytes at a time.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void store_tile(uint16_t *gmem, int64_t row_stride, uint32_t tile,
                                           int valid_rows, int tid) {
    constexpr int kChunks = D / 8;
    static_assert((ROWS * kChunks) % THREADS == 0, "tile store must divide evenly among threads");
#pragma unroll
    for (int it = 0; it < ROWS * kChunks / THREADS; ++it) {
        const int idx = it * THREADS + tid;
        const int r = idx / kChunks;
        const int c = (idx % kChunks) * 8;
        if (r < valid_rows) {
            uint4 val;
            asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(val.x), "=r"(val.y), "=r"(val.z), "=r"(val.w)
                         : "r"(tile + BwdTile<D>::offset(r, c)));
            *reinterpret_cast<uint4 *>(gmem + r * row_stride + c) = val;
        }
    }
}

// Adds a and b to the f32 values at p and p + 1 in global memory (p 8-byte aligned): one vector
// reduction on sm_90 and newer, two scalar ones before.
__device__ __forceinline__ void red_add_f32x2(float *p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// ---- the dK / dV mainloop --------------------------------------------------------------------

// Tile shape and warp layout of attention_bwd_kv: BC keys per CTA, BR query rows per step, and for
// each of its three products a grid of WM x (warps / WM) warps over the product's rows and
// columns (S^T and dP^T: BC x BR; dK and dV: BC x D; dQ: BR x D).
template <typename T_, int D_, int BC_, int BR_, int NWARPS_, int WM1_, int WM2_, int WM3_>
struct BwdTraits {
    using T = T_;
    static constexpr int D = D_;
    static constexpr int BC = BC_;
    static constexpr int BR = BR_;
    static constexpr int kWarps = NWARPS_;
    static constexpr int kThreads = NWARPS_ * 32;
    // 1: S^T, dP^T [BC x BR], contraction over D.
    static constexpr int kWM1 = WM1_, kWN1 = NWARPS_ / WM1_;
    static constexpr int kMT1 = BC / (16 * kWM1), kNT1 = BR / (8 * kWN1);
    // 2: dK, dV [BC x D], contraction over BR.
    static constexpr int kWM2 = WM2_, kWN2 = NWARPS_ / WM2_;
    static constexpr int kMT2 = BC / (16 * kWM2), kNT2 = D / (8 * kWN2);
    // 3: dQ [BR x D], contraction over BC.
    static constexpr int kWM3 = WM3_, kWN3 = NWARPS_ / WM3_;
    static constexpr int kMT3 = BR / (16 * kWM3), kNT3 = D / (8 * kWN3);
    static_assert(kMT1 * 16 * kWM1 == BC && kNT1 * 8 * kWN1 == BR, "S^T splits into warp tiles");
    static_assert(kMT2 * 16 * kWM2 == BC && kNT2 * 8 * kWN2 == D, "dK, dV split into warp tiles");
    static_assert(kMT3 * 16 * kWM3 == BR && kNT3 * 8 * kWN3 == D, "dQ splits into warp tiles");
    static_assert(NWARPS_ % WM1_ == 0 && NWARPS_ % WM2_ == 0 && NWARPS_ % WM3_ == 0, "warp grids");
    static_assert(BR % 16 == 0 && BC % 16 == 0 && BR <= 2 * kThreads, "tile sides");
    // Shared memory: K, V; Q, dO in two stages; P^T, dS^T; LSE (log2) and D in two stages.
    static constexpr int kKVBytes = BC * D * 2;
    static constexpr int kQBytes = BR * D * 2;
    static constexpr int kPBytes = BC * BR * 2;
    static constexpr int kRowBytes = BR * 4;
    static constexpr int kOffK = 0;
    static constexpr int kOffV = kOffK + kKVBytes;
    static constexpr int kOffQ = kOffV + kKVBytes;
    static constexpr int kOffDO = kOffQ + 2 * kQBytes;
    static constexpr int kOffP = kOffDO + 2 * kQBytes;
    static constexpr int kOffDS = kOffP + kPBytes;
    static constexpr int kOffL = kOffDS + kPBytes;
    static constexpr int kOffD = kOffL + 2 * kRowBytes;
    static constexpr int kSmemBytes = kOffD + 2 * kRowBytes;
};

// dK and dV of key tile kt of key/value head hk, batch entry b; with p.dq_accum set, also adds
// this key tile's share of dQ to it. `iter_for(h)` gives the query-tile iterator of query head h
// (count / tile / is_full); `mask` the element mask of partial tiles (row_keys).
template <class Tr, class Mask, class IterFor>
__device__ __forceinline__ void attention_bwd_kv(const LfBwdParams &p, int kt, int hk, int b,
                                                 const Mask &mask, const IterFor &iter_for) {
    using T = typename Tr::T;
    using Iter = decltype(iter_for(0));
    constexpr int D = Tr::D, BC = Tr::BC, BR = Tr::BR;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t s0 = smem_addr(smem);
    const uint32_t sK = s0 + Tr::kOffK, sV = s0 + Tr::kOffV;
    const uint32_t sP = s0 + Tr::kOffP, sDS = s0 + Tr::kOffDS;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int tq = lane & 3;

    const int seqlen_q = p.mask.seqlen_q;
    const int seqlen_k = p.mask.seqlen_k;
    const int k0 = kt * BC;
    const int group = p.heads_q / p.heads_kv;
    const int h0 = hk * group;
    const float scale_log2 = p.softmax_scale_log2;

    load_tile_async<BC, D, Tr::kThreads>(
        sK, static_cast<const uint16_t *>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                k0 * p.k_row_stride,
        p.k_row_stride, seqlen_k - k0, tid);
    load_tile_async<BC, D, Tr::kThreads>(
        sV, static_cast<const uint16_t *>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                k0 * p.v_row_stride,
        p.v_row_stride, seqlen_k - k0, tid);

    // Q, dO, LSE and D of query tile qt of head h into stage s.
    auto load_item = [&](int h, int qt, int s) {
        const int q0 = qt * BR;
        load_tile_async<BR, D, Tr::kThreads>(
            s0 + Tr::kOffQ + s * Tr::kQBytes,
            static_cast<const uint16_t *>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                q0 * p.q_row_stride,
            p.q_row_stride, seqlen_q - q0, tid);
        load_tile_async<BR, D, Tr::kThreads>(
            s0 + Tr::kOffDO + s * Tr::kQBytes,
            static_cast<const uint16_t *>(p.dout) + b * p.do_batch_stride +
                h * p.do_head_stride + q0 * p.do_row_stride,
            p.do_row_stride, seqlen_q - q0, tid);
        // The workspace rows are padded to LF_BWD_ROW_PAD, a multiple of BR: whole tiles.
        const int64_t row = (static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad + q0;
        if (tid < BR / 4)
            cp_async_16(s0 + Tr::kOffL + s * Tr::kRowBytes + tid * 16, p.lse_log2 + row + tid * 4,
                        true);
        else if (tid < BR / 2)
            cp_async_16(s0 + Tr::kOffD + s * Tr::kRowBytes + (tid - BR / 4) * 16,
                        p.dsum + row + (tid - BR / 4) * 4, true);
    };

    float dk[Tr::kMT2][Tr::kNT2][4], dv[Tr::kMT2][Tr::kNT2][4];
    zero_acc(dk);
    zero_acc(dv);

    // The walk: item n of head h0 + gi; heads whose iterator is empty are skipped.
    int gi = 0, n = 0;
    Iter it = iter_for(h0);
    while (gi < group && it.count() == 0) {
        if (++gi < group) it = iter_for(h0 + gi);
    }
    bool have = gi < group;
    if (have) load_item(h0 + gi, it.tile(0), 0);
    cp_async_commit(); // K, V and the first item
    int stage = 0;

    while (have) {
        int ngi = gi, nn = n + 1;
        Iter nit = it;
        while (ngi < group && nn >= nit.count()) {
            if (++ngi < group) {
                nit = iter_for(h0 + ngi);
                nn = 0;
            }
        }
        const bool next = ngi < group;

        cp_async_wait<0>();
        __syncthreads(); // this item's tiles visible; everyone is done with the last item
        if (next) {
            load_item(h0 + ngi, nit.tile(nn), stage ^ 1);
            cp_async_commit();
        }

        const int h = h0 + gi;
        const int q0 = it.tile(n) * BR;
        const bool full = it.is_full(n);
        const uint32_t sQ = s0 + Tr::kOffQ + stage * Tr::kQBytes;
        const uint32_t sDO = s0 + Tr::kOffDO + stage * Tr::kQBytes;
        const float *lse2 = reinterpret_cast<const float *>(smem + Tr::kOffL + stage * Tr::kRowBytes);
        const float *dsum = reinterpret_cast<const float *>(smem + Tr::kOffD + stage * Tr::kRowBytes);

        // 1. S^T, dP^T -> P^T, dS^T in shared memory.
        {
            const int m0 = (warp % Tr::kWM1) * 16 * Tr::kMT1; // keys
            const int n0 = (warp / Tr::kWM1) * 8 * Tr::kNT1;  // query rows
            float s[Tr::kMT1][Tr::kNT1][4], dp[Tr::kMT1][Tr::kNT1][4];
            zero_acc(s);
            zero_acc(dp);
            warp_mma<T, Tr::kMT1, Tr::kNT1, D / 16, false, false>(s, a_rows<D>(sK, m0, lane), 0,
                                                                  b_rows<D>(sQ, n0, lane), 0);
            warp_mma<T, Tr::kMT1, Tr::kNT1, D / 16, false, false>(dp, a_rows<D>(sV, m0, lane), 0,
                                                                  b_rows<D>(sDO, n0, lane), 0);
#pragma unroll
            for (int nt = 0; nt < Tr::kNT1; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int col = n0 + nt * 8 + 2 * tq + c; // query row q0 + col
                    const float l2 = lse2[col], dd = dsum[col];
                    typename Mask::RowKeys keys{};
                    if (!full) keys = mask.row_keys(it, n, q0 + col, k0, BC);
#pragma unroll
                    for (int mt = 0; mt < Tr::kMT1; ++mt)
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            const int key = m0 + mt * 16 + g + 8 * r;
                            float pv = fast_exp2(fmaf(s[mt][nt][2 * r + c], scale_log2, -l2));
                            if (!full && !keys.visible(key)) pv = 0.f;
                            dp[mt][nt][2 * r + c] = pv * (dp[mt][nt][2 * r + c] - dd);
                            s[mt][nt][2 * r + c] = pv;
                        }
                }
            store_acc<T, BR>(sP, s, m0, n0, lane, 1.f);
            store_acc<T, BR>(sDS, dp, m0, n0, lane, 1.f);
        }
        __syncthreads(); // P^T, dS^T visible

        // 2. dV += P^T dO, dK += dS^T Q.
        {
            const int m0 = (warp % Tr::kWM2) * 16 * Tr::kMT2; // keys
            const int n0 = (warp / Tr::kWM2) * 8 * Tr::kNT2;  // head columns
            warp_mma<T, Tr::kMT2, Tr::kNT2, BR / 16, false, true>(dv, a_rows<BR>(sP, m0, lane), 0,
                                                                 b_cols<D>(sDO, lane), n0 / 8);
            warp_mma<T, Tr::kMT2, Tr::kNT2, BR / 16, false, true>(dk, a_rows<BR>(sDS, m0, lane), 0,
                                                                 b_cols<D>(sQ, lane), n0 / 8);
        }

        // 3. dQ += dS K into the f32 accumulator (unscaled; the conversion scales it).
        if (p.dq_accum != nullptr) {
            const int m0 = (warp % Tr::kWM3) * 16 * Tr::kMT3; // query rows
            const int n0 = (warp / Tr::kWM3) * 8 * Tr::kNT3;  // head columns
            float dq[Tr::kMT3][Tr::kNT3][4];
            zero_acc(dq);
            warp_mma<T, Tr::kMT3, Tr::kNT3, BC / 16, true, true>(dq, a_cols<BR>(sDS, lane), m0 / 8,
                                                                b_cols<D>(sK, lane), n0 / 8);
            float *acc = p.dq_accum +
                         ((static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad + q0) * D;
#pragma unroll
            for (int mt = 0; mt < Tr::kMT3; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = m0 + mt * 16 + g + 8 * r;
                    if (q0 + row < seqlen_q) {
#pragma unroll
                        for (int nt = 0; nt < Tr::kNT3; ++nt) {
                            red_add_f32x2(acc + row * D + n0 + nt * 8 + 2 * tq,
                                          dq[mt][nt][2 * r], dq[mt][nt][2 * r + 1]);
                        }
                    }
                }
        }

        gi = ngi;
        n = nn;
        it = nit;
        have = next;
        stage ^= 1;
    }

    // Epilogue: dK * scale and dV in the element type, staged through the K and V tiles.
    cp_async_wait<0>(); // a CTA without items still has K and V in flight
    __syncthreads();    // everyone is done reading K and V
    {
        const int m0 = (warp % Tr::kWM2) * 16 * Tr::kMT2;
        const int n0 = (warp / Tr::kWM2) * 8 * Tr::kNT2;
        store_acc<T, D>(sK, dk, m0, n0, lane, p.softmax_scale);
        store_acc<T, D>(sV, dv, m0, n0, lane, 1.f);
    }
    __syncthreads();
    store_tile<BC, D, Tr::kThreads>(static_cast<uint16_t *>(p.dk) + b * p.dk_batch_stride +
                                        hk * p.dk_head_stride + k0 * p.dk_row_stride,
                                    p.dk_row_stride, sK, seqlen_k - k0, tid);
    store_tile<BC, D, Tr::kThreads>(static_cast<uint16_t *>(p.dv) + b * p.dv_batch_stride +
                                        hk * p.dv_head_stride + k0 * p.dv_row_stride,
                                    p.dv_row_stride, sV, seqlen_k - k0, tid);
}

// ---- the deterministic dQ mainloop -----------------------------------------------------------------

// dQ of query tile qt of query head h, batch entry b, over the key tiles `iter` visits (the
// forward's iterator and tile traits, FwdTraits: one warp per 16 query rows). Shared memory: Q,
// dO, then K and V in two stages.
template <class Tr, class Iter, class Mask>
__device__ __forceinline__ void attention_bwd_dq(const LfBwdParams &p, const Iter &iter,
                                                 const Mask &mask, int qt, int h, int b) {
    using T = typename Tr::T;
    using Elt = Elem<T>;
    constexpr int D = Tr::D, BC = Tr::BC, BR = Tr::BR;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sDO = sQ + Tr::kQBytes;
    const uint32_t sKV = sDO + Tr::kQBytes; // stage s: K at sKV + 2 s kKVBytes, V after it

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int warp_row0 = warp * Tr::kWarpRows;
    const int g = lane >> 2;
    const int tq = lane & 3;

    const int seqlen_q = p.mask.seqlen_q;
    const int seqlen_k = p.mask.seqlen_k;
    const int q0 = qt * BR;
    const int hk = h / (p.heads_q / p.heads_kv);
    const float scale_log2 = p.softmax_scale_log2;
    const uint16_t *k_ptr =
        static_cast<const uint16_t *>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    const uint16_t *v_ptr =
        static_cast<const uint16_t *>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

    // LSE (log2) and D of the thread's rows; the workspace rows are padded past every tile.
    float lse2[Tr::kMT][2], dd[Tr::kMT][2];
    {
        const int64_t row = (static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad + q0;
#pragma unroll
        for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = warp_row0 + mt * 16 + g + 8 * r;
                lse2[mt][r] = p.lse_log2[row + i];
                dd[mt][r] = p.dsum[row + i];
            }
    }

    float dq[Tr::kMT][Tr::kDT][4];
    zero_acc(dq);
    const int n_tiles = iter.count();
    auto load_kv = [&](int n, int s) {
        const int kk0 = iter.tile(n) * BC;
        load_tile_async<BC, D, Tr::kThreads>(sKV + 2 * s * Tr::kKVBytes, k_ptr + kk0 * p.k_row_stride,
                                             p.k_row_stride, seqlen_k - kk0, tid);
        load_tile_async<BC, D, Tr::kThreads>(sKV + (2 * s + 1) * Tr::kKVBytes,
                                             v_ptr + kk0 * p.v_row_stride, p.v_row_stride,
                                             seqlen_k - kk0, tid);
    };
    if (n_tiles > 0) {
        load_tile_async<BR, D, Tr::kThreads>(
            sQ,
            static_cast<const uint16_t *>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                q0 * p.q_row_stride,
            p.q_row_stride, seqlen_q - q0, tid);
        load_tile_async<BR, D, Tr::kThreads>(
            sDO,
            static_cast<const uint16_t *>(p.dout) + b * p.do_batch_stride +
                h * p.do_head_stride + q0 * p.do_row_stride,
            p.do_row_stride, seqlen_q - q0, tid);
        load_kv(0, 0);
        cp_async_commit();
    }

    for (int n = 0; n < n_tiles; ++n) {
        const int s = n & 1;
        cp_async_wait<0>();
        __syncthreads(); // this tile's K and V visible; everyone is done with the other stage
        if (n + 1 < n_tiles) {
            load_kv(n + 1, s ^ 1);
            cp_async_commit();
        }
        const uint32_t sK = sKV + 2 * s * Tr::kKVBytes;
        const uint32_t sV = sK + Tr::kKVBytes;
        const int kk0 = iter.tile(n) * BC;

        float sc[Tr::kMT][Tr::kNT][4], dp[Tr::kMT][Tr::kNT][4];
        PlainScore::compute<Tr>(sc, sQ, sK, warp_row0, lane);
        PlainScore::compute<Tr>(dp, sDO, sV, warp_row0, lane);
        if (!iter.is_full(n)) {
#pragma unroll
            for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    mask_row(sc[mt], r, tq,
                             mask.row_keys(iter, n, q0 + warp_row0 + mt * 16 + g + r * 8, kk0, BC));
        }
        // dS = P (dP - D), with P = exp2(S * scale * log2(e) - LSE * log2(e)) (0 where masked).
#pragma unroll
        for (int mt = 0; mt < Tr::kMT; ++mt)
#pragma unroll
            for (int nt = 0; nt < Tr::kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float pv = fast_exp2(fmaf(sc[mt][nt][e], scale_log2, -lse2[mt][e >> 1]));
                    dp[mt][nt][e] = pv * (dp[mt][nt][e] - dd[mt][e >> 1]);
                }

        // dQ += dS K: dS from registers as the A fragments (as P in the forward's P V), K
        // through ldmatrix.trans.
        const SwizzledCursor<D> kc(sK, (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            uint32_t a[Tr::kMT][4];
#pragma unroll
            for (int mt = 0; mt < Tr::kMT; ++mt) {
                a[mt][0] = Elt::pack(dp[mt][2 * kk][0], dp[mt][2 * kk][1]);
                a[mt][1] = Elt::pack(dp[mt][2 * kk][2], dp[mt][2 * kk][3]);
                a[mt][2] = Elt::pack(dp[mt][2 * kk + 1][0], dp[mt][2 * kk + 1][1]);
                a[mt][3] = Elt::pack(dp[mt][2 * kk + 1][2], dp[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dpair = 0; dpair < Tr::kDT / 2; ++dpair) {
                uint32_t kb[4];
                ldmatrix_x4_trans(kb, kc.at(kk * 16, dpair * 2));
#pragma unroll
                for (int mt = 0; mt < Tr::kMT; ++mt) {
                    Mma<T>::mma(dq[mt][2 * dpair], a[mt], kb[0], kb[1]);
                    Mma<T>::mma(dq[mt][2 * dpair + 1], a[mt], kb[2], kb[3]);
                }
            }
        }
    }

    // Epilogue: dQ * scale in the element type, staged through the warp's own rows of the Q
    // tile (a query tile without keys writes zeros), once every lane of the warp is done
    // reading them.
    __syncwarp();
    store_acc<T, D>(sQ, dq, warp_row0, 0, lane, p.softmax_scale);
    __syncthreads();
    store_tile<BR, D, Tr::kThreads>(static_cast<uint16_t *>(p.dq) + b * p.dq_batch_stride +
                                        h * p.dq_head_stride + q0 * p.dq_row_stride,
                                    p.dq_row_stride, sQ, seqlen_q - q0, tid);
}

} // namespace lf
