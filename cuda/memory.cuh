// Memory attention (Focused Transformer / LongLLaMA memory layers) on the sm_80 mainloop: a
// query tile's local key tiles (causal, queries and local keys rotated with plain RoPE at their
// positions) and then the memory's tiles (raw keys, never rotated, and a per-entry mask) share
// one online softmax; see cuda/policies/memory.cuh for the items, masks and sources.
#pragma once

#include "fwd.cuh"
#include "policies/memory.cuh"

namespace lf {

template <class Tr> __device__ __forceinline__ void memory_fwd(const LfMemoryFwdParams &pm) {
    const LfFwdParams &p = pm.fwd;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int hk = h / (p.heads_q / p.heads_kv);
    MemoryIter iter(pm, qt, Tr::BR, Tr::BC);
    MemoryMask mask{&pm, b};
    MemoryKeys keys{&pm, b, hk};
    MaybeRopeQPrep<Tr> prep{RopeQPrep<Tr>{&pm.rope, p.mask.seqlen_q, p.mask.seqlen_k, b},
                            pm.rotate != 0};
    attention_fwd_tile<Tr, MemoryIter, MemoryMask, PlainScore>(p, iter, mask, keys, prep, qt, h,
                                                              b);
}

} // namespace lf

// Memory attention for element type T at tile width D (PADDED: head dims narrower than D, a
// multiple of 4, zero-filled on load, e.g. LongLLaMA-3B's 100 in the 128-wide tile).
#define LF_DEFINE_MEMORY_KERNEL(NAME, T, D, PADDED)                                               \
    using NAME##_traits =                                                                         \
        lf::FwdTraits<T, D, LF_FWD_BR_D##D, LF_FWD_BC_D##D, LF_FWD_WARPS, 1, PADDED>;            \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfMemoryFwdParams p) {                                       \
        lf::memory_fwd<NAME##_traits>(p);                                                         \
    }
