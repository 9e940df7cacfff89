// The variable-length (packed) forward on the sm_80 mainloop: each CTA finds its sequence's rows
// from the device prefix sums (clamped, so that a bad entry can move rows but never leave the
// tensors; such entries are flagged), then runs the dense plan of that sequence alone.
#pragma once

#include "fwd.cuh"
#include "varlen_seq.cuh"

namespace lf {

// The LSE of packed rows, [heads_q, total_q]: row 0 of head h of a sequence starting at packed
// row `start`.
struct VarlenLse {
    int64_t total_q, start;
    __device__ __forceinline__ int64_t operator()(const LfFwdParams &, int, int h, int) const {
        return h * total_q + start;
    }
};

template <class Tr> __device__ __forceinline__ void varlen_fwd(const LfVarlenParams &vp) {
    const int qt = gridDim.x - 1 - blockIdx.x; // longest rows first under a causal mask
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const VarlenSeq s = varlen_sequence(vp, b);
    if (qt * Tr::BR >= s.len_q) return; // the whole CTA, before any barrier
    const LfFwdParams p = varlen_item_params(vp, s);
    window_item<Tr>(p, qt, h, 0, VarlenLse{vp.total_q, s.q_lo});
}

} // namespace lf

// The varlen kernel NAME for element type T and head dimension D (the dense kernel's tiles;
// PADDED for a head narrower than D, as LF_DEFINE_FWD_KERNEL).
#define LF_DEFINE_VARLEN_KERNEL(NAME, T, D, PADDED)                                               \
    using NAME##_traits =                                                                         \
        lf::FwdTraits<T, D, LF_FWD_BR_D##D, LF_FWD_BC_D##D, LF_FWD_WARPS, 1, PADDED>;            \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfVarlenParams p) {                                          \
        lf::varlen_fwd<NAME##_traits>(p);                                                         \
    }
