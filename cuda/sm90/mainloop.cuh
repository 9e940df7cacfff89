// The Hopper (sm_90a) forward mainloop: TMA loads into a ring of K/V stages tracked by
// mbarriers, wgmma for S = Q K^T (both operands from shared memory) and O += P V (P from
// registers), and warp specialization: one producer warpgroup runs the tile iterator and issues
// the loads, two consumer warpgroups of 64 query rows each compute. The policies are those of
// the sm_80 mainloop (cuda/policies/): the same tile iterators, element masks and Q
// preparation, and the same online-softmax arithmetic (cuda/common.cuh), so both mainloops
// compute the same function with the same rounding points.
//
//   Traits  tile shape and element type (Sm90Traits)
//   Iter    which key tiles a query tile visits, last to first, and whether each is full
//   Mask    which (row, key) elements are visible inside a partial tile (and, with kKeyBytes,
//           which keys of every tile)
//   Keys    the tensor maps an item's key tile is loaded from (TmaKeys)
//   QPrep   what happens to the loaded Q tile (through Traits::Tile, the TMA layout)
//
// Accumulators follow wgmma's layout: in a consumer warpgroup, warp w owns rows 16w..16w+15;
// thread (g = lane / 4, t = lane % 4) holds, for each 8-column block j, columns 8j + 2t and
// 8j + 2t + 1 of rows 16w + g (registers 4j, 4j + 1) and 16w + g + 8 (4j + 2, 4j + 3): the
// layout of mma.sync's accumulators, so masks and the softmax read the same way as on sm_80.
#pragma once

#include <type_traits>

#include "../common.cuh"
#include "../sm80/primitives.cuh"
#include "../softmax.cuh"
#include "longflash/params.h"
#include "longflash/tile_plan.h"
#include "primitives.cuh"
#include "wgmma_ops.cuh"

