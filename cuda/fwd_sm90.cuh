// The exact and block-sparse forwards on Hopper (sm_90a): the Hopper mainloop over the dense plan
// (dense, causal, sliding window) or a block mask's CSR row, with TMA key loads. Compiled only for
// sm_90a (see build.rs).
#pragma once

#include "policies/iterators.cuh"
#include "policies/masks.cuh"
#include "policies/sources.cuh"
#include "sm90/mainloop.cuh"
#include "sm90/schedule.cuh"

namespace lf {
namespace sm90 {

// The key tiles of key-value head hk, batch entry b of the dense parameters' tensor map (a
// padded head's flat map at its first column: Sm90Traits::map_head, map_col).
template <class Tr>
__device__ __forceinline__ TmaKeys dense_keys(const LfFwdSm90Params &pp, int hk, int b) {
    return TmaKeys{&pp.tma_k, &pp.tma_k, Tr::map_head(hk), b, 0,
                   Tr::map_col(hk, pp.fwd.k_head_stride)};
}

template <class Tr, class Sched = DefaultSched>
__device__ __forceinline__ void window_fwd(const LfFwdSm90Params &pp) {
    const LfFwdParams &p = pp.fwd;
    for_each_item<Tr, Sched>(p, [&](int qt, int h, int b, auto &&pipe, auto role) {
        WindowIter iter(p.mask, qt, Tr::BR, Tr::BC);
        WindowMask mask{p.mask};
        const int hk = h / (p.heads_q / p.heads_kv);
        attention_fwd_tile<Tr>(p, pp.tma_q, pp.tma_v, iter, mask, dense_keys<Tr>(pp, hk, b),
                               NoQPrep{}, qt, h, b, DensePlace{b}, pipe, role);
    });
}

// The dense plan with a per-key mask (LfFwdKeyMaskSm90Params): a masked memory's pass, the
// memory's keys hidden where its byte is 0, one item per CTA.
template <class Tr> __device__ __forceinline__ void keymask_fwd(const LfFwdKeyMaskSm90Params &pk) {
    const LfFwdSm90Params &pp = pk.base;
    const LfFwdParams &p = pp.fwd;
    for_each_item<Tr, OneItemSched>(p, [&](int qt, int h, int b, auto &&pipe, auto role) {
        WindowIter iter(p.mask, qt, Tr::BR, Tr::BC);
        KeyBytesMask mask;
        mask.m = p.mask;
        mask.bytes = pk.key_mask + b * pk.key_mask_batch_stride;
        const int hk = h / (p.heads_q / p.heads_kv);
        attention_fwd_tile<Tr>(p, pp.tma_q, pp.tma_v, iter, mask, dense_keys<Tr>(pp, hk, b),
                               NoQPrep{}, qt, h, b, DensePlace{b}, pipe, role);
    });
}

// Block-sparse: the key blocks a block mask lists for the query block (query tile = query block
// of 128 rows, key tile = key block of 64 keys).
template <class Tr> __device__ __forceinline__ void sparse_fwd(const LfFwdSm90Params &pp) {
    static_assert(Tr::BR == LF_SPARSE_Q_BLOCK && Tr::BC == LF_SPARSE_K_BLOCK,
                  "tiles are the mask's blocks");
    const LfFwdParams &p = pp.fwd;
    for_each_item<Tr>(p, [&](int qt, int h, int b, auto &&pipe, auto role) {
        CsrIter iter(p.sparse, qt, Tr::BR, b, h);
        WindowMask mask{p.mask};
        const int hk = h / (p.heads_q / p.heads_kv);
        attention_fwd_tile<Tr>(p, pp.tma_q, pp.tma_v, iter, mask, dense_keys<Tr>(pp, hk, b),
                               NoQPrep{}, qt, h, b, DensePlace{b}, pipe, role);
    });
}

} // namespace sm90
} // namespace lf

