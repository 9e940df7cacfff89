// Tile iterators: which key tiles a query tile visits, in which order, and whether each is full
// (needs no element mask). Independent of the mainloop that consumes them.
//
//   count()            how many items the query tile visits
//   tile(n)            the key tile of item n (items come last tile to first)
//   is_full(n)         whether every (row, key) of item n is visible
//   variant(n)         which Q variant and key source item n uses (0 unless the score has two)
//   count_at_least(x)  how many items have a key tile >= x (for wrappers such as ReRoPE's)
#pragma once

#include "longflash/params.h"
#include "longflash/tile_plan.h"

namespace lf {

// The dense plan: dense, causal and sliding-window attention (tile_plan.h).
struct WindowIter {
    LfMask m;
    int qt, br, bc;
    LfTileRange range;
    __device__ __forceinline__ WindowIter(const LfMask &m_, int qt_, int br_, int bc_)
        : m(m_), qt(qt_), br(br_), bc(bc_), range(lf_key_tile_range(m_, qt_, br_, bc_)) {}
    __device__ __forceinline__ int count() const {
        return range.end > range.begin ? range.end - range.begin : 0;
    }
    // Visited last to first, so the tiles on the causal diagonal (partial) come first.
    __device__ __forceinline__ int tile(int n) const { return range.end - 1 - n; }
    __device__ __forceinline__ bool is_full(int n) const {
        return lf_tile_is_full(m, qt, tile(n), br, bc);
    }
    // Which Q tile and key source item n uses (one of each here).
    __device__ __forceinline__ int variant(int) const { return 0; }
    // How many visited tiles have index >= x (they come first, visiting last to first).
    __device__ __forceinline__ int count_at_least(int64_t x) const {
        return static_cast<int>(lf_min64(lf_max64(range.end - x, 0), count()));
    }
};

// The backward's walk: the query tiles that see key tile kt under the dense plan
// (lf_query_tile_range), first to last, each full or partial by the same test as the forward's
// (lf_tile_is_full, exact for any pair of tiles). A key-major block mask (KeyMajorMask) is the
// other walk a backward mainloop takes; both answer count / tile / is_full.
struct WindowQueryIter {
    LfMask m;
    int kt, br, bc;
    LfTileRange range;
    __device__ __forceinline__ WindowQueryIter(const LfMask &m_, int kt_, int br_, int bc_)
        : m(m_), kt(kt_), br(br_), bc(bc_), range(lf_query_tile_range(m_, kt_, br_, bc_)) {}
    __device__ __forceinline__ int count() const {
        return range.end > range.begin ? range.end - range.begin : 0;
    }
    __device__ __forceinline__ int tile(int n) const { return range.begin + n; }
    __device__ __forceinline__ bool is_full(int n) const {
        return lf_tile_is_full(m, tile(n), kt, br, bc);
    }
    __device__ __forceinline__ int variant(int) const { return 0; }
};

// Walks the CSR row of the query block that holds query tile qt (a query block may hold several
// tiles of a smaller kernel tile), with the full/partial flag of each block.
struct CsrIter {
    const int32_t *cols;
    const uint8_t *full;
    int n;
    __device__ __forceinline__ CsrIter(const LfBlockSparse &s, int qt, int br, int b, int h) {
        const int qb = (qt * br) / s.q_block;
        const int64_t row = b * s.batch_stride + h * s.head_stride + qb;
        const int begin = s.row_offsets[row];
        n = s.row_offsets[row + 1] - begin;
        cols = s.col_indices + begin;
        full = s.full + begin;
    }
    // Visited last to first, like WindowIter, so a block mask that lists the dense plan's tiles
    // accumulates in the same order and gives bit-identical results.
    __device__ __forceinline__ int count() const { return n; }
    __device__ __forceinline__ int tile(int i) const { return cols[n - 1 - i]; }
    __device__ __forceinline__ bool is_full(int i) const { return full[n - 1 - i] != 0; }
    __device__ __forceinline__ int variant(int) const { return 0; }
    // How many listed blocks have index >= x (a binary search over the sorted row).
    __device__ __forceinline__ int count_at_least(int64_t x) const {
        int lo = 0, hi = n; // first position whose column is >= x
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (cols[mid] < x)
                lo = mid + 1;
            else
                hi = mid;
        }
        return n - lo;
    }
};

} // namespace lf
