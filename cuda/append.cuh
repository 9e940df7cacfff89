// Appends new tokens' keys and values to a KV cache, paged or contiguous (LfAppendParams), the
// keys optionally rotated to their positions on the way: one thread per (sequence, token, KV
// head, element pair). Slots and page entries come from the device and are checked: a token
// that would land outside the cache is not written and is reported.
#pragma once

#include "common.cuh"
#include "longflash/params.h"
#include "policies/rope.cuh"

namespace lf {

template <typename T> __device__ __forceinline__ void append_kv(const LfAppendParams &p) {
    const int pairs = p.head_dim / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t total = static_cast<int64_t>(p.batch) * p.seqlen_new * p.heads_kv * pairs;
    if (idx >= total) return;
    const int f = static_cast<int>(idx % pairs);
    int64_t rest = idx / pairs;
    const int hk = static_cast<int>(rest % p.heads_kv);
    rest /= p.heads_kv;
    const int t = static_cast<int>(rest % p.seqlen_new);
    const int b = static_cast<int>(rest / p.seqlen_new);

    // The token's slot, and its row in the cache.
    const int64_t slot = static_cast<int64_t>(p.cache_seqlens[b]) + t;
    bool ok = slot >= 0 && slot < p.capacity;
    int64_t page = b, row = slot;
    if (ok && p.block_table != nullptr) {
        const int entry = p.block_table[b * p.block_table_stride + (slot >> p.page_shift)];
        ok = entry >= 0 && entry < p.num_pages;
        page = entry;
        row = slot & (p.page_size - 1);
    }
    if (!ok) {
        if (p.error_flag != nullptr && f == 0) atomicOr(p.error_flag, 1);
        return;
    }

    // Pair f: rotary pairs first, then the rest two elements at a time.
    const LfRope &r = p.rope;
    int xi, yi;
    if (p.rotate) {
        rope_pair(r, f, xi, yi);
    } else {
        xi = 2 * f;
        yi = 2 * f + 1;
    }
    const uint16_t *kn = static_cast<const uint16_t *>(p.k_new) + b * p.k_new_batch_stride +
                         t * p.k_new_row_stride + hk * p.k_new_head_stride;
    const uint16_t *vn = static_cast<const uint16_t *>(p.v_new) + b * p.v_new_batch_stride +
                         t * p.v_new_row_stride + hk * p.v_new_head_stride;
    uint16_t *kc = static_cast<uint16_t *>(p.k_cache) + page * p.k_page_stride +
                   row * p.k_row_stride + hk * p.k_head_stride;
    uint16_t *vc = static_cast<uint16_t *>(p.v_cache) + page * p.v_page_stride +
                   row * p.v_row_stride + hk * p.v_head_stride;
    uint16_t kx = kn[xi], ky = kn[yi];
    if (p.rotate && f < r.rotary_dim / 2) {
        const float x = Elem<T>::to_float(kx), y = Elem<T>::to_float(ky);
        float c, s;
        rope_cos_sin(static_cast<double>(rope_key_position(r, b, slot)), r.inv_freq[f], c, s);
        const float af = r.attention_factor;
        kx = Elem<T>::to_bits(af * (x * c - y * s));
        ky = Elem<T>::to_bits(af * (x * s + y * c));
    }
    kc[xi] = kx;
    kc[yi] = ky;
    vc[xi] = vn[xi];
    vc[yi] = vn[yi];
}

} // namespace lf

#define LF_DEFINE_APPEND_KERNEL(NAME, T)                                                          \
    extern "C" __global__ void __launch_bounds__(256) NAME(const __grid_constant__ LfAppendParams p) { \
        lf::append_kv<T>(p);                                                                      \
    }
