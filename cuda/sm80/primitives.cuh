// Tile primitives of the sm_80 mainloop (Ampere and Ada, and Hopper when TMA/wgmma are not
// used): the swizzled shared-memory tile, cp.async copies, ldmatrix and mma.sync m16n8k16.
// Small and explicit so the mainloop reads as a composition of them.
#pragma once

#include "../common.cuh"

namespace lf {

// ---- tensor cores (mma.sync) -------------------------------------------------------------------

template <typename T> struct Mma;
template <> struct Mma<__half> {
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// ---- shared-memory tile layout -----------------------------------------------------------------

// A [rows][D] tile of 16-bit elements in shared memory, rows of D/8 16-byte chunks, chunk c of
// row r stored at chunk (c ^ (r & 7)): the 8 rows an ldmatrix reads, and the 8 chunks a
// quarter-warp copies, fall in 8 distinct bank groups. Needs D >= 64.
template <int D> struct SwizzledTile {
    static_assert(D % 64 == 0, "swizzle needs at least 8 chunks per row");
    static constexpr int kChunks = D / 8;
    // Byte offset of element (r, c).
    static __device__ __forceinline__ uint32_t offset(int r, int c) {
        int chunk = c >> 3;
        int phys = chunk ^ (r & 7);
        return static_cast<uint32_t>((r * D + phys * 8 + (c & 7)) * 2);
    }
};

// A thread's cursor into a swizzled tile for ldmatrix: the thread addresses row r0 + R and chunk
// h + C, where r0 and h (0 or 1) depend on the lane and R (a multiple of 8) and C (even) are
// compile-time steps. Because R keeps r & 7 and C never carries into h, the swizzled chunk is
// (C & ~7) + ((C & 7) ^ y) with y = h ^ (r0 & 7) fixed per thread: every address is a per-thread
// base plus an immediate, instead of one live register per (R, C) pair.
template <int D> struct SwizzledCursor {
    uint32_t base;
    uint32_t y;
    __device__ __forceinline__ SwizzledCursor(uint32_t tile, int r0, int h)
        : base(tile + static_cast<uint32_t>(r0 * D * 2)), y(static_cast<uint32_t>(h ^ (r0 & 7))) {}
    __device__ __forceinline__ uint32_t at(int R, int C) const {
        return base + static_cast<uint32_t>(R * D * 2 + (C & ~7) * 16) +
               ((static_cast<uint32_t>(C & 7) ^ y) << 4);
    }
};

// ---- async copies (cp.async, sm_80) -----------------------------------------------------------

// Copies 16 bytes global -> shared, or writes 16 zero bytes when !valid (nothing is read then).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// The 16 bytes of a chunk as two 8-byte copies, each half read only when its `valid` says so
// (zero-filled otherwise): rows that are only 8-byte aligned (a head dim of 100 elements is 200
// bytes), and heads that end in the middle of a chunk.
__device__ __forceinline__ void cp_async_8x2(uint32_t dst, const uint16_t *src, bool valid_lo,
                                             bool valid_hi, const void *fallback) {
    const int n_lo = valid_lo ? 8 : 0, n_hi = valid_hi ? 8 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst),
                 "l"(valid_lo ? static_cast<const void *>(src) : fallback), "r"(n_lo));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst + 8),
                 "l"(valid_hi ? static_cast<const void *>(src + 4) : fallback), "r"(n_hi));
}
// A chunk of 8 elements at column c of a row whose first `valid_cols` columns (a multiple of 4)
// exist: with 16-byte rows alignment one copy, else two 8-byte ones.
template <bool kNarrow>
__device__ __forceinline__ void cp_async_chunk(uint32_t dst, const uint16_t *src, bool row_ok,
                                               int c, int valid_cols, const void *fallback) {
    if constexpr (kNarrow) {
        cp_async_8x2(dst, src, row_ok && c < valid_cols, row_ok && c + 4 < valid_cols, fallback);
    } else {
        const bool ok = row_ok && c < valid_cols;
        cp_async_16(dst, ok ? static_cast<const void *>(src) : fallback, ok);
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Loads rows [0, rows) of a [ROWS][D] tile from global memory (row stride in elements) into a
// swizzled shared tile; rows >= valid_rows are zero-filled and never read.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(uint32_t smem_base, const uint16_t *gmem,
                                                int64_t row_stride, int valid_rows, int tid) {
    constexpr int kChunks = D / 8;
    constexpr int kRowsPerPass = THREADS / kChunks; // rows one pass of all threads copies
    static_assert(THREADS % kChunks == 0 && ROWS % kRowsPerPass == 0,
                  "tile copy must divide evenly among threads");
    const int r0 = tid / kChunks;
    const int c = (tid % kChunks) * 8;
    const uint16_t *src = gmem + r0 * row_stride + c;
    const int64_t step = kRowsPerPass * row_stride;
#pragma unroll
    for (int it = 0; it < ROWS / kRowsPerPass; ++it) {
        const int r = r0 + it * kRowsPerPass;
        const bool valid = r < valid_rows;
        // With kRowsPerPass a multiple of 8 the swizzle phase is the same every pass and the
        // address is a base plus an immediate; otherwise it is recomputed (still cheap).
        const uint32_t dst = kRowsPerPass % 8 == 0
                                 ? smem_base + SwizzledTile<D>::offset(r0, c) + it * kRowsPerPass * D * 2
                                 : smem_base + SwizzledTile<D>::offset(r, c);
        cp_async_16(dst, valid ? src : gmem, valid);
        src += step;
    }
}

// As load_tile_async, reading only the first `valid_cols` columns (a multiple of 4) of each row
// and zero-filling the rest of the tile's row: a head dimension narrower than the tile. Copies
// go 8 bytes at a time, so rows need only be 8-byte aligned.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_async_cols(uint32_t smem_base, const uint16_t *gmem,
                                                     int64_t row_stride, int valid_rows,
                                                     int valid_cols, int tid) {
    constexpr int kChunks = D / 8;
    constexpr int kRowsPerPass = THREADS / kChunks;
    static_assert(THREADS % kChunks == 0 && ROWS % kRowsPerPass == 0,
                  "tile copy must divide evenly among threads");
    const int r0 = tid / kChunks;
    const int c = (tid % kChunks) * 8;
    const uint16_t *src = gmem + r0 * row_stride + c;
    const int64_t step = kRowsPerPass * row_stride;
#pragma unroll
    for (int it = 0; it < ROWS / kRowsPerPass; ++it) {
        const int r = r0 + it * kRowsPerPass;
        const uint32_t dst = kRowsPerPass % 8 == 0
                                 ? smem_base + SwizzledTile<D>::offset(r0, c) + it * kRowsPerPass * D * 2
                                 : smem_base + SwizzledTile<D>::offset(r, c);
        cp_async_chunk<true>(dst, src, r < valid_rows, c, valid_cols, gmem);
        src += step;
    }
}

