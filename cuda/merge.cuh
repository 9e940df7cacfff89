// Merges a partial attention result into an accumulated one by log-sum-exp (LfMergeParams).
#pragma once

#include <type_traits>

#include "common.cuh"
#include "longflash/params.h"

namespace lf {

// Merges chunk [c * W, c * W + W) of one row: acc = wa * acc + wb * part (W = 8: 16-byte
// accesses; W = 4: 8-byte ones, for a head dim that 8 does not divide).
template <typename T, int W>
__device__ __forceinline__ void merge_chunk(uint16_t *ao, const uint16_t *po, float wa, float wb) {
    using V = typename std::conditional<W == 8, uint4, uint2>::type;
    const V va = *reinterpret_cast<const V *>(ao);
    const V vb = *reinterpret_cast<const V *>(po);
    const uint16_t *ea = reinterpret_cast<const uint16_t *>(&va);
    const uint16_t *eb = reinterpret_cast<const uint16_t *>(&vb);
    V out;
    uint32_t *o32 = reinterpret_cast<uint32_t *>(&out);
#pragma unroll
    for (int i = 0; i < W / 2; ++i) {
        // A weight of 0 must not let a NaN or inf of an unused input through (0 * inf = NaN).
        float x[2];
#pragma unroll
        for (int e = 0; e < 2; ++e)
            x[e] = (wa > 0.f ? wa * Elem<T>::to_float(ea[2 * i + e]) : 0.f) +
                   (wb > 0.f ? wb * Elem<T>::to_float(eb[2 * i + e]) : 0.f);
        o32[i] = Elem<T>::pack(x[0], x[1]);
    }
    *reinterpret_cast<V *>(ao) = out;
}

// One warp per (batch, row, head): lane c handles chunk c of the row. The warp reads both
// LSEs before its lane 0 overwrites acc_lse, so no thread reads a merged LSE.
template <typename T> __device__ __forceinline__ void merge_by_lse(const LfMergeParams &p) {
    // Chunks of 8 elements, or of 4 where 8 do not divide the head (at most 32 either way).
    const int width = p.head_dim % 8 == 0 ? 8 : 4;
    const int chunks = p.head_dim / width;
    const int lane = threadIdx.x & 31;
    const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen;
    if (row >= rows) return;
    const int c = lane;
    const int s = static_cast<int>(row % p.seqlen);
    const int h = static_cast<int>((row / p.seqlen) % p.heads);
    const int b = static_cast<int>(row / (static_cast<int64_t>(p.seqlen) * p.heads));

    const int64_t bh = static_cast<int64_t>(b) * p.heads + h;
    const int64_t acc_i = bh * p.acc_lse_stride + s;
    const float la = p.acc_lse[acc_i];
    const float lb = p.part_lse[bh * p.part_lse_stride + s];
    const float mx = fmaxf(la, lb);
    float wa = 0.f, wb = 0.f, lse = -INFINITY;
    if (mx != -INFINITY) { // both -inf: the row saw no key in either pass, it stays 0 / -inf
        const float ea = __expf(la - mx), eb = __expf(lb - mx);
        const float sum = ea + eb;
        wa = ea / sum;
        wb = eb / sum;
        lse = mx + __logf(sum);
    }
    __syncwarp();
    if (c == 0) p.acc_lse[acc_i] = lse;
    if (c >= chunks) return;
    uint16_t *ao = static_cast<uint16_t *>(p.acc_o) + b * p.acc_batch_stride + s * p.acc_row_stride +
                   h * p.acc_head_stride + c * width;
    const uint16_t *po = static_cast<const uint16_t *>(p.part_o) + b * p.part_batch_stride +
                         s * p.part_row_stride + h * p.part_head_stride + c * width;
    if (width == 8)
        merge_chunk<T, 8>(ao, po, wa, wb);
    else
        merge_chunk<T, 4>(ao, po, wa, wb);
}

} // namespace lf

#define LF_DEFINE_MERGE_KERNEL(NAME, T)                                                           \
    extern "C" __global__ void __launch_bounds__(256) NAME(const __grid_constant__ LfMergeParams p) { \
        lf::merge_by_lse<T>(p);                                                                   \
    }
