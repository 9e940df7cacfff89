// What every kernel shares, whatever its mainloop: the 16-bit element types (conversion,
// packing), shared-memory addresses, and the online-softmax arithmetic (exponent base, exact
// rescaling, reductions over the four threads that share an accumulator row).
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
};

// ---- shared memory ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- math ------------------------------------------------------------------------------------

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// The exponent base of P for a row whose largest score so far is mx: ceil(mx * scale * log2(e)),
// an integer, so that P = exp2(S' - base) has its largest element in (1/2, 1]. Because every base
// is an integer, moving to a new base rescales what was accumulated by an exact power of two:
// each rounded P is then the same number, up to that exact factor, whichever order the key tiles
// come in and whatever the running maximum was when its tile was processed, and the result does
// not depend on the visiting order through the rounding of P. (A running maximum that moved by
// arbitrary steps made every tile's rounding of P a different draw, which is the case a
// reference implementation cannot follow.) A row starts at kNoBase, a finite stand-in for
// "no key yet" that any real base replaces and that keeps every difference below free of NaN;
// a fully masked tile (mx = -inf) leaves the base as it was.
constexpr float kNoBase = -3.40282347e38f; // -FLT_MAX
__device__ __forceinline__ float softmax_base(float old_base, float mx, float scale_log2) {
    return fmaxf(old_base, ceilf(mx * scale_log2));
}

// 2^(old - new) for integer-valued bases old <= new: exact, built from the exponent bits; 0 when
// the step is below the smallest normal float (what was accumulated at the old base is below
// 2^-126 of the new one's largest P), and for a first base after kNoBase.
__device__ __forceinline__ float exp2_step(float old_base, float new_base) {
    const int e = static_cast<int>(fmaxf(old_base - new_base, -127.f)) + 127; // 0..127
    return __int_as_float(e << 23);
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
