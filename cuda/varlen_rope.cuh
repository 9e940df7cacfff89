// The variable-length forward with RoPE / ReRoPE / Leaky ReRoPE inside: each sequence of a packed
// batch runs the RoPE forward's item on its own rows, positions from its own offset; and the
// key-rotation pass over the packed keys, each row rotated to its position in its sequence.
#pragma once

#include "rope.cuh"
#include "varlen.cuh"

namespace lf {

template <class Tr> __device__ __forceinline__ void varlen_rope_fwd(const LfVarlenRopeParams &vp) {
    const int qt = gridDim.x - 1 - blockIdx.x; // longest rows first under a causal mask
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const VarlenSeq s = varlen_sequence(vp.varlen, b);
    if (qt * Tr::BR >= s.len_q) return; // the whole CTA, before any barrier
    const LfFwdParams p = varlen_item_params(vp.varlen, s);
    const LfRope &r = vp.rope;
    WindowIter base(p.mask, qt, Tr::BR, Tr::BC);
    ReRopeIter<WindowIter> iter(base, p.mask, r, qt, Tr::BR, Tr::BC);
    ReRopeMask mask{p.mask, r.window};
    const int hk = h / (p.heads_q / p.heads_kv);
    const int64_t row = static_cast<int64_t>(p.heads_kv) * p.head_dim;
    const int64_t off = static_cast<int64_t>(s.k_lo) * row + static_cast<int64_t>(hk) * p.head_dim;
    RopeKeys keys{static_cast<const uint16_t *>(r.k_rot) + off,
                  r.k_alt ? static_cast<const uint16_t *>(r.k_alt) + off : nullptr, row};
    // Positions: the sequence's own offset (batch index b), its own lengths.
    RopeQPrep<Tr> prep{&vp.rope, s.len_q, s.len_k, b};
    attention_fwd_tile<Tr, ReRopeIter<WindowIter>, ReRopeMask, PlainScore>(
        p, iter, mask, keys, prep, qt, h, 0, VarlenLse{vp.varlen.total_q, s.q_lo});
}

// One thread per (packed key row, kv head, pair); the row's sequence by binary search in the
// prefix sums (entries clamped into [0, total], so the search always ends inside the batch).
template <typename T>
__device__ __forceinline__ void rope_keys_varlen(const LfRopeKeysVarlenParams &vp) {
    const LfRopeKeysParams &p = vp.keys;
    const LfRope &r = p.rope;
    const int pairs = p.head_dim / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t total = static_cast<int64_t>(p.seqlen_k) * p.heads_kv * pairs;
    if (idx >= total) return;
    const int f = static_cast<int>(idx % pairs);
    int64_t rest = idx / pairs;
    const int hk = static_cast<int>(rest % p.heads_kv);
    const int j = static_cast<int>(rest / p.heads_kv); // packed row
    // The last sequence whose (clamped) start is at or before row j.
    auto start = [&](int i) { return min(max(vp.cu_seqlens_k[i], 0), p.seqlen_k); };
    int lo = 0, hi = vp.sequences - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (start(mid) <= j)
            lo = mid;
        else
            hi = mid - 1;
    }
    const int b = lo;
    const uint16_t *src = static_cast<const uint16_t *>(p.k) + j * p.k_row_stride + hk * p.k_head_stride;
    const int64_t dst = (static_cast<int64_t>(j) * p.heads_kv + hk) * p.head_dim;
    uint16_t *rot = static_cast<uint16_t *>(const_cast<void *>(r.k_rot)) + dst;
    uint16_t *alt = r.k_alt ? static_cast<uint16_t *>(const_cast<void *>(r.k_alt)) + dst : nullptr;
    rope_key_pair<T>(r, src, rot, alt, f, rope_key_position(r, b, j - start(b)));
}

} // namespace lf

#define LF_DEFINE_VARLEN_ROPE_KERNEL(NAME, T, D)                                                  \
    using NAME##_traits = lf::FwdTraits<T, D, LF_FWD_BR_D##D, LF_FWD_BC_D##D, LF_FWD_WARPS, 2>;  \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfVarlenRopeParams p) {                                      \
        lf::varlen_rope_fwd<NAME##_traits>(p);                                                    \
    }

#define LF_DEFINE_ROPE_KEYS_VARLEN_KERNEL(NAME, T)                                                \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        NAME(const __grid_constant__ LfRopeKeysVarlenParams p) {                                  \
        lf::rope_keys_varlen<T>(p);                                                               \
    }
