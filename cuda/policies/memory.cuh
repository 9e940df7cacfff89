// Memory attention policies (LfMemoryFwdParams): the items of one query tile are the local
// window's key tiles (the dense plan: causal, optionally windowed) and then the memory's tiles,
// in one online softmax. Local items are variant 0 (rotated local keys and values), memory items
// variant 1 (the raw memory keys and their values); both take the same (rotated) Q tile.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "iterators.cuh"
#include "rope.cuh"
#include "sources.cuh"

namespace lf {

// The local tiles of the dense plan, last to first (the diagonal first), then the memory's tiles
// first to last. A memory tile is full when no memory mask is given and it lies inside mem_len.
// The memory's fields are read from the launch's parameters when asked, not kept in registers.
struct MemoryIter {
    WindowIter local;
    const LfMemoryFwdParams *pm;
    int n_local;
    __device__ __forceinline__ MemoryIter(const LfMemoryFwdParams &pm_, int qt, int br, int bc)
        : local(pm_.fwd.mask, qt, br, bc), pm(&pm_), n_local(local.count()) {}
    __device__ __forceinline__ int count() const {
        return n_local + (pm->mem_len + local.bc - 1) / local.bc;
    }
    __device__ __forceinline__ int tile(int n) const {
        return n < n_local ? local.tile(n) : n - n_local;
    }
    __device__ __forceinline__ int variant(int n) const { return n < n_local ? 0 : 1; }
    __device__ __forceinline__ bool is_full(int n) const {
        if (n < n_local) return local.is_full(n);
        return pm->mem_mask == nullptr &&
               static_cast<int64_t>(n - n_local + 1) * local.bc <= pm->mem_len;
    }
};

// Local items: the causal / window interval of the row. Memory items: the entries inside
// mem_len that the memory mask (when given: one byte per entry of batch entry b) shows.
struct MemoryMask {
    const LfMemoryFwdParams *pm;
    int b;
    struct RowKeys {
        int lo, hi;
        const uint8_t *vis; // the tile's first entry's byte, or nullptr
        __device__ __forceinline__ bool visible(int j) const {
            return j >= lo && j < hi && (vis == nullptr || vis[j] != 0);
        }
    };
    template <class Iter>
    __device__ __forceinline__ RowKeys row_keys(const Iter &iter, int n, int64_t i, int k0,
                                                int span) const {
        const LfMask &m = pm->fwd.mask;
        if (iter.variant(n) == 0) {
            int64_t l, h, sh;
            lf_row_key_bounds(m, i, &l, &h, &sh);
            auto rel = [&](int64_t x) {
                return static_cast<int>(lf_min64(lf_max64(x - k0, 0), span));
            };
            return RowKeys{rel(l), rel(h), nullptr};
        }
        const int hi = i < m.seqlen_q ? min(span, pm->mem_len - k0) : 0;
        const uint8_t *vis = pm->mem_mask != nullptr
                                 ? pm->mem_mask + static_cast<int64_t>(b) * pm->mem_len + k0
                                 : nullptr;
        return RowKeys{0, hi, vis};
    }
};

// Keys and values of both sources at key-value head hk of batch entry b, computed from the
// launch's parameters when asked: variant 0 the local window's keys (rotated into the key pass's
// workspace when the call rotates) and values, variant 1 the memory's.
struct MemoryKeys {
    const LfMemoryFwdParams *pm;
    int b, hk;
    __device__ __forceinline__ const uint16_t *tile(int var, int kt, int bc) const {
        const LfFwdParams &p = pm->fwd;
        const uint16_t *base;
        if (var)
            base = static_cast<const uint16_t *>(pm->mem_k) + b * pm->mem_k_batch_stride +
                   hk * pm->mem_k_head_stride;
        else if (pm->rotate)
            base = static_cast<const uint16_t *>(pm->rope.k_rot) +
                   (static_cast<int64_t>(b) * p.mask.seqlen_k * p.heads_kv + hk) * p.head_dim;
        else
            base = static_cast<const uint16_t *>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
        return base + static_cast<int64_t>(kt) * bc * stride(var);
    }
    __device__ __forceinline__ int64_t stride(int var) const {
        const LfFwdParams &p = pm->fwd;
        if (var) return pm->mem_k_row_stride;
        return pm->rotate ? static_cast<int64_t>(p.heads_kv) * p.head_dim : p.k_row_stride;
    }
    __device__ __forceinline__ const uint16_t *v_tile(int var, int kt, int bc) const {
        const LfFwdParams &p = pm->fwd;
        const uint16_t *base =
            var ? static_cast<const uint16_t *>(pm->mem_v) + b * pm->mem_v_batch_stride +
                      hk * pm->mem_v_head_stride
                : static_cast<const uint16_t *>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
        return base + static_cast<int64_t>(kt) * bc * v_row_stride(var);
    }
    __device__ __forceinline__ int64_t v_row_stride(int var) const {
        return var ? pm->mem_v_row_stride : pm->fwd.v_row_stride;
    }
    // Rows of the source from tile kt's first on (the loads zero-fill past them).
    __device__ __forceinline__ int rows(int var, int kt, int bc) const {
        return (var ? pm->mem_len : pm->fwd.mask.seqlen_k) - kt * bc;
    }
};
template <> struct OwnsValues<MemoryKeys> : std::true_type {};

// The plain-RoPE rotation of the loaded Q tile when the call rotates, nothing otherwise.
template <class Tr> struct MaybeRopeQPrep {
    static constexpr bool kActive = true;
    RopeQPrep<Tr> rope;
    bool rotate;
    __device__ __forceinline__ void operator()(uint32_t sQ, int warp_row0, int lane, int q0) const {
        if (rotate) rope(sQ, warp_row0, lane, q0);
    }
};

} // namespace lf
