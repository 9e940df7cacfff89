// The top-k selection on Hopper (sm_90a; LfMemoryTopkSm90Params): the same exact streaming
// selection as cuda/topk.cuh, with its scores from wgmma. A producer warp issues TMA loads of the
// CTA's Q tile and of a ring of the memory's key tiles tracked by mbarriers; two consumer
// warpgroups of 64 query rows each compute S = Q K^T of a tile (Q as A fragments in registers,
// K from shared memory), release the tile's stage and then, warp by warp, append the scores
// that beat their row's threshold and compact rows that near the end of their slots, as the
// sm_80 kernel does (topk_insert: the warp walks only the groups of scores in which some lane
// has one above its row's threshold). Each warp owns its 16 rows'
// counts and thresholds, so no barrier spans the CTA: a warp compacting its rows holds back only
// its own warpgroup's next matrix product, and the ring lets the producer run ahead of it.
// Compiled only for sm_90a (see build.rs).
//
// A head dim narrower than the tile (100 in a 128-wide tile) needs no padding pass where its
// strides allow a tensor map (multiples of 16 bytes): TMA fills the columns past it with zeros.
// Otherwise the host runs the sm_80 kernel.
#pragma once

#include "sm90/primitives.cuh"
#include "sm90/wgmma_ops.cuh"
#include "topk.cuh"

