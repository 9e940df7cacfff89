// The RoPE / ReRoPE / Leaky ReRoPE causal forward on Hopper (sm_90a): the Hopper mainloop with
// the RoPE policies (cuda/policies/rope.cuh) over the dense causal/window plan or a block mask's
// row. Keys come rotated from the workspaces of the key pass (lf_rope_keys), through tensor
// maps; each consumer warp rotates its own Q rows in shared memory (TMA layout). Two Q variants
// and the K/V ring must fit in shared memory: head dims 64 and 128.
#pragma once

#include <type_traits>

#include "policies/iterators.cuh"
#include "policies/masks.cuh"
#include "policies/rope.cuh"
#include "policies/sources.cuh"
#include "sm90/mainloop.cuh"
#include "sm90/schedule.cuh"

namespace lf {
namespace sm90 {

template <class Tr, bool kSparse>
__device__ __forceinline__ void rope_fwd(const LfRopeFwdSm90Params &pr) {
    const LfFwdParams &p = pr.base.fwd;
    for_each_item<Tr>(p, [&](int qt, int h, int b, auto &&pipe, auto role) {
        using Base = typename std::conditional<kSparse, CsrIter, WindowIter>::type;
        const Base base = make_base<Base>(p, qt, Tr::BR, Tr::BC, b, h);
        ReRopeIter<Base> iter(base, p.mask, pr.rope, qt, Tr::BR, Tr::BC);
        ReRopeMask mask{p.mask, pr.rope.window};
        const int hk = h / (p.heads_q / p.heads_kv);
        TmaKeys keys{&pr.base.tma_k, &pr.tma_k_alt, hk, b};
        RopeQPrep<Tr> prep{&pr.rope, p.mask.seqlen_q, p.mask.seqlen_k, b};
        attention_fwd_tile<Tr>(p, pr.base.tma_q, pr.base.tma_v, iter, mask, keys, prep, qt, h,
                               b, DensePlace{b}, pipe, role);
    });
}

} // namespace sm90
} // namespace lf

#define LF_DEFINE_ROPE_SM90_KERNEL(NAME, T, D)                                                    \
    using NAME##_traits = lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_D##D, 2>;                     \
    extern "C" __global__ void __launch_bounds__(LF_FWD_SM90_THREADS, 1)                          \
        NAME(const __grid_constant__ LfRopeFwdSm90Params p) {                                     \
        lf::sm90::rope_fwd<NAME##_traits, false>(p);                                              \
    }                                                                                             \
    LF_SM90_PERSISTENT_MARKER(NAME)

// The same over a block mask's listed blocks (64-key tiles).
#define LF_DEFINE_ROPE_SPARSE_SM90_KERNEL(NAME, T, D)                                             \
    using NAME##_traits = lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_SPARSE, 2>;                   \
    extern "C" __global__ void __launch_bounds__(LF_FWD_SM90_THREADS, 1)                          \
        NAME(const __grid_constant__ LfRopeFwdSm90Params p) {                                     \
        lf::sm90::rope_fwd<NAME##_traits, true>(p);                                               \
    }                                                                                             \
    LF_SM90_PERSISTENT_MARKER(NAME)
