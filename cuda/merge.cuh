// Merges a partial attention result into an accumulated one by log-sum-exp (LfMergeParams).
#pragma once

#include "common.cuh"
#include "longflash/params.h"

namespace lf {

template <typename T> struct Vec8;
template <> struct Vec8<__half> {
    static __device__ __forceinline__ float get(const uint4 &v, int i) {
        const __half *h = reinterpret_cast<const __half *>(&v);
        return __half2float(h[i]);
    }
};
template <> struct Vec8<__nv_bfloat16> {
    static __device__ __forceinline__ float get(const uint4 &v, int i) {
        const __nv_bfloat16 *h = reinterpret_cast<const __nv_bfloat16 *>(&v);
        return __bfloat162float(h[i]);
    }
};

// One warp per (batch, row, head): lane c handles elements [8c, 8c + 8). The warp reads both
// LSEs before its lane 0 overwrites acc_lse, so no thread reads a merged LSE.
template <typename T> __device__ __forceinline__ void merge_by_lse(const LfMergeParams &p) {
    const int chunks = p.head_dim / 8; // <= 32
    const int lane = threadIdx.x & 31;
    const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seqlen;
    if (row >= rows) return;
    const int c = lane;
    const int s = static_cast<int>(row % p.seqlen);
    const int h = static_cast<int>((row / p.seqlen) % p.heads);
    const int b = static_cast<int>(row / (static_cast<int64_t>(p.seqlen) * p.heads));

    const int64_t lse_i = (static_cast<int64_t>(b) * p.heads + h) * p.seqlen + s;
    const float la = p.acc_lse[lse_i];
    const float lb = p.part_lse[lse_i];
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
    if (c == 0) p.acc_lse[lse_i] = lse;
    if (c >= chunks) return;
    uint16_t *ao = static_cast<uint16_t *>(p.acc_o) + b * p.acc_batch_stride + s * p.acc_row_stride +
                   h * p.acc_head_stride + c * 8;
    const uint16_t *po = static_cast<const uint16_t *>(p.part_o) + b * p.part_batch_stride +
                         s * p.part_row_stride + h * p.part_head_stride + c * 8;
    const uint4 va = *reinterpret_cast<const uint4 *>(ao);
    const uint4 vb = *reinterpret_cast<const uint4 *>(po);
    uint4 out;
    uint32_t *o32 = reinterpret_cast<uint32_t *>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        // A weight of 0 must not let a NaN or inf of an unused input through (0 * inf = NaN).
        float x0 = (wa > 0.f ? wa * Vec8<T>::get(va, 2 * i) : 0.f) +
                   (wb > 0.f ? wb * Vec8<T>::get(vb, 2 * i) : 0.f);
        float x1 = (wa > 0.f ? wa * Vec8<T>::get(va, 2 * i + 1) : 0.f) +
                   (wb > 0.f ? wb * Vec8<T>::get(vb, 2 * i + 1) : 0.f);
        o32[i] = Elem<T>::pack(x0, x1);
    }
    *reinterpret_cast<uint4 *>(ao) = out;
}

} // namespace lf

#define LF_DEFINE_MERGE_KERNEL(NAME, T)                                                           \
    extern "C" __global__ void __launch_bounds__(256) NAME(const __grid_constant__ LfMergeParams p) { \
        lf::merge_by_lse<T>(p);                                                                   \
    }
