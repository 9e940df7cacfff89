// A packed (variable-length) batch's sequences, shared by the sm_80 and Hopper varlen kernels:
// each CTA finds its sequence's rows from the device prefix sums, clamped so that a bad entry can
// move rows but never leave the tensors (such entries are flagged).
#pragma once

#include "common.cuh"
#include "longflash/params.h"

namespace lf {

// Entry i of device prefix sums, clamped into [lo, total]; sets *bad when it had to move it.
__device__ __forceinline__ int clamped_entry(const int32_t *cu, int i, int lo, int total,
                                             bool &bad) {
    const int x = cu[i];
    const int c = min(max(x, lo), total);
    bad |= c != x;
    return c;
}

// Sequence b's rows of a packed batch, clamped into the tensors: queries [q_lo, q_lo + len_q)
// (at most max_seqlen_q of them) and keys [k_lo, k_lo + len_k). Bad prefix sums set the error
// flag (once per sequence: by its CTA with blockIdx.x == 0, the last query tile, and head 0).
struct VarlenSeq {
    int q_lo, k_lo, len_q, len_k;
};
__device__ __forceinline__ VarlenSeq varlen_sequence(const LfVarlenParams &vp, int b) {
    bool bad = false;
    const int q_lo = clamped_entry(vp.cu_seqlens_q, b, 0, vp.total_q, bad);
    const int q_hi = clamped_entry(vp.cu_seqlens_q, b + 1, q_lo, vp.total_q, bad);
    const int k_lo = clamped_entry(vp.cu_seqlens_k, b, 0, vp.total_k, bad);
    const int k_hi = clamped_entry(vp.cu_seqlens_k, b + 1, k_lo, vp.total_k, bad);
    const int max_q = vp.fwd.mask.seqlen_q;
    bad |= q_hi - q_lo > max_q || k_hi - k_lo > vp.fwd.mask.seqlen_k;
    // Prefix sums start at 0 and never decrease (a decreasing step would make two sequences
    // share rows: still inside the tensors, but a caller's error).
    if (b == 0)
        bad |= vp.cu_seqlens_q[0] != 0 || vp.cu_seqlens_k[0] != 0;
    else
        bad |= vp.cu_seqlens_q[b] < vp.cu_seqlens_q[b - 1] ||
               vp.cu_seqlens_k[b] < vp.cu_seqlens_k[b - 1];
    if (bad && vp.error_flag != nullptr && threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0)
        atomicOr(vp.error_flag, 1);
    return VarlenSeq{q_lo, k_lo, min(q_hi - q_lo, max_q), k_hi - k_lo};
}

// The packed tensors' parameters moved to sequence `s` (as batch entry 0 of the dense plan; its
// batch strides are never used).
__device__ __forceinline__ LfFwdParams varlen_item_params(const LfVarlenParams &vp,
                                                         const VarlenSeq &s) {
    LfFwdParams p = vp.fwd;
    p.q = static_cast<const uint16_t *>(p.q) + static_cast<int64_t>(s.q_lo) * p.q_row_stride;
    p.o = static_cast<uint16_t *>(p.o) + static_cast<int64_t>(s.q_lo) * p.o_row_stride;
    p.k = static_cast<const uint16_t *>(p.k) + static_cast<int64_t>(s.k_lo) * p.k_row_stride;
    p.v = static_cast<const uint16_t *>(p.v) + static_cast<int64_t>(s.k_lo) * p.v_row_stride;
    p.mask.seqlen_q = s.len_q;
    p.mask.seqlen_k = s.len_k;
    return p;
}

} // namespace lf
