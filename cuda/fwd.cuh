// The exact and block-sparse forward kernels: the sm_80 mainloop over the dense plan or a block
// mask's CSR row, with plain scores.
#pragma once

#include "policies/iterators.cuh"
#include "policies/masks.cuh"
#include "policies/sources.cuh"
#include "sm80/mainloop.cuh"

namespace lf {

// One item of the dense / causal / sliding-window plan: query tile qt of head h, batch entry b,
// with the LSE rows where `lse_at` puts them (the varlen forward runs the same item on one
// sequence's rows).
template <class Tr, class LseAt = DenseLse>
__device__ __forceinline__ void window_item(const LfFwdParams &p, int qt, int h, int b,
                                            const LseAt &lse_at = LseAt{}) {
    WindowIter iter(p.mask, qt, Tr::BR, Tr::BC);
    WindowMask mask{p.mask};
    const int hk = h / (p.heads_q / p.heads_kv);
    PlainKeys keys{static_cast<const uint16_t *>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride,
                   p.k_row_stride};
    attention_fwd_tile<Tr, WindowIter, WindowMask, PlainScore>(p, iter, mask, keys, NoQPrep{}, qt,
                                                              h, b, lse_at);
}

// Dense / causal / sliding-window forward, one CTA per (query tile, head, batch). Query tiles are
// scheduled last first: under a causal mask they have the most key tiles.
template <class Tr> __device__ __forceinline__ void window_fwd(const LfFwdParams &p) {
    window_item<Tr>(p, gridDim.x - 1 - blockIdx.x, blockIdx.y, blockIdx.z);
}

// Block-sparse forward: the same skeleton over the key blocks listed for each query block.
template <class Tr> __device__ __forceinline__ void sparse_fwd(const LfFwdParams &p) {
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    CsrIter iter(p.sparse, qt, Tr::BR, b, h);
    WindowMask mask{p.mask};
    const int hk = h / (p.heads_q / p.heads_kv);
    PlainKeys keys{static_cast<const uint16_t *>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride,
                   p.k_row_stride};
    attention_fwd_tile<Tr, CsrIter, WindowMask, PlainScore>(p, iter, mask, keys, NoQPrep{}, qt, h,
                                                           b);
}

} // namespace lf

// Defines the extern "C" kernel NAME for element type T and head dimension D, with the tile shape
// and warp count of tile_plan.h (LF_FWD_BR_D<D> x LF_FWD_BC_D<D>, LF_FWD_WARPS). PADDED: for a
// head dim narrower than D (a multiple of 4), its columns past the head zero-filled on load and
// not stored.
#define LF_DEFINE_FWD_KERNEL(NAME, T, D, PADDED)                                                  \
    using NAME##_traits =                                                                         \
        lf::FwdTraits<T, D, LF_FWD_BR_D##D, LF_FWD_BC_D##D, LF_FWD_WARPS, 1, PADDED>;            \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfFwdParams p) {                                             \
        lf::window_fwd<NAME##_traits>(p);                                                         \
    }

// The block-sparse variant of the same kernel (key blocks of the tile's width).
#define LF_DEFINE_SPARSE_KERNEL(NAME, T, D)                                                       \
    using NAME##_traits = lf::FwdTraits<T, D, LF_FWD_BR_D##D, LF_FWD_BC_D##D, LF_FWD_WARPS>;     \
    static_assert(LF_FWD_BC_D##D == LF_SPARSE_K_BLOCK && LF_SPARSE_Q_BLOCK % LF_FWD_BR_D##D == 0, \
                  "sparse blocks must be whole kernel tiles");                                  \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfFwdParams p) {                                             \
        lf::sparse_fwd<NAME##_traits>(p);                                                         \
    }