namespace lf {
namespace sm90 {

template <typename T_, int D_, int BC_, int QVARIANTS_ = 1, int CONSUMERS_ = 2, bool PADDED_ = false>
struct Sm90Traits {
    using T = T_;
    static constexpr int D = D_;
    // Consumer warpgroups of 64 query rows each: two (LF_FWD_SM90_BR rows, the default) or three
    // (LF_FWD_SM90_BR_TALL rows: more softmax to hide behind the other warpgroups' tensor-core
    // work where a tile's matrix products are short, at head dim 64).
    static constexpr int kConsumerWGs = CONSUMERS_;
    static constexpr int BR = 64 * CONSUMERS_;
    static constexpr int BC = BC_;
    static constexpr int kStages = LF_FWD_SM90_STAGES;
    static constexpr int kThreads = 128 * (1 + CONSUMERS_); // producer + consumer warpgroups
    static constexpr int kConsumerWarps = 4 * CONSUMERS_;
    static_assert(CONSUMERS_ == 2 || CONSUMERS_ == 3, "two or three consumer warpgroups");
    static_assert(CONSUMERS_ != 2 || (BR == LF_FWD_SM90_BR && kThreads == LF_FWD_SM90_THREADS),
                  "the default tile is tile_plan.h's");
    static_assert(CONSUMERS_ != 3 || BR == LF_FWD_SM90_BR_TALL, "the tall tile is tile_plan.h's");
    // Named barriers: 1 + warpgroup for a warpgroup's own Q preparation, then one per consumer
    // warpgroup for the ping-pong turns.
    static constexpr int kTurnBarrier = 1 + CONSUMERS_;
    static constexpr int kWarpRows = 16; // query rows per consumer warp (Q preparation)
    static constexpr int kQVariants = QVARIANTS_;
    static constexpr int kQBytes = BR * D * 2;
    static constexpr int kKVBytes = BC * D * 2;
    static constexpr int kKOff = kQVariants * kQBytes;
    static constexpr int kVOff = kKOff + kStages * kKVBytes;
    static constexpr int kBarOff = kVOff + kStages * kKVBytes;
    // Q, then per stage: K landed, V landed, stage free (its K free with kSplitRelease), V free
    // (kSplitRelease only), then Q free (persistent schedule only); the addresses are kept
    // either way. A padded head's kernels add one per stage: K ready (its extra columns zeroed).
    static constexpr int kBars = 2 + 4 * kStages + (PADDED_ ? kStages : 0);
    // Dynamic shared memory to ask for: the tiles, the barriers, and slack to align the base to
    // the 1024 bytes of a swizzle atom.
    static constexpr int kSmemBytes = kBarOff + kBars * 8 + 1024;
    static constexpr int kProducerRegs = 24;
    // Overlap S of tile n with P V of tile n - 1, the consumer warpgroups taking turns to issue
    // (ping-pong), with a stage's K released when S is done with it and its V when P V is, so the
    // next keys load while P V still reads V: the schedule up to head dim
    // LF_FWD_SM90_PINGPONG_MAX_D (tile_plan.h); above it one tile at a time, both released after
    // P V. Build options override it for experiments: LF_SM90_OVERLAP=0|1|2 (plain, ping-pong,
    // overlap without turns) and LF_SM90_SPLIT_RELEASE=0|1.
    static constexpr bool kDefaultOverlap = D <= LF_FWD_SM90_PINGPONG_MAX_D;
#ifdef LF_SM90_OVERLAP
    static constexpr bool kOverlap = LF_SM90_OVERLAP != 0;
    static constexpr bool kPingPong = LF_SM90_OVERLAP == 1;
#else
    static constexpr bool kOverlap = kDefaultOverlap;
    static constexpr bool kPingPong = kDefaultOverlap;
#endif
#ifdef LF_SM90_SPLIT_RELEASE
    static constexpr bool kSplitRelease = LF_SM90_SPLIT_RELEASE != 0;
#else
    static constexpr bool kSplitRelease = kDefaultOverlap;
#endif
    // Registers per consumer thread after the producer gives its own back (setmaxnreg): the
    // CTA's registers over its consumer threads, the producer keeping kProducerRegs.
    static constexpr int kConsumerRegs = CONSUMERS_ == 2 ? 240 : 160;
    // At most what the CTA holds (its launch bounds' 65536 / threads, rounded down to 8 a
    // thread), not the register file: a consumer's setmaxnreg.inc waits until the producer's
    // dec has given back what it asks for, so asking for more waits forever.
    static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * CONSUMERS_ <=
                      65536 / kThreads / 8 * 8 * kThreads,
                  "registers");
    // Q as wgmma A fragments in registers (loaded once per item with ldmatrix) rather than read
    // from shared memory by every S: S then reads only K from shared memory. One Q variant and
    // head dims up to 128 (the registers it takes); LF_SM90_Q_REGS=0 at build time turns it off.
#if defined(LF_SM90_Q_REGS) && !LF_SM90_Q_REGS
    static constexpr bool kQRegs = PADDED_; // a padded head needs them
#else
    static constexpr bool kQRegs = QVARIANTS_ == 1 && D_ <= 128 && CONSUMERS_ == 2;
#endif
    // A head narrower than D (p.head_dim = d, a multiple of 4 above D - 64; kPadded): its tiles
    // are D wide, loaded through "flat" tensor maps (src/attention/sm90.rs), whose first
    // coordinate runs along a row across all its heads, head h from column h * head_stride, so
    // that a head of 200 bytes needs no 16-byte head stride. A TMA box starts on 16 bytes: a
    // head's tile starts at the multiple of 8 columns at or below its first column, which then
    // sits `shift` = (h * head_stride) % 8 columns in (0 or 4); the columns before and after
    // the head hold its neighbours' values (zeros past the row's end). Q's fragments are built
    // from its tile with its columns moved to K's shift and zeros around them; K's columns
    // outside the head are zeroed in shared memory by the producer warpgroup's other warps
    // before S reads them (kready), so that no other head's value enters a product, not even
    // a NaN; V's extra columns make O columns that the epilogue does not write (it writes the
    // head's d columns from V's shift on).
    static constexpr bool kPadded = PADDED_;
    static_assert(!kPadded || kQRegs, "a padded head builds Q's fragments itself");
    // The tensor maps' head coordinate, first column and shift of head h of a tensor of head
    // stride `stride` (elements): (h, 0, 0) in the 4-D maps, (0, h * stride rounded down to 8,
    // the rest) in the flat ones.
    static __device__ __forceinline__ int map_head(int h) { return kPadded ? 0 : h; }
    static __device__ __forceinline__ int map_col(int h, int64_t stride) {
        return kPadded ? static_cast<int>(h * stride) & ~7 : 0;
    }
    static __device__ __forceinline__ int col_shift(int h, int64_t stride) {
        return kPadded ? static_cast<int>(h * stride) & 7 : 0;
    }
    using Tile = Sw128Tile<BR, D>;
    static_assert(BC == 64 || BC == 128, "S = Q K^T is m64n<BC>");
    static_assert(D == 64 || D == 128 || D == 256, "O += P V is m64n<D>");
    static_assert(kQBytes % 1024 == 0 && kKVBytes % 1024 == 0, "swizzle atoms stay aligned");
};

// Key tiles from tensor maps: variant 0 from map 0, variant 1 from map 1 (RoPE's outside-window
// keys), at the maps' head coordinate hk of batch entry b, from column col (Traits::map_head and
// map_col of the key-value head), the item's keys starting at row `row0` (0 but for a packed
// sequence).
struct TmaKeys {
    const LfTensorMap *map0, *map1;
    int hk, b;
    int row0 = 0;
    int col = 0;
    __device__ __forceinline__ void prefetch() const {
        prefetch_tmap(map0);
        if (map1 != map0) prefetch_tmap(map1);
    }
    template <class Tr>
    __device__ __forceinline__ void load(int v, int kt, uint32_t dst, uint32_t bar) const {
        const LfTensorMap *map = v ? map1 : map0; // a select, not an indexed (local) array
        tma_load_tile<Tr::BC, Tr::D>(dst, map, bar, row0 + kt * Tr::BC, hk, b, col);
    }
};

// Where an item's rows are (a Place policy): the tensor-map coordinates of its first query row
// and first key (rows q_row0() and k_row0() of batch entry tma_b()), and where its outputs go:
// O from p.o + o_offset(p) (then head h's stride and the rows), the LSE from index
// lse_row0(p, h). An item (qt, h, b) of the dense plan starts at row 0 of entry b (DensePlace);
// a sequence of a packed batch at its prefix sums in entry 0 (cuda/varlen_sm90.cuh). Places
// compute on demand, so that nothing they give stays in a register through the mainloop.
struct DensePlace {
    int b;
    __device__ __forceinline__ int q_row0() const { return 0; }
    __device__ __forceinline__ int k_row0() const { return 0; }
    __device__ __forceinline__ int tma_b() const { return b; }
    __device__ __forceinline__ int64_t o_offset(const LfFwdParams &p) const {
        return static_cast<int64_t>(b) * p.o_batch_stride;
    }
    __device__ __forceinline__ int64_t lse_row0(const LfFwdParams &p, int h) const {
        return (static_cast<int64_t>(b) * p.heads_q + h) * p.mask.seqlen_q;
    }
};

// What a CTA carries from one work item (query tile, head, batch) to the next: how many key
// tiles its ring has taken (each stage's slot and phase) and how many Q tiles it has loaded (the
// Q barriers' phases). OnePipe is the one-item CTA of the default grid: every count a constant
// 0, so its code is that of a CTA that never had a previous item. Pipe is the persistent
// schedules' (cuda/sm90/schedule.cuh): a CTA runs several items of a grid the host sizes to the
// GPU.
struct OnePipe {
    static constexpr bool kPersistent = false;
    static constexpr int tiles = 0, q_loads = 0;
    __device__ __forceinline__ void advance(int) {}
};
struct Pipe {
    static constexpr bool kPersistent = true;
    int tiles = 0, q_loads = 0;
    __device__ __forceinline__ void advance(int n_tiles) {
        tiles += n_tiles;
        q_loads += n_tiles > 0;
    }
};

// Which warpgroups a call of attention_fwd_tile runs: both (the producer and the consumers
// branch inside, the default) or one (the persistent schedule calls each warpgroup's part in its
// own loop, so that the compiler allocates each loop's registers for its own role's budget).
struct BothRoles {
    static constexpr bool kProducer = true, kConsumer = true;
};
struct ProducerRole {
    static constexpr bool kProducer = true, kConsumer = false;
};
struct ConsumerRole {
    static constexpr bool kProducer = false, kConsumer = true;
};

// The producer warpgroup's warps that zero a padded head's extra K columns (all but the first).
constexpr int kFixWarps = 3;

// The dynamic shared memory's base (aligned to a swizzle atom) and its barriers' address.
template <class Tr> __device__ __forceinline__ uint32_t smem_base() {
    extern __shared__ __align__(1024) unsigned char smem[];
    return (smem_addr(smem) + 1023u) & ~1023u;
}

// Initializes the barriers (Q, then per stage K landed, V landed, stage free, V free, then Q
// free: kQFree, only a persistent schedule waits on it) and makes them visible to the whole CTA.
// Once per CTA.
template <class Tr, bool kQFree = false> __device__ __forceinline__ void init_barriers() {
    const uint32_t bars = smem_base<Tr>() + Tr::kBarOff;
    if (threadIdx.x == 0) {
        mbar_init(bars, 1);
        for (int s = 0; s < Tr::kStages; ++s) {
            mbar_init(bars + 8 * (1 + s), 1);
            mbar_init(bars + 8 * (1 + Tr::kStages + s), 1);
            mbar_init(bars + 8 * (1 + 2 * Tr::kStages + s), Tr::kConsumerWarps);
            if constexpr (Tr::kSplitRelease)
                mbar_init(bars + 8 * (1 + 3 * Tr::kStages + s), Tr::kConsumerWarps);
        }
        if constexpr (kQFree) mbar_init(bars + 8 * (1 + 4 * Tr::kStages), Tr::kConsumerWarps);
        if constexpr (Tr::kPadded)
            for (int s = 0; s < Tr::kStages; ++s)
                mbar_init(bars + 8 * (2 + 4 * Tr::kStages + s), kFixWarps);
        mbar_init_fence();
    }
    __syncthreads();
}

// One work item: the key tiles `iter` lists for query tile qt of head h, batch b, its rows and
// outputs where `at` says (Keys loads the keys from there too). With OnePipe it
// initializes the barriers and moves registers itself; with Pipe the kernel did both once.
template <class Tr, class Iter, class Mask, class Keys, class QPrep, class Place,
          class PipeT = OnePipe, class Role = BothRoles>
__device__ __forceinline__ void attention_fwd_tile(const LfFwdParams &p, const LfTensorMap &tma_q,
                                                   const LfTensorMap &tma_v, const Iter &iter,
                                                   const Mask &mask, const Keys &keys,
                                                   const QPrep &q_prep, int qt, int h, int b,
                                                   const Place &at, PipeT &&pipe = OnePipe{},
                                                   Role = Role{}) {
    using PipeKind = typename std::remove_reference<PipeT>::type;
    using T = typename Tr::T;
    using Elt = Elem<T>;
    const uint32_t base = smem_base<Tr>();
    const uint32_t sQ = base;
    const uint32_t bars = base + Tr::kBarOff;
    const uint32_t bar_q = bars;
    auto sK = [&](int s) { return base + Tr::kKOff + s * Tr::kKVBytes; };
    auto sV = [&](int s) { return base + Tr::kVOff + s * Tr::kKVBytes; };
    auto full_k = [&](int s) { return bars + 8 * (1 + s); };
    auto full_v = [&](int s) { return bars + 8 * (1 + Tr::kStages + s); };
    auto empty = [&](int s) { return bars + 8 * (1 + 2 * Tr::kStages + s); };
    auto empty_v = [&](int s) { return bars + 8 * (1 + 3 * Tr::kStages + s); };
    const uint32_t empty_q = bars + 8 * (1 + 4 * Tr::kStages);
    auto kready = [&](int s) { return bars + 8 * (2 + 4 * Tr::kStages + s); };
    // Ring slot and phase of this item's key tile n.
    auto stage = [&](int n) { return (pipe.tiles + n) % Tr::kStages; };
    auto phase = [&](int n) { return ((pipe.tiles + n) / Tr::kStages) & 1; };

    const int warpgroup = threadIdx.x / 128;
    const int q0 = qt * Tr::BR;
    const int hk = h / (p.heads_q / p.heads_kv);
    const int n_tiles = iter.count();

    if constexpr (!PipeKind::kPersistent) {
        // The tensor maps' fetches overlap the barriers' set-up.
        if (threadIdx.x == 0) {
            prefetch_tmap(&tma_q);
            prefetch_tmap(&tma_v);
            keys.prefetch();
        }
        init_barriers<Tr>();
    }

    if constexpr (Role::kProducer) {
        if (!Role::kConsumer || warpgroup == 0) {
            // Producer: one thread runs the tile iterator and issues every load.
            if constexpr (!PipeKind::kPersistent) regs_dec<Tr::kProducerRegs>();
            if (threadIdx.x == 0 && n_tiles > 0) {
                // The consumers are done with the previous item's Q (its last S has completed).
                if constexpr (PipeKind::kPersistent)
                    if (pipe.q_loads > 0) mbar_wait(empty_q, (pipe.q_loads - 1) & 1);
                mbar_expect_tx(bar_q, Tr::kQVariants * Tr::kQBytes);
#pragma unroll
                for (int v = 0; v < Tr::kQVariants; ++v)
                    tma_load_tile<Tr::BR, Tr::D>(sQ + v * Tr::kQBytes, &tma_q, bar_q,
                                                 at.q_row0() + q0, Tr::map_head(h), at.tma_b(),
                                                 Tr::map_col(h, p.q_head_stride));
                for (int n = 0; n < n_tiles; ++n) {
                    const int s = stage(n);
                    mbar_wait(empty(s), phase(n) ^ 1);
                    const int kt = iter.tile(n);
                    mbar_expect_tx(full_k(s), Tr::kKVBytes);
                    keys.template load<Tr>(iter.variant(n), kt, sK(s), full_k(s));
                    if constexpr (Tr::kSplitRelease) mbar_wait(empty_v(s), phase(n) ^ 1);
                    mbar_expect_tx(full_v(s), Tr::kKVBytes);
                    tma_load_tile<Tr::BC, Tr::D>(sV(s), &tma_v, full_v(s),
                                                 at.k_row0() + kt * Tr::BC, Tr::map_head(hk),
                                                 at.tma_b(), Tr::map_col(hk, p.v_head_stride));
                }
            }
            if constexpr (Tr::kPadded) {
                // The other warps zero each K tile's columns outside the head (8 bytes at a
                // time: the head's edges are multiples of 4 columns), then mark it ready.
                if (threadIdx.x >= 32 && threadIdx.x < 32 * (1 + kFixWarps)) {
                    // Thread t zeroes units t % 8 and t % 8 + 8 of rows t / 8 + 12 i (fewer than
                    // 16 units a row: the head is wider than D - 64), unit k being the k-th of
                    // the row's outside the head: before it (lo of them), then after it.
                    const int t = threadIdx.x - 32;
                    const int lo = Tr::col_shift(hk, p.k_head_stride) / 4;
                    const int units = (Tr::D - p.head_dim) / 4;
                    const int k0 = t & 7, k1 = k0 + 8;
                    const int c0 = 4 * (k0 < lo ? k0 : k0 + p.head_dim / 4);
                    const int c1 = k1 < units ? 4 * (k1 < lo ? k1 : k1 + p.head_dim / 4) : -1;
#pragma unroll 1
                    for (int n = 0; n < n_tiles; ++n) {
                        const int s = stage(n);
                        mbar_wait(full_k(s), phase(n));
                        if (k0 < units) {
#pragma unroll 1
                            for (int r = t >> 3; r < Tr::BC; r += 4 * kFixWarps) {
                                sts64_zero(sK(s) + Sw128Tile<Tr::BC, Tr::D>::offset(r, c0));
                                if (c1 >= 0)
                                    sts64_zero(sK(s) + Sw128Tile<Tr::BC, Tr::D>::offset(r, c1));
                            }
                        }
                        fence_proxy_async();
                        __syncwarp();
                        if (threadIdx.x % 32 == 0) mbar_arrive(kready(s));
                    }
                }
            }
            pipe.advance(n_tiles);
            return;
        }
    }

    // Consumers: warpgroup 1 owns query rows [0, 64) of the tile, warpgroup 2 rows [64, 128).
    if constexpr (!PipeKind::kPersistent) regs_inc<Tr::kConsumerRegs>();
    // Warp-uniform by construction; read through a shuffle from lane 0 so that the compiler
    // knows it too and keeps what derives from it (the Q descriptor) in uniform registers.
    const int cw = __shfl_sync(0xffffffffu, warpgroup - 1, 0);
    const int tid = threadIdx.x % 128;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int tq = lane & 3;
    const int row0 = cw * 64 + warp * 16 + g; // this thread's rows: row0 and row0 + 8
    const float scale_log2 = p.softmax_scale_log2;

    float o[Tr::D / 2];
#pragma unroll
    for (int i = 0; i < Tr::D / 2; ++i) o[i] = 0.f;
    float row_base[2] = {kNoBase, kNoBase}, row_sum[2] = {0.f, 0.f}, exp_sum[2] = {0.f, 0.f};

    // Shared-memory descriptors of this warpgroup's Q rows (variant 0), of stage 0's K tile and
    // of stage 0's V tile, built once; a stage, a Q variant or a k16 step moves them (desc_add).
    // K-major Q and K: a k16 step inside a 64-column block is 32 bytes, the next block is
    // ROWS * 128 bytes on. V is MN-major (head dim contiguous): 64-column blocks BC * 128 bytes
    // apart, a k16 step is 16 keys = 2048 bytes.
    const uint64_t desc_q = sw128_desc(sQ + cw * 64 * 128, 16, 1024);
    const uint64_t desc_k = sw128_desc(sK(0), 16, 1024);
    const uint64_t desc_v = sw128_desc(sV(0), Tr::BC * 128, 1024);

    // This warp's 16 Q rows as the A fragments of S's k16 steps (kQRegs).
    uint32_t qa[Tr::kQRegs ? Tr::D / 16 : 1][4];

    // The steps of one key tile; the schedules below order them.
    // Issues S = Q K^T of item n into sc (after its K stage has landed); commit follows.
    auto issue_s = [&](int n, float (&sc)[Tr::BC / 8][4]) {
        const int s = stage(n);
        mbar_wait(Tr::kPadded ? kready(s) : full_k(s), phase(n));
        const uint64_t dq = desc_add(desc_q, iter.variant(n) * Tr::kQBytes);
        const uint64_t dk = desc_add(desc_k, s * Tr::kKVBytes);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < Tr::D / 16; ++ks) {
            if constexpr (Tr::kQRegs)
                Wgmma<T>::template rk<Tr::BC>(reinterpret_cast<float(&)[Tr::BC / 2]>(sc), qa[ks],
                                              desc_add(dk, (ks >> 2) * Tr::BC * 128 + (ks & 3) * 32),
                                              ks > 0);
            else
                Wgmma<T>::template ss<Tr::BC>(
                    reinterpret_cast<float(&)[Tr::BC / 2]>(sc),
                    desc_add(dq, (ks >> 2) * Tr::BR * 128 + (ks & 3) * 32),
                    desc_add(dk, (ks >> 2) * Tr::BC * 128 + (ks & 3) * 32), ks > 0);
        }
        wgmma_commit();
    };
    // Masks item n's partial tile, moves the exponent base, turns sc into P (exponentials) and
    // adds them to the LSE sum (cuda/softmax.cuh, as on sm_80); returns through alpha the factors
    // O must be rescaled by and whether any row of the warp needs it.
    // kLse (a BoolTag): whether the exact exponentials' sums are kept (only the LSE reads them);
    // kw: what key_bytes gave for tile n (a per-key mask's bytes, Mask::kKeyBytes only).
    auto softmax = [&](int n, float (&sc)[Tr::BC / 8][4], float (&alpha)[2], auto kLse,
                       const auto &kw) {
        if constexpr (Mask::kKeyBytes) mask.template hide<Tr::BC>(sc, kw, tq);
        if (!iter.is_full(n)) {
            const int k0 = iter.tile(n) * Tr::BC;
#pragma unroll
            for (int r = 0; r < 2; ++r)
                mask_row(sc, r, tq, mask.row_keys(iter, n, q0 + row0 + r * 8, k0, Tr::BC));
        }
        bool rescale = false;
#pragma unroll
        for (int r = 0; r < 2; ++r)
            alpha[r] = move_base(row_base[r], row_sum[r], exp_sum[r], row_max(sc, r), scale_log2,
                                 rescale);
#pragma unroll
        for (int r = 0; r < 2; ++r)
            exp_row<Tr::BC / 8, decltype(kLse)::value>(sc, r, scale_log2, row_base[r], exp_sum[r]);
        return __any_sync(0xffffffffu, rescale);
    };
    // A per-key mask's bytes of item n's key tile (Mask::kKeyBytes; nothing otherwise, and
    // zeros past the last tile), loaded a tile ahead of their use so that the load's latency
    // hides behind the previous tile's work.
    auto key_bytes = [&](int n) {
        if constexpr (Mask::kKeyBytes) {
            typename Mask::template Bytes<Tr::BC> w{};
            if (n < n_tiles) w = mask.template load<Tr::BC>(iter.tile(n) * Tr::BC, lane);
            return w;
        } else {
            return 0u;
        }
    };
    // O *= alpha per row (no wgmma may be accumulating into O).
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int i = 0; i < Tr::D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
    };
    // P as the A fragments of the k16 steps of P V (cuda/softmax.cuh).
    auto pack = [&](const float (&sc)[Tr::BC / 8][4], uint32_t (&pa)[Tr::BC / 16][4]) {
#pragma unroll
        for (int kk = 0; kk < Tr::BC / 16; ++kk) pack_p<T>(sc, kk, pa[kk], row_sum[0], row_sum[1]);
    };
    // Issues O += P V of item n (after its V stage has landed).
    auto issue_pv = [&](int n, const uint32_t (&pa)[Tr::BC / 16][4]) {
        const int s = stage(n);
        mbar_wait(full_v(s), phase(n));
        const uint64_t dv = desc_add(desc_v, s * Tr::kKVBytes);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Tr::BC / 16; ++kk)
            Wgmma<T>::template rs<Tr::D>(o, pa[kk], desc_add(dv, kk * 2048), 1);
        wgmma_commit();
    };
    // This warp is done with key tile n's K (its S has completed): with kSplitRelease its slot
    // may load again now; after the item's last S, under the persistent schedule, Q may too.
    auto release_k = [&](int n) {
        if constexpr (Tr::kSplitRelease) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty(stage(n)));
        }
        if constexpr (PipeKind::kPersistent) {
            if (n == n_tiles - 1) {
                __syncwarp();
                if (lane == 0) mbar_arrive(empty_q);
            }
        }
    };
    // This warp is done with item n's stage (its warpgroup's wgmmas on it have completed): its V,
    // and its K too without kSplitRelease.
    auto release = [&](int n) {
        __syncwarp();
        if (lane == 0)
            mbar_arrive(Tr::kSplitRelease ? empty_v(stage(n)) : empty(stage(n)));
    };

    if (n_tiles > 0) {
        mbar_wait(bar_q, pipe.q_loads & 1);
        if constexpr (QPrep::kActive) {
            // Each warp rotates its own 16 rows, then the warpgroup's writes are published to
            // the tensor cores' (async) proxy.
            q_prep(sQ, cw * 64 + warp * 16, lane, q0);
            fence_proxy_async();
            named_barrier(1 + cw, 128);
        }
        if constexpr (Tr::kPadded) {
            // The fragments' column c is K's tile column c: head column c - (K's shift), at
            // Q's tile column c - (K's shift) + (Q's shift); zeros outside the head. Per register
            // i: row g + 8 (i & 1), column 2 tq + 8 (i >> 1) of the k16 step.
            const int r = cw * 64 + warp * 16 + g;
            const int sk = Tr::col_shift(hk, p.k_head_stride);
            const int moved = Tr::col_shift(h, p.q_head_stride) - sk;
#pragma unroll
            for (int ks = 0; ks < Tr::D / 16; ++ks)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int c = ks * 16 + 2 * tq + 8 * (i >> 1);
                    qa[ks][i] = c >= sk && c < sk + p.head_dim
                                    ? lds32(sQ + Tr::Tile::offset(r + 8 * (i & 1), c + moved))
                                    : 0u;
                }
        } else if constexpr (Tr::kQRegs) {
            // ldmatrix x4: lanes 0-15 address rows 0-15 at the step's first 8 columns, lanes
            // 16-31 the same rows 8 columns on; the four matrices are the A fragment's a0..a3.
            const int r = cw * 64 + warp * 16 + (lane & 15);
#pragma unroll
            for (int ks = 0; ks < Tr::D / 16; ++ks)
                ldmatrix_x4(qa[ks], sQ + Tr::Tile::offset(r, ks * 16 + (lane >> 4) * 8));
        }
    }

    float sc[Tr::BC / 8][4];
    uint32_t pa[Tr::BC / 16][4];
    float alpha[2];
    if constexpr (!Tr::kOverlap) {
        // One tile at a time: S, softmax, P V; the loop is built with and without the LSE's
        // sums, chosen once per launch.
        auto plain = [&](auto kLse) {
            auto kw_next = key_bytes(0);
            for (int n = 0; n < n_tiles; ++n) {
                const auto kw = kw_next;
                kw_next = key_bytes(n + 1);
                issue_s(n, sc);
                wgmma_wait<0>();
                fence_regs(sc);
                release_k(n);
                if (softmax(n, sc, alpha, kLse, kw)) rescale_o(alpha);
                pack(sc, pa);
                issue_pv(n, pa);
                wgmma_wait<0>();
                fence_regs(o);
                fence_regs(pa);
                release(n);
            }
        };
        if (p.lse != nullptr)
            plain(BoolTag<true>{});
        else
            plain(BoolTag<false>{});
    } else if (n_tiles > 0) {
        // S of tile n is computed while P V of tile n - 1 runs. With kPingPong the consumer
        // warpgroups take turns issuing (named barriers kTurnBarrier + warpgroup), so one's
        // softmax runs while another's tensor-core work does; warpgroup 1 issues first in each
        // round, and the arrivals are counted so that none is left pending at exit.
        auto overlapped = [&](auto kLse) {
            const auto kw0 = key_bytes(0);
            auto kw_next = key_bytes(1);
            issue_s(0, sc);
            wgmma_wait<0>();
            fence_regs(sc);
            release_k(0);
            softmax(0, sc, alpha, kLse, kw0); // O is still 0: nothing to rescale
            pack(sc, pa);
            for (int n = 1; n < n_tiles; ++n) {
                // Turns go round the consumer warpgroups: each waits for the one before it
                // (warpgroup 0, from n = 2, for the last one's previous turn) and hands over to
                // the next, but for the very first wait and the very last hand-over.
                constexpr int W = Tr::kConsumerWGs;
                const auto kw = kw_next;
                kw_next = key_bytes(n + 1);
                if (Tr::kPingPong && (cw != 0 || n > 1)) named_barrier(Tr::kTurnBarrier + cw, 256);
                issue_s(n, sc);
                issue_pv(n - 1, pa);
                if (Tr::kPingPong && (cw != W - 1 || n < n_tiles - 1))
                    asm volatile("bar.arrive %0, 256;\n" ::"r"(Tr::kTurnBarrier + (cw + 1) % W)
                                 : "memory");
                wgmma_wait<1>(); // S of tile n is done; P V of tile n - 1 may still run
                fence_regs(sc);
                release_k(n);
                const bool rescale = softmax(n, sc, alpha, kLse, kw);
                // Exponentials are never negative (a NaN compares false): the branch inside is
                // never taken, and the wait stays behind the softmax.
                wgmma_wait_all_after(sc[Tr::BC / 8 - 1][3] < 0.f);
                fence_regs(o);
                fence_regs(pa);
                release(n - 1);
                if (rescale) rescale_o(alpha);
                pack(sc, pa);
            }
            issue_pv(n_tiles - 1, pa);
            wgmma_wait<0>();
            fence_regs(o);
            fence_regs(pa);
            release(n_tiles - 1);
        };
        if (p.lse != nullptr)
            overlapped(BoolTag<true>{});
        else
            overlapped(BoolTag<false>{});
    }

    // Epilogue: O / l and LSE = base * ln(2) + ln(l), straight from registers; a row that saw
    // no key gives 0 and -inf.
    constexpr float kLn2 = 0.693147180559945309f;
    uint16_t *o_ptr = static_cast<uint16_t *>(p.o) + at.o_offset(p) + h * p.o_head_stride;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(row_sum[r]);
        const float le = quad_sum(exp_sum[r]);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        // This thread's row rebuilt from the thread index rather than kept through the mainloop:
        // at head dim 256 keeping it costs a spill, and so does, in a persistent CTA's item loop,
        // letting the compiler hoist it (the index is read here through asm volatile).
        unsigned tid_x;
        asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid_x));
        const int row = q0 + (static_cast<int>(tid_x) / 128 - 1) * 64 +
                        static_cast<int>(tid_x) % 128 / 32 * 16 + static_cast<int>(tid_x) % 32 / 4 +
                        r * 8;
        if (row < p.mask.seqlen_q) {
            uint16_t *dst = o_ptr + static_cast<int64_t>(row) * p.o_row_stride + tq * 2;
#pragma unroll
            for (int j = 0; j < Tr::D / 8; ++j) {
                const uint32_t packed = Elt::pack(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
                if constexpr (Tr::kPadded) {
                    // O's column c is V's tile column c: head column c - (V's shift).
                    const int c = j * 8 + tq * 2 - Tr::col_shift(hk, p.v_head_stride);
                    if (c >= 0 && c < p.head_dim)
                        *reinterpret_cast<uint32_t *>(dst + c - tq * 2) = packed;
                } else {
                    *reinterpret_cast<uint32_t *>(dst + j * 8) = packed;
                }
            }
            if (p.lse != nullptr && tq == 0) {
                const float lse = le > 0.f ? fmaf(row_base[r], kLn2, logf(le)) : -INFINITY;
                p.lse[at.lse_row0(p, h) + row] = lse;
            }
        }
    }
    pipe.advance(n_tiles);
}

} // namespace sm90
} // namespace lf
