// The variable-length (packed) forward on Hopper (sm_90a): each CTA finds its sequence from the
// device prefix sums (cuda/varlen_seq.cuh, clamped as on sm_80) and runs the Hopper mainloop over
// that sequence's dense plan, its rows read through tensor maps of the packed tensors (batch entry
// 0) from the sequence's first rows on. Rows a tile reads past the sequence's end belong to the
// next sequence (or are zeros past the tensor): the sequence's own lengths mask those keys and
// leave those query rows unwritten.
#pragma once

#include "policies/iterators.cuh"
#include "policies/masks.cuh"
#include "policies/sources.cuh"
#include "sm90/mainloop.cuh"
#include "varlen_seq.cuh"

namespace lf {
namespace sm90 {

// Sequence b of a packed batch: its first query and key rows re-read from the prefix sums
// (clamped as varlen_sequence clamps them) when asked, rather than kept through the mainloop.
struct VarlenPlace {
    const LfVarlenParams *vp;
    int b;
    __device__ __forceinline__ int q_lo() const {
        return min(max(vp->cu_seqlens_q[b], 0), vp->total_q);
    }
    __device__ __forceinline__ int q_row0() const { return q_lo(); }
    __device__ __forceinline__ int k_row0() const {
        return min(max(vp->cu_seqlens_k[b], 0), vp->total_k);
    }
    __device__ __forceinline__ int tma_b() const { return 0; }
    __device__ __forceinline__ int64_t o_offset(const LfFwdParams &p) const {
        return static_cast<int64_t>(q_lo()) * p.o_row_stride;
    }
    __device__ __forceinline__ int64_t lse_row0(const LfFwdParams &, int h) const {
        return static_cast<int64_t>(h) * vp->total_q + q_lo();
    }
};

template <class Tr> __device__ __forceinline__ void varlen_fwd(const LfVarlenSm90Params &pv) {
    const LfVarlenParams &vp = pv.vp;
    const int qt = gridDim.x - 1 - blockIdx.x; // longest rows first under a causal mask
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const VarlenSeq s = varlen_sequence(vp, b);
    if (qt * Tr::BR >= s.len_q) return; // the whole CTA, before any barrier
    // The sequence alone: its lengths; rows and outputs through VarlenPlace.
    LfFwdParams p = vp.fwd;
    p.mask.seqlen_q = s.len_q;
    p.mask.seqlen_k = s.len_k;
    WindowIter iter(p.mask, qt, Tr::BR, Tr::BC);
    WindowMask mask{p.mask};
    const int hk = h / (p.heads_q / p.heads_kv);
    TmaKeys keys{&pv.tma_k, &pv.tma_k, hk, 0, s.k_lo};
    attention_fwd_tile<Tr>(p, pv.tma_q, pv.tma_v, iter, mask, keys, NoQPrep{}, qt, h, 0,
                           VarlenPlace{&vp, b});
}

} // namespace sm90
} // namespace lf

// The Hopper varlen kernel NAME for element type T and head dimension D (the dense Hopper
// kernel's tiles; one sequence's query tile per CTA, never a persistent grid).
#define LF_DEFINE_VARLEN_SM90_KERNEL(NAME, T, D)                                                  \
    using NAME##_traits = lf::sm90::Sm90Traits<T, D, LF_FWD_SM90_BC_D##D>;                        \
    extern "C" __global__ void __launch_bounds__(LF_FWD_SM90_THREADS, 1)                          \
        NAME(const __grid_constant__ LfVarlenSm90Params p) {                                      \
        lf::sm90::varlen_fwd<NAME##_traits>(p);                                                   \
    }
