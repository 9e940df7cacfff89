// Key sources and Q preparation: where a visited item's key rows come from, and what happens to
// the Q tile once it is in shared memory.
#pragma once

#include <stdint.h>

#include <type_traits>

namespace lf {

// The key rows of tile kt for item variant v: here one tensor, K itself.
struct PlainKeys {
    const uint16_t *base;
    int64_t row_stride;
    __device__ __forceinline__ const uint16_t *tile(int, int kt, int bc) const {
        return base + static_cast<int64_t>(kt) * bc * row_stride;
    }
    __device__ __forceinline__ int64_t stride(int) const { return row_stride; }
};

// Q as loaded (no rotation).
struct NoQPrep {
    static constexpr bool kActive = false;
    __device__ __forceinline__ void operator()(uint32_t, int, int, int) const {}
};

// Keys and values of one sequence and KV head in a paged cache: row j is row j % page_size of
// page table[j / page_size], the entry clamped into [0, num_pages) (the caller reports entries
// out of range), or row j of entry `fixed_page` of a contiguous cache (page_mask all ones).
// Rows are gathered one by one, so any page size works.
struct PagedKV {
    const uint16_t *k, *v; // element 0 of the KV head in page 0
    int64_t k_page_stride, k_row_stride, v_page_stride, v_row_stride;
    const int32_t *table; // the sequence's row of the block table, or nullptr: page `fixed_page`
    int page_shift, page_mask, num_pages, fixed_page;
    __device__ __forceinline__ int64_t page_of(int j) const {
        if (table == nullptr) return fixed_page;
        return min(max(table[j >> page_shift], 0), num_pages - 1);
    }
    __device__ __forceinline__ const uint16_t *k_row(int j) const {
        return k + page_of(j) * k_page_stride + static_cast<int64_t>(j & page_mask) * k_row_stride;
    }
    __device__ __forceinline__ const uint16_t *v_row(int j) const {
        return v + page_of(j) * v_page_stride + static_cast<int64_t>(j & page_mask) * v_row_stride;
    }
};

// Whether a key source gathers rows one by one (PagedKV) rather than handing out tiles.
template <class Keys> struct GathersRows : std::false_type {};
template <> struct GathersRows<PagedKV> : std::true_type {};

// Whether a key source also gives each item's value tile and its row count (v_tile, v_row_stride,
// rows: a call with two key sources of their own lengths, MemoryKeys) rather than the mainloop
// reading V and seqlen_k from LfFwdParams.
template <class Keys> struct OwnsValues : std::false_type {};

} // namespace lf
