// Which work items (query tile, head, batch entry) a Hopper CTA runs, in what order: the
// schedule around the mainloop (cuda/sm90/mainloop.cuh), shared by the exact, block-sparse and
// RoPE kernels.
#pragma once

#include "mainloop.cuh"

namespace lf {
namespace sm90 {

// Runs item(qt, h, b, pipe) for every query tile, head and batch entry of the call. The default
// grid is one CTA per item (x: query tiles, last first so that the longest rows under a causal
// mask start first; y: heads; z: batch): the CTAs resident at one time share a few heads' keys,
// which stay in L2. Built with LF_SM90_PERSISTENT=1, a CTA also runs the items gridDim.x *
// gridDim.y * gridDim.z further on, keeping its barriers, registers and K/V ring from one to the
// next: the host may then launch fewer CTAs than items (a grid sized to the GPU), and a CTA's
// next Q and keys load while it finishes the previous item. The persistent order keeps the same
// locality: (head, batch) pairs in groups whose keys and values fit a share of L2
// (kL2GroupBytes), a group's items tiles-last-first across its heads, one group after the other.
#ifdef LF_SM90_L2_GROUP_BYTES
constexpr int64_t kL2GroupBytes = LF_SM90_L2_GROUP_BYTES;
#else
constexpr int64_t kL2GroupBytes = 32ll << 20;
#endif

// The schedules (for_each_item's Sched): one item per CTA; persistent in L2 groups (above);
// persistent in zigzag slots: two items of one (head, batch) pair per slot, query tiles
// n_qt - 1 - k and k (one tile for the middle of an odd count), pair-major, the slots dealt
// round-robin. Under a causal mask a slot's two items hold n_qt + 1 key tiles together
// (bottom-right alignment adds the same to both), so every CTA's rounds weigh the same, and the
// CTAs running at one time share a few pairs' keys, as in the one-item grid. The zigzag kernels
// (fwd_zz_sm90_*) are always built with it; LF_SM90_PERSISTENT=1 at build time makes every other
// Hopper kernel persistent too (LF_SM90_ZIGZAG=1: in zigzag slots).
struct OneItemSched {
    static constexpr bool kPersistent = false;
};
struct GroupedSched {
    static constexpr bool kPersistent = true;
};
struct ZigzagSched {
    static constexpr bool kPersistent = true;
};
#if defined(LF_SM90_PERSISTENT) && LF_SM90_PERSISTENT
#if defined(LF_SM90_ZIGZAG) && LF_SM90_ZIGZAG
using DefaultSched = ZigzagSched;
#else
using DefaultSched = GroupedSched;
#endif
#else
using DefaultSched = OneItemSched;
#endif

template <class Tr, class Sched = DefaultSched, class Item>
__device__ __forceinline__ void for_each_item(const LfFwdParams &p, const Item &item) {
    if constexpr (!Sched::kPersistent) {
        item(gridDim.x - 1 - blockIdx.x, blockIdx.y, blockIdx.z, OnePipe{}, BothRoles{});
    } else {
        init_barriers<Tr, true>();
        // Item counts in 64 bits: the host allows more items than an int holds.
        const int n_qt = (p.mask.seqlen_q + Tr::BR - 1) / Tr::BR;
        const int64_t hb = static_cast<int64_t>(p.heads_q) * p.batch;
        const int64_t ctas = static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z;
        const int64_t first =
            blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + gridDim.y * blockIdx.z);
        // Each warpgroup loops over the items in its own role, so each loop's registers are
        // allocated for that role's budget.
        auto each = [&](auto role) {
            Pipe pipe;
            if constexpr (std::is_same<Sched, ZigzagSched>::value) {
                // 32-bit counts (the host launches the zigzag kernels only for calls of at most
                // 2^29 items, so that pair + dpair + 1 <= 3 pairs stays in range; the
                // LF_SM90_ZIGZAG build option, an experiment, has no such check) and no division
                // in the loop but the pair's head and batch: CTA c
                // runs slot c, c + ctas, ...; in round r the first (r even) or second item of
                // its slot. A slot is (pair, k): slot = pair * half + k.
                const int half = (n_qt + 1) / 2;
                const int c = static_cast<int>(first), n = static_cast<int>(ctas);
                const int dpair = n / half, dk = n - dpair * half;
                int pair = c / half, k = c - (c / half) * half;
                const int pairs = static_cast<int>(hb);
                // One call site of the item, so that its body is inlined once.
                for (int r = 0; pair < pairs; ++r) {
                    const bool second = r & 1;
                    const int qt = second ? k : n_qt - 1 - k;
                    if (!second || qt != n_qt - 1 - k) // the middle tile of an odd count: once
                        item(qt, pair % p.heads_q, pair / p.heads_q, pipe, role);
                    if (second) {
                        k += dk;
                        pair += dpair;
                        if (k >= half) {
                            k -= half;
                            ++pair;
                        }
                    }
                }
            } else {
                const int64_t total = n_qt * hb;
                const int64_t kv_bytes = static_cast<int64_t>(p.mask.seqlen_k) * Tr::D * 2 * 2;
                int64_t group = kL2GroupBytes / (kv_bytes > 0 ? kv_bytes : 1);
                group = group < 1 ? 1 : (group > hb ? hb : group);
                const int64_t group_items = n_qt * group;
                for (int64_t i = first; i < total; i += ctas) {
                    // Group g holds pairs [g * group, g * group + size); the last may be smaller.
                    const int64_t g = i / group_items, r = i % group_items;
                    const int64_t size = hb - g * group < group ? hb - g * group : group;
                    const int qt = n_qt - 1 - static_cast<int>(r / size);
                    const int64_t pair = g * group + r % size;
                    const int h = static_cast<int>(pair % p.heads_q);
                    const int b = static_cast<int>(pair / p.heads_q);
                    item(qt, h, b, pipe, role);
                }
            }
        };
        if (threadIdx.x < 128) {
            regs_dec<Tr::kProducerRegs>();
            each(ProducerRole{});
        } else {
            regs_inc<Tr::kConsumerRegs>();
            each(ConsumerRole{});
        }
    }
}

} // namespace sm90
} // namespace lf

// A persistent build marks each kernel NAME with an empty kernel NAME_persistent, which the host
// looks up before launching fewer CTAs than items: a kernel without it runs one item per CTA.
#if defined(LF_SM90_PERSISTENT) && LF_SM90_PERSISTENT
#define LF_SM90_PERSISTENT_MARKER(NAME)                                                           \
    extern "C" __global__ void NAME##_persistent() {}
#else
#define LF_SM90_PERSISTENT_MARKER(NAME)
#endif
