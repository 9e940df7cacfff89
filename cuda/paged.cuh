// Many queries per sequence over a KV cache, paged or contiguous (chunked prefill;
// LfPagedFwdParams): the dense plan of each (query tile, head, sequence) on the sm_80 mainloop,
// its key and value rows gathered from the sequence's pages. The sequence's length comes from the
// device and is clamped; the CTA of its first query tile and head checks the table entries the
// sequence reads and reports entries out of range (the rows themselves clamp them).
#pragma once

#include "fwd.cuh"

namespace lf {

template <class Tr> __device__ __forceinline__ void paged_fwd(const LfPagedFwdParams &pp) {
    const int qt = gridDim.x - 1 - blockIdx.x; // longest rows first under a causal mask
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    LfFwdParams p = pp.fwd;
    bool bad = false;
    int len = p.mask.seqlen_k;
    if (pp.cache_seqlens != nullptr) {
        const int x = pp.cache_seqlens[b];
        len = min(max(x, 0), p.mask.seqlen_k);
        bad |= len != x;
    }
    const int32_t *table =
        pp.block_table != nullptr ? pp.block_table + b * pp.block_table_stride : nullptr;
    if (table != nullptr && pp.error_flag != nullptr && blockIdx.x == 0 && h == 0) {
        const int pages = (len + pp.page_size - 1) >> pp.page_shift;
        for (int i = threadIdx.x; i < pages; i += blockDim.x) {
            const int e = table[i];
            bad |= e < 0 || e >= pp.num_pages;
        }
    }
    if (bad && pp.error_flag != nullptr) atomicOr(pp.error_flag, 1);
    p.mask.seqlen_k = len;
    if (qt * Tr::BR >= p.mask.seqlen_q) return; // the whole CTA, before any barrier

    const int hk = h / (p.heads_q / p.heads_kv);
    const uint16_t *k = static_cast<const uint16_t *>(p.k) + hk * p.k_head_stride;
    const uint16_t *v = static_cast<const uint16_t *>(p.v) + hk * p.v_head_stride;
    PagedKV keys{k,
                 v,
                 p.k_batch_stride,
                 p.k_row_stride,
                 p.v_batch_stride,
                 p.v_row_stride,
                 table,
                 pp.page_shift,
                 table != nullptr ? pp.page_size - 1 : -1,
                 pp.num_pages,
                 b};
    WindowIter iter(p.mask, qt, Tr::BR, Tr::BC);
    WindowMask mask{p.mask};
    attention_fwd_tile<Tr, WindowIter, WindowMask, PlainScore>(p, iter, mask, keys, NoQPrep{}, qt,
                                                              h, b);
}

} // namespace lf

// The chunked-prefill kernel NAME for element type T and head dimension D (the dense kernel's
// tiles; PADDED for a head narrower than D).
#define LF_DEFINE_PAGED_KERNEL(NAME, T, D, PADDED)                                                \
    using NAME##_traits =                                                                         \
        lf::FwdTraits<T, D, LF_FWD_BR_D##D, LF_FWD_BC_D##D, LF_FWD_WARPS, 1, PADDED>;            \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfPagedFwdParams p) {                                        \
        lf::paged_fwd<NAME##_traits>(p);                                                          \
    }
