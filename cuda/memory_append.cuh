// Memory buffer append (LfMemoryAppendParams): a window's raw keys and values copied into a memory
// layer's buffer at its ring position, cast to the buffer's element type on the way (f32 or the
// buffer's own type in). One CTA per (window row, head, batch entry), a thread per element pair.
#pragma once

#include "common.cuh"
#include "longflash/params.h"

namespace lf {

template <typename S> struct AppendSrc;
template <> struct AppendSrc<float> {
    static __device__ __forceinline__ float2 load2(const void *p, int64_t i) {
        return *reinterpret_cast<const float2 *>(static_cast<const float *>(p) + i);
    }
};
template <> struct AppendSrc<__half> {
    static __device__ __forceinline__ float2 load2(const void *p, int64_t i) {
        return Elem<__half>::unpack(
            *reinterpret_cast<const uint32_t *>(static_cast<const uint16_t *>(p) + i));
    }
};
template <> struct AppendSrc<__nv_bfloat16> {
    static __device__ __forceinline__ float2 load2(const void *p, int64_t i) {
        return Elem<__nv_bfloat16>::unpack(
            *reinterpret_cast<const uint32_t *>(static_cast<const uint16_t *>(p) + i));
    }
};

template <typename S, typename T>
__device__ __forceinline__ void memory_append(const LfMemoryAppendParams &p) {
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int64_t sr = p.src_row0 + t;
    const int64_t dr = (static_cast<int64_t>(p.dst_row0) + t) % p.dst_rows;
    const int64_t sk = b * p.src_k_batch_stride + sr * p.src_k_row_stride + h * p.src_k_head_stride;
    const int64_t sv = b * p.src_v_batch_stride + sr * p.src_v_row_stride + h * p.src_v_head_stride;
    const int64_t d0 = b * p.dst_batch_stride + dr * p.dst_row_stride + h * p.dst_head_stride;
    uint16_t *dk = static_cast<uint16_t *>(p.dst_k) + d0;
    uint16_t *dv = static_cast<uint16_t *>(p.dst_v) + d0;
    for (int c = 2 * threadIdx.x; c < p.head_dim; c += 2 * blockDim.x) {
        const float2 k = AppendSrc<S>::load2(p.src_k, sk + c);
        const float2 v = AppendSrc<S>::load2(p.src_v, sv + c);
        *reinterpret_cast<uint32_t *>(dk + c) = Elem<T>::pack(k.x, k.y);
        *reinterpret_cast<uint32_t *>(dv + c) = Elem<T>::pack(v.x, v.y);
    }
}

} // namespace lf

#define LF_DEFINE_MEMORY_APPEND_KERNEL(NAME, S, T)                                                \
    extern "C" __global__ void __launch_bounds__(128) NAME(const __grid_constant__ LfMemoryAppendParams p) { \
        lf::memory_append<S, T>(p);                                                               \
    }