namespace lf {
namespace sm90 {

template <typename T_, int D_> struct TopkSm90Traits {
    using T = T_;
    static constexpr int D = D_; // tile width (64 or 128)
    static constexpr int BR = LF_TOPK_SM90_ROWS;
    static constexpr int BC = LF_TOPK_SM90_KEYS;
    static constexpr int kStages = LF_TOPK_SM90_STAGES;
    static constexpr int kThreads = LF_TOPK_SM90_THREADS; // a producer warpgroup, two consumers
    static constexpr int kConsumerWarps = 8;
    static constexpr int kProducerRegs = 24;
    static constexpr int kConsumerRegs = 240;
    static constexpr int kQBytes = BR * D * 2;
    static constexpr int kKBytes = BC * D * 2;
    static constexpr int kKOff = kQBytes;
    static constexpr int kBarOff = kKOff + kStages * kKBytes;
    static constexpr int kBars = 1 + 2 * kStages; // Q, then per stage: landed, free
    static constexpr int kRowOff = kBarOff + kBars * 8; // per row: a count, then a threshold
    // The host's formula (attention/memory/top_k.rs, sm90_smem_bytes) is the same.
    static constexpr int kSmemBytes = kRowOff + BR * 8 + 1024;
    using Tile = Sw128Tile<BR, D>;
    static_assert(BR == 128 && kThreads == 384, "two consumer warpgroups of 64 rows");
    static_assert(D == 64 || D == 128, "S = Q K^T with Q fragments in registers");
    static_assert(BC == 64 || BC == 128, "S = Q K^T is m64n<BC>");
    static_assert(LF_TOPK_CAP - BC >= LF_TOPK_MAX_K, "a compaction frees room for a tile");
};

template <class Tr> __device__ __forceinline__ void topk_select(const LfMemoryTopkSm90Params &pp) {
    using T = typename Tr::T;
    const LfMemoryTopkParams &p = pp.topk;
    extern __shared__ __align__(1024) unsigned char smem[];
    const uint32_t raw = smem_addr(smem);
    const uint32_t base = (raw + 1023u) & ~1023u;
    unsigned char *base_ptr = smem + (base - raw);
    const uint32_t sQ = base;
    auto sK = [&](int s) { return base + Tr::kKOff + s * Tr::kKBytes; };
    const uint32_t bars = base + Tr::kBarOff;
    const uint32_t bar_q = bars;
    auto full = [&](int s) { return bars + 8 * (1 + s); };
    auto empty = [&](int s) { return bars + 8 * (1 + Tr::kStages + s); };
    int *count = reinterpret_cast<int *>(base_ptr + Tr::kRowOff);
    float *threshold = reinterpret_cast<float *>(base_ptr + Tr::kRowOff + Tr::BR * 4);

    const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int q0 = qt * Tr::BR;
    const int hk = h / (p.heads_q / p.heads_kv);
    const int mem_len = p.mem_len;
    const int n_tiles = (mem_len + Tr::BC - 1) / Tr::BC;
    const int warpgroup = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        prefetch_tmap(&pp.tma_q);
        prefetch_tmap(&pp.tma_k);
        mbar_init(bar_q, 1);
        for (int s = 0; s < Tr::kStages; ++s) {
            mbar_init(full(s), 1);
            mbar_init(empty(s), Tr::kConsumerWarps);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (warpgroup == 0) {
        // Producer: one thread loads Q once and the key tiles in order through the ring.
        regs_dec<Tr::kProducerRegs>();
        if (threadIdx.x == 0 && n_tiles > 0) {
            mbar_expect_tx(bar_q, Tr::kQBytes);
            tma_load_tile<Tr::BR, Tr::D>(sQ, &pp.tma_q, bar_q, q0, h, b);
            for (int n = 0; n < n_tiles; ++n) {
                const int s = n % Tr::kStages;
                mbar_wait(empty(s), ((n / Tr::kStages) & 1) ^ 1);
                mbar_expect_tx(full(s), Tr::kKBytes);
                tma_load_tile<Tr::BC, Tr::D>(sK(s), &pp.tma_k, full(s), n * Tr::BC, hk, b);
            }
        }
        return;
    }

    regs_inc<Tr::kConsumerRegs>();
    // Warp-uniform; read from lane 0 so that the compiler knows it too.
    const int cw = __shfl_sync(0xffffffffu, warpgroup - 1, 0);
    const int tid = threadIdx.x % 128;
    const int lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int wrow0 = cw * 64 + warp * 16; // the warp's first row in the tile
    const int k = p.top_k;
    const int64_t row0 = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + q0;

    if (lane < 16) { // each warp owns its rows' counts and thresholds
        count[wrow0 + lane] = 0;
        threshold[wrow0 + lane] = -INFINITY;
    }
    __syncwarp();
    const uint8_t *mask = p.mem_mask ? p.mem_mask + static_cast<int64_t>(b) * mem_len : nullptr;
    // The thread's two accumulator rows (g and g + 8 of the warp's 16) and whether they exist.
    const bool row_ok[2] = {q0 + wrow0 + g < p.seqlen_q, q0 + wrow0 + g + 8 < p.seqlen_q};
    unsigned long long *const row_cand[2] = {p.cand + (row0 + wrow0 + g) * LF_TOPK_CAP,
                                             p.cand + (row0 + wrow0 + g + 8) * LF_TOPK_CAP};
    int *const row_count[2] = {count + wrow0 + g, count + wrow0 + g + 8};

    // This warp's 16 Q rows as the A fragments of S's k16 steps (ldmatrix x4: lanes 0-15 address
    // rows 0-15 at the step's first 8 columns, lanes 16-31 the same rows 8 columns on).
    uint32_t qa[Tr::D / 16][4];
    const uint64_t desc_k = sw128_desc(sK(0), 16, 1024);
    if (n_tiles > 0) {
        mbar_wait(bar_q, 0);
        const int r = wrow0 + (lane & 15);
#pragma unroll
        for (int ks = 0; ks < Tr::D / 16; ++ks)
            ldmatrix_x4(qa[ks], sQ + Tr::Tile::offset(r, ks * 16 + (lane >> 4) * 8));
    }

    // Tile n_tiles loads nothing: every row of the warp then keeps its top k (all its candidates
    // when fewer) and writes them out, as in the sm_80 kernel.
    for (int t = 0; t <= n_tiles; ++t) {
        const bool last = t == n_tiles;
        if (!last) {
            const int s = t % Tr::kStages;
            float sc[Tr::BC / 8][4];
            mbar_wait(full(s), (t / Tr::kStages) & 1);
            const uint64_t dk = desc_add(desc_k, s * Tr::kKBytes);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < Tr::D / 16; ++ks)
                Wgmma<T>::template rk<Tr::BC>(reinterpret_cast<float(&)[Tr::BC / 2]>(sc), qa[ks],
                                              desc_add(dk, (ks >> 2) * Tr::BC * 128 + (ks & 3) * 32),
                                              ks > 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(sc);
            __syncwarp();
            if (lane == 0) mbar_arrive(empty(s)); // this warp is done with the stage's keys

            const float th[2] = {threshold[wrow0 + g], threshold[wrow0 + g + 8]};
            topk_insert(sc, th, row_ok, t * Tr::BC + 2 * tq, mem_len, mask, row_count, row_cand);
        }
        __syncwarp();
        topk_compact_rows<Tr::BC>(p, k, count, threshold, wrow0, q0, row0, last, lane);
    }
}

} // namespace sm90
} // namespace lf

// The Hopper selection kernel for element type T at tile width D (head dims up to D whose strides
// a tensor map takes, zero-filled past the head dim).
#define LF_DEFINE_TOPK_SELECT_SM90_KERNEL(NAME, T, D)                                             \
    using NAME##_traits = lf::sm90::TopkSm90Traits<T, D>;                                         \
    extern "C" __global__ void __launch_bounds__(LF_TOPK_SM90_THREADS, 1)                         \
        NAME(const __grid_constant__ LfMemoryTopkSm90Params p) {                                  \
        lf::sm90::topk_select<NAME##_traits>(p);                                                  \
    }