// Defines the extern "C" Hopper kernel NAME for element type T and head dimension D, with the tile
// shape of tile_plan.h (LF_FWD_SM90_BR x LF_FWD_SM90_BC_D<D>).
#define LF_DEFINE_FWD_SM90_KERNEL(NAME, T, D)                                                     \
    LF_DEFINE_FWD_SM90_KERNEL_SHAPE(NAME, T, D, (lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_D##D>))

// The same with three consumer warpgroups (LF_FWD_SM90_BR_TALL query rows).
#define LF_DEFINE_FWD_TALL_SM90_KERNEL(NAME, T, D)                                                \
    LF_DEFINE_FWD_SM90_KERNEL_SHAPE(NAME, T, D,                                                   \
                                    (lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_D##D, 1, 3>))

// The 128-row kernel as a persistent grid in zigzag slots (cuda/sm90/schedule.cuh, ZigzagSched):
// the host launches one CTA per SM for calls of few key tiles per item, where the one-item grid
// pays each item's start and end on its own.
#define LF_DEFINE_FWD_ZZ_SM90_KERNEL(NAME, T, D)                                                  \
    using NAME##_traits = lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_D##D>;                        \
    extern "C" __global__ void __launch_bounds__(LF_FWD_SM90_THREADS, 1)                          \
        NAME(const __grid_constant__ LfFwdSm90Params p) {                                         \
        lf::sm90::window_fwd<NAME##_traits, lf::sm90::ZigzagSched>(p);                            \
    }

#define LF_SM90_UNPAREN(...) __VA_ARGS__
#define LF_DEFINE_FWD_SM90_KERNEL_SHAPE(NAME, T, D, TRAITS)                                       \
    using NAME##_traits = LF_SM90_UNPAREN TRAITS;                                                 \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads, 1)                      \
        NAME(const __grid_constant__ LfFwdSm90Params p) {                                         \
        lf::sm90::window_fwd<NAME##_traits>(p);                                                   \
    }                                                                                             \
    LF_SM90_PERSISTENT_MARKER(NAME)

// The dense kernel for a head narrower than its tile (p.head_dim, a multiple of 4 in
// (D - 64, D)): Sm90Traits' kPadded, over flat tensor maps.
#define LF_DEFINE_FWD_PADDED_SM90_KERNEL(NAME, T, D)                                              \
    LF_DEFINE_FWD_SM90_KERNEL_SHAPE(NAME, T, D,                                                   \
                                    (lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_D##D, 1, 2, true>))

// The Hopper kernel with a per-key mask (128-row tiles, one item per CTA), and the same for a
// head narrower than its tile (as LF_DEFINE_FWD_PADDED_SM90_KERNEL).
#define LF_DEFINE_KEYMASK_SM90_KERNEL(NAME, T, D)                                                 \
    LF_DEFINE_KEYMASK_SM90_KERNEL_SHAPE(NAME, (lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_D##D>))
#define LF_DEFINE_KEYMASK_PADDED_SM90_KERNEL(NAME, T, D)                                          \
    LF_DEFINE_KEYMASK_SM90_KERNEL_SHAPE(                                                          \
        NAME, (lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_D##D, 1, 2, true>))
#define LF_DEFINE_KEYMASK_SM90_KERNEL_SHAPE(NAME, TRAITS)                                         \
    using NAME##_traits = LF_SM90_UNPAREN TRAITS;                                                 \
    extern "C" __global__ void __launch_bounds__(LF_FWD_SM90_THREADS, 1)                          \
        NAME(const __grid_constant__ LfFwdKeyMaskSm90Params p) {                                  \
        lf::sm90::keymask_fwd<NAME##_traits>(p);                                                  \
    }

// The block-sparse Hopper kernel (key tiles of LF_FWD_SM90_BC_SPARSE keys).
#define LF_DEFINE_SPARSE_SM90_KERNEL(NAME, T, D)                                                  \
    using NAME##_traits = lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_SPARSE>;                      \
    extern "C" __global__ void __launch_bounds__(LF_FWD_SM90_THREADS, 1)                          \
        NAME(const __grid_constant__ LfFwdSm90Params p) {                                         \
        lf::sm90::sparse_fwd<NAME##_traits>(p);                                                   \
    }                                                                                             \
    LF_SM90_PERSISTENT_MARKER(NAME)
