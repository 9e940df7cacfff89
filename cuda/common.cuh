// Tile primitives for the sm_80+ kernels: cp.async copies, ldmatrix, mma.sync m16n8k16, packing.
// Small and explicit so each kernel reads as a composition of them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace lf {

// ---- element types -------------------------------------------------------------------------

template <typename T> struct Elem;

template <> struct Elem<__half> {
    static __device__ __forceinline__ float to_float(uint16_t bits) {
        return __half2float(__ushort_as_half(bits));
    }
    static __device__ __forceinline__ uint16_t to_bits(float x) {
        return __half_as_ushort(__float2half_rn(x));
    }
    // Two f32 -> one register of two f16 (lo in the low half), round to nearest even.
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    // The two f32 values a packed register holds (exact).
    static __device__ __forceinline__ float2 unpack(uint32_t x) {
        return __half22float2(*reinterpret_cast<const __half2 *>(&x));
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <> struct Elem<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(uint16_t bits) {
        return __bfloat162float(__ushort_as_bfloat16(bits));
    }
    static __device__ __forceinline__ uint16_t to_bits(float x) {
        return __bfloat16_as_ushort(__float2bfloat16_rn(x));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ float2 unpack(uint32_t x) {
        return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// ---- shared memory ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

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

// ---- math ------------------------------------------------------------------------------------

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// The exponent base of P for a row whose largest score so far is mx: ceil(mx * scale * log2(e)),
// an integer (or -inf while the row has seen only masked keys), so that P = exp2(S' - base) has
// its largest element in (1/2, 1]. Because every base is an integer, moving to a new base
// rescales what was accumulated by an exact power of two: each rounded P is then the same
// number, up to that exact factor, whichever order the key tiles come in and whatever the running
// maximum was when its tile was processed, and the result does not depend on the visiting order
// through the rounding of P. (A running maximum that moved by arbitrary steps made every tile's
// rounding of P a different draw, which is the case a reference implementation cannot follow.)
__device__ __forceinline__ float softmax_base(float mx, float scale_log2) {
    return mx == -INFINITY ? -INFINITY : ceilf(mx * scale_log2);
}

// 2^(old - new) for integer-valued bases old <= new (old may be -inf): exact, built from the
// exponent bits; 0 when the step is below the smallest normal float (what was accumulated at
// the old base is below 2^-126 of the new one's largest P).
__device__ __forceinline__ float exp2_step(float old_base, float new_base) {
    const float d = fmaxf(old_base - new_base, -127.f); // -inf - x = -inf -> -127
    const int e = static_cast<int>(d) + 127;
    return e <= 0 ? 0.f : __int_as_float(e << 23);
}

// Reduction over the 4 threads of a quad (the threads that share an mma accumulator row).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

} // namespace lf
