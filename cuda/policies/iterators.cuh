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

// CsrIter over key tiles of BC keys, a divisor of the key block: each listed block gives
// LF_SPARSE_K_BLOCK / BC tiles, visited last to first like the blocks, less the tiles of the last
// block that start at or past seqlen_k (so a block mask listing the dense plan's blocks visits the
// dense plan's tiles in the same order).
template <int BC> struct CsrTileIter {
    static_assert(LF_SPARSE_K_BLOCK % BC == 0, "key tiles divide the key block");
    static constexpr int kPer = LF_SPARSE_K_BLOCK / BC;
    CsrIter csr;
    int skip, n;
    __device__ __forceinline__ CsrTileIter(const LfBlockSparse &s, int qt, int br, int b, int h,
                                           int seqlen_k)
        : csr(s, qt, br, b, h), skip(0) {
        if (kPer > 1 && csr.count() > 0) {
            const int tiles = (seqlen_k + BC - 1) / BC;
            const int top = (csr.tile(0) + 1) * kPer;
            if (top > tiles) skip = top - tiles;
        }
        n = csr.count() * kPer - skip;
    }
    __device__ __forceinline__ int count() const { return n; }
    __device__ __forceinline__ int tile(int i) const {
        const int j = i + skip;
        return csr.tile(j / kPer) * kPer + (kPer - 1 - j % kPer);
    }
    __device__ __forceinline__ bool is_full(int i) const { return csr.is_full((i + skip) / kPer); }
    __device__ __forceinline__ int variant(int) const { return 0; }
};

// The block-sparse backward's walk (KeyMajorMask, LfBwdSparseParams::cols): the query tiles of BR
// rows of the query blocks that list key block kb of (b, query head h), first to last, each with
// its block's flag; tiles that start at or past seqlen_q are left out.
template <int BR> struct CscQueryIter {
    static_assert(LF_SPARSE_Q_BLOCK % BR == 0, "query tiles divide the query block");
    static constexpr int kPer = LF_SPARSE_Q_BLOCK / BR;
    const int32_t *rows;
    const uint8_t *full;
    int n;
    __device__ __forceinline__ CscQueryIter(const LfBlockSparse &s, int kb, int b, int h,
                                            int seqlen_q) {
        const int64_t col = b * s.batch_stride + h * s.head_stride + kb;
        const int begin = s.row_offsets[col];
        const int listed = s.row_offsets[col + 1] - begin;
        rows = s.col_indices + begin;
        full = s.full + begin;
        n = listed * kPer;
        if (listed > 0) {
            const int tiles = (seqlen_q + BR - 1) / BR;
            const int top = (rows[listed - 1] + 1) * kPer;
            if (top > tiles) n -= top - tiles;
        }
    }
    __device__ __forceinline__ int count() const { return n; }
    __device__ __forceinline__ int tile(int i) const { return rows[i / kPer] * kPer + i % kPer; }
    __device__ __forceinline__ bool is_full(int i) const { return full[i / kPer] != 0; }
    __device__ __forceinline__ int variant(int) const { return 0; }
};

} // namespace lf
