// The online softmax on accumulator rows, shared by the sm_80 and Hopper mainloops so that both
// compute the same function with the same rounding points.
//
// Accumulator rows (mma.sync m16n8 and wgmma m64nN alike): a thread holds, for each 8-column
// block j of a tile, columns 8j + 2t and 8j + 2t + 1 of two rows, row 0 at s[j][0], s[j][1] and
// row 1 (8 rows further down) at s[j][2], s[j][3]; the four threads t = 0..3 of a quad hold the
// rest of those rows.
#pragma once

#include "common.cuh"

namespace lf {

// Masks row r of a partial tile: keys `keys` does not show (relative to the tile's first key)
// get score -inf.
template <int NT, class RowKeys>
__device__ __forceinline__ void mask_row(float (&s)[NT][4], int r, int tq, const RowKeys &keys) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c)
            if (!keys.visible(j * 8 + tq * 2 + c)) s[j][2 * r + c] = -INFINITY;
}

// The largest score of row r in the tile (over the quad's four threads). The thread's 2 * NT
// values are reduced as a tree, log2 steps deep, rather than as one chain of dependent maxima:
// the chain's latency sat between S and the exponentials (1.00x to 1.04x on the Hopper
// mainloop, H100, 2026-12-05).
template <int NT> __device__ __forceinline__ float row_max(const float (&s)[NT][4], int r) {
    float m[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) m[j] = fmaxf(s[j][2 * r], s[j][2 * r + 1]);
#pragma unroll
    for (int w = 1; w < NT; w *= 2)
#pragma unroll
        for (int j = 0; j + w < NT; j += 2 * w) m[j] = fmaxf(m[j], m[j + w]);
    return quad_max(m[0]);
}

// Moves row r's exponent base for a tile whose largest score is mx (softmax_base): returns the
// factor what was accumulated at the old base is rescaled by (exp2_step) and applies it to the
// row's sums; `moved` says whether the base changed.
__device__ __forceinline__ float move_base(float &base, float &sum, float &exp_sum, float mx,
                                           float scale_log2, bool &moved) {
    const float new_base = softmax_base(base, mx, scale_log2);
    const float alpha = exp2_step(base, new_base);
    moved |= new_base != base;
    base = new_base;
    sum *= alpha;
    exp_sum *= alpha;
    return alpha;
}

// P = exp2(S * scale * log2(e) - base) for row r, in place; adds the exact values to exp_sum
// (which only the LSE reads: kSum = false skips the sums of a call that asked for none).
template <int NT, bool kSum = true>
__device__ __forceinline__ void exp_row(float (&s)[NT][4], int r, float scale_log2, float base,
                                        float &exp_sum) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const float e = fast_exp2(fmaf(s[j][2 * r + c], scale_log2, -base));
            s[j][2 * r + c] = e;
            if constexpr (kSum) exp_sum += e;
        }
}

// A compile-time bool as a value, for generic lambdas that instantiate a loop twice.
template <bool B> struct BoolTag {
    static constexpr bool value = B;
};

// P of the k16 step kk (8-column blocks 2kk and 2kk + 1) as the A fragment of an m16n8k16 /
// wgmma k16 step, rounded to T. The row sums that normalize O add P as rounded, so the weights
// P V uses are exactly the ones it divides by (the exact exponentials' sum would bias each output
// by up to an ulp of P; it serves the LSE instead).
template <typename T, int NT>
__device__ __forceinline__ void pack_p(const float (&s)[NT][4], int kk, uint32_t (&a)[4],
                                       float &sum0, float &sum1) {
    using Elt = Elem<T>;
    a[0] = Elt::pack(s[2 * kk][0], s[2 * kk][1]);
    a[1] = Elt::pack(s[2 * kk][2], s[2 * kk][3]);
    a[2] = Elt::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = Elt::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
        const float2 pf = Elt::unpack(a[x]);
        (x & 1 ? sum1 : sum0) += pf.x + pf.y;
    }
}

} // namespace lf