// As load_tile_async_cols (8-byte copies with kNarrow, 16-byte ones otherwise), with each row's
// address from `row_ptr(r)` (rows gathered from pages, say); `row_ptr` is called only for rows
// below valid_rows, and `fallback` (any valid address) stands in for the others, which are
// zero-filled.
template <int ROWS, int D, int THREADS, bool kNarrow, class RowPtr>
__device__ __forceinline__ void load_tile_gather_async(uint32_t smem_base, const RowPtr &row_ptr,
                                                       const uint16_t *fallback, int valid_rows,
                                                       int valid_cols, int tid) {
    constexpr int kChunks = D / 8;
    constexpr int kRowsPerPass = THREADS / kChunks;
    static_assert(THREADS % kChunks == 0 && ROWS % kRowsPerPass == 0,
                  "tile copy must divide evenly among threads");
    const int r0 = tid / kChunks;
    const int c = (tid % kChunks) * 8;
#pragma unroll
    for (int it = 0; it < ROWS / kRowsPerPass; ++it) {
        const int r = r0 + it * kRowsPerPass;
        const bool row_ok = r < valid_rows && c < valid_cols;
        const uint16_t *src = row_ok ? row_ptr(r) + c : fallback;
        cp_async_chunk<kNarrow>(smem_base + SwizzledTile<D>::offset(r, c), src, row_ok, c,
                                valid_cols, fallback);
    }
}

// ---- ldmatrix --------------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

} // namespace lf
