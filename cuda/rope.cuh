// Rotary position embeddings inside the causal forward: RoPE, ReRoPE and Leaky ReRoPE (LfRope).
//
// The skeleton is the same (fwd.cuh); what changes is the score's inputs. Keys are rotated once
// by lf_rope_keys into two workspaces (R_pos(j) k, and the outside-window keys); each CTA
// rotates its Q tile in shared memory into two variants (R_pos(i) q, and the outside-window
// query). The tile iterator classifies each key tile by its relative positions: all inside the
// window (one pass with the inside variants), all outside (one pass with the outside variants),
// or straddling, which becomes two passes over the same tile with complementary element masks
// (rel < w, rel >= w). The online softmax does not care that a tile's elements arrive in two
// passes, so straddling tiles need no second score matrix in registers.
#pragma once

#include <type_traits>

#include "fwd.cuh"

namespace lf {

// ---- angles -----------------------------------------------------------------------------------

// cos and sin of position * freq, for positions up to 2^31 and beyond: the product and its
// reduction to [-pi, pi] are done in f64, so the angle keeps ~1e-9 rad absolute accuracy at
// 256k tokens (f32 would lose ~1e-2 rad); the final sin/cos of the small angle run in f32.
__device__ __forceinline__ void rope_cos_sin(double position, double freq, float &c, float &s) {
    const double two_pi = 6.283185307179586476925286766559;
    const double a = position * freq;
    const double k = rint(a * (1.0 / two_pi));
    const float r = static_cast<float>(fma(-k, two_pi, a));
    __sincosf(r, &s, &c);
}

__device__ __forceinline__ int64_t rope_key_position(const LfRope &r, int b, int64_t j) {
    return (r.position_offsets ? r.position_offsets[b] : 0) + j;
}

// Element index of pair member 0/1 of pair f (f < rotary_dim / 2: rotary pairs; above: the
// untouched tail, taken two elements at a time).
__device__ __forceinline__ void rope_pair(const LfRope &r, int f, int &x, int &y) {
    const int half = r.rotary_dim / 2;
    if (f < half) {
        x = r.interleaved ? 2 * f : f;
        y = r.interleaved ? 2 * f + 1 : f + half;
    } else {
        x = r.rotary_dim + 2 * (f - half);
        y = x + 1;
    }
}

// ---- tile iterator ------------------------------------------------------------------------------

template <class Base>
__device__ __forceinline__ Base make_base(const LfFwdParams &p, int qt, int br, int bc, int b, int h);
template <>
__device__ __forceinline__ WindowIter make_base<WindowIter>(const LfFwdParams &p, int qt, int br,
                                                            int bc, int, int) {
    return WindowIter(p.mask, qt, br, bc);
}
template <>
__device__ __forceinline__ CsrIter make_base<CsrIter>(const LfFwdParams &p, int qt, int br, int,
                                                      int b, int h) {
    return CsrIter(p.sparse, qt, br, b, h);
}

// Wraps a base tile iterator (the dense causal/window plan, or a block mask's row; both visit
// last to first) and emits each tile once when it lies wholly inside the ReRoPE window (variant
// 0) or wholly outside it (variant 1), and twice when it straddles the window edge (variant 0
// with rel < w, then variant 1 with rel >= w). Inside tiles are those with index >= a, outside
// those below b, so in the base order they form three consecutive runs. Plain RoPE is the case
// where every tile is inside.
template <class Base> struct ReRopeIter {
    Base base;
    int n_in, n_str, count_;
    __device__ __forceinline__ ReRopeIter(const Base &base_, const LfMask &m, const LfRope &r,
                                          int qt, int br, int bc)
        : base(base_) {
        const int n = base.count();
        if (r.mode == 0) {
            n_in = n;
            n_str = 0;
        } else {
            const int64_t off = lf_diag_offset(m);
            const int64_t q0 = static_cast<int64_t>(qt) * br;
            const int64_t q1 = lf_min64(q0 + br, m.seqlen_q) - 1;
            // Inside iff q1 + off - kt*bc < w; outside iff q0 + off - (kt*bc + bc - 1) >= w.
            const int64_t x = q1 + off - r.window;
            const int64_t a = x < 0 ? 0 : x / bc + 1;
            const int64_t y = q0 + off - r.window - bc + 1;
            const int64_t b = y < 0 ? 0 : y / bc + 1;
            n_in = base.count_at_least(a);
            n_str = base.count_at_least(b) - n_in;
        }
        count_ = n + n_str;
    }
    __device__ __forceinline__ int base_index(int i) const {
        if (i < n_in) return i;
        if (i < n_in + 2 * n_str) return n_in + (i - n_in) / 2;
        return i - n_str;
    }
    __device__ __forceinline__ int count() const { return count_; }
    __device__ __forceinline__ int tile(int i) const { return base.tile(base_index(i)); }
    __device__ __forceinline__ int variant(int i) const {
        if (i < n_in) return 0;
        if (i < n_in + 2 * n_str) return (i - n_in) & 1;
        return 1;
    }
    __device__ __forceinline__ bool straddles(int i) const {
        return i >= n_in && i < n_in + 2 * n_str;
    }
    __device__ __forceinline__ bool is_full(int i) const {
        return !straddles(i) && base.is_full(base_index(i));
    }
};

// The causal/window element mask, narrowed on straddling tiles to the item's side of the window.
struct ReRopeMask {
    LfMask m;
    int window;
    struct RowKeys {
        int lo, hi;
        __device__ __forceinline__ bool visible(int j) const { return j >= lo && j < hi; }
    };
    template <class Iter>
    __device__ __forceinline__ RowKeys row_keys(const Iter &iter, int n, int64_t i, int k0,
                                                int span) const {
        int64_t l, h, sh;
        lf_row_key_bounds(m, i, &l, &h, &sh);
        if (iter.straddles(n)) {
            const int64_t edge = i + lf_diag_offset(m) - window; // rel >= w  <=>  j <= edge
            if (iter.variant(n) == 0)
                l = lf_max64(l, edge + 1);
            else
                h = lf_min64(h, edge + 1);
        }
        auto rel = [&](int64_t x) { return static_cast<int>(lf_min64(lf_max64(x - k0, 0), span)); };
        return RowKeys{rel(l), rel(h)};
    }
};

// Keys: variant 0 from k_rot, variant 1 from k_alt (contiguous [b, sk, hkv, d] workspaces).
struct RopeKeys {
    const uint16_t *rot, *alt;
    int64_t row_stride;
    __device__ __forceinline__ const uint16_t *tile(int v, int kt, int bc) const {
        return (v ? alt : rot) + static_cast<int64_t>(kt) * bc * row_stride;
    }
    __device__ __forceinline__ int64_t stride(int) const { return row_stride; }
};

// Rotates the warp's own rows of the loaded Q tile into variant 0 (R_pos(i) q, in place) and
// variant 1 (the outside-window query, in the second Q tile), with log-n scaling.
template <class Tr> struct RopeQPrep {
    const LfRope *r;
    int seqlen_q, seqlen_k, batch_index;
    __device__ __forceinline__ void operator()(uint32_t sQ, int warp_row0, int lane, int q0) const {
        using Tile = SwizzledTile<Tr::D>;
        using T = typename Tr::T;
        const LfRope &rp = *r;
        const int64_t base = rope_key_position(rp, batch_index, seqlen_k - seqlen_q);
        constexpr int kPairs = Tr::D / 2;
        for (int idx = lane; idx < Tr::kWarpRows * kPairs; idx += 32) {
            const int row = warp_row0 + idx / kPairs;
            const int f = idx % kPairs;
            const double pos = static_cast<double>(base + q0 + row);
            int xi, yi;
            rope_pair(rp, f, xi, yi);
            const uint32_t ax = sQ + Tile::offset(row, xi), ay = sQ + Tile::offset(row, yi);
            uint16_t hx, hy;
            asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hx) : "r"(ax));
            asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hy) : "r"(ay));
            float x = Elem<T>::to_float(hx), y = Elem<T>::to_float(hy);
            if (rp.log_n_inv_ln_train > 0.f) {
                const float sc = fmaxf(1.f, logf(static_cast<float>(pos) + 1.f) * rp.log_n_inv_ln_train);
                x *= sc;
                y *= sc;
            }
            float x0 = x, y0 = y, x1 = x, y1 = y;
            if (f < rp.rotary_dim / 2) {
                const double freq = rp.inv_freq[f];
                const float af = rp.attention_factor;
                float c, s;
                rope_cos_sin(pos, freq, c, s);
                x0 = af * (x * c - y * s);
                y0 = af * (x * s + y * c);
                if (rp.mode != 0) {
                    const double p1 = rp.mode == 1 ? static_cast<double>(rp.window)
                                                    : pos * rp.inv_leak + rp.window - rp.window * rp.inv_leak;
                    rope_cos_sin(p1, freq, c, s);
                    x1 = af * (x * c - y * s);
                    y1 = af * (x * s + y * c);
                }
            }
            const uint32_t o1 = Tr::kQBytes;
            asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ax), "h"(Elem<T>::to_bits(x0)));
            asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ay), "h"(Elem<T>::to_bits(y0)));
            if (rp.mode != 0) {
                asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ax + o1), "h"(Elem<T>::to_bits(x1)));
                asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ay + o1), "h"(Elem<T>::to_bits(y1)));
            }
        }
        __syncwarp();
    }
};

// The RoPE forward over the key tiles of Base: WindowIter (causal, optionally windowed) or
// CsrIter (a block mask's row).
template <class Tr, bool kSparse>
__device__ __forceinline__ void rope_fwd(const LfRopeFwdParams &pr) {
    const LfFwdParams &p = pr.fwd;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    using Base = typename std::conditional<kSparse, CsrIter, WindowIter>::type;
    const Base base = make_base<Base>(p, qt, Tr::BR, Tr::BC, b, h);
    ReRopeIter<Base> iter(base, p.mask, pr.rope, qt, Tr::BR, Tr::BC);
    ReRopeMask mask{p.mask, pr.rope.window};
    const int hk = h / (p.heads_q / p.heads_kv);
    const int64_t row = static_cast<int64_t>(p.heads_kv) * p.head_dim;
    const int64_t head_off = (static_cast<int64_t>(b) * p.mask.seqlen_k * p.heads_kv + hk) * p.head_dim;
    RopeKeys keys{static_cast<const uint16_t *>(pr.rope.k_rot) + head_off,
                  pr.rope.k_alt ? static_cast<const uint16_t *>(pr.rope.k_alt) + head_off : nullptr, row};
    RopeQPrep<Tr> prep{&pr.rope, p.mask.seqlen_q, p.mask.seqlen_k, b};
    attention_fwd_tile<Tr, ReRopeIter<Base>, ReRopeMask, PlainScore>(p, iter, mask, keys, prep, qt,
                                                                    h, b);
}

// The key-rotation pass: one thread per (batch, key, kv head, pair).
template <typename T> __device__ __forceinline__ void rope_keys(const LfRopeKeysParams &p) {
    const LfRope &r = p.rope;
    const int pairs = p.head_dim / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t total = static_cast<int64_t>(p.batch) * p.seqlen_k * p.heads_kv * pairs;
    if (idx >= total) return;
    const int f = static_cast<int>(idx % pairs);
    int64_t rest = idx / pairs;
    const int hk = static_cast<int>(rest % p.heads_kv);
    rest /= p.heads_kv;
    const int j = static_cast<int>(rest % p.seqlen_k);
    const int b = static_cast<int>(rest / p.seqlen_k);
    int xi, yi;
    rope_pair(r, f, xi, yi);
    const uint16_t *src = static_cast<const uint16_t *>(p.k) + b * p.k_batch_stride +
                          j * p.k_row_stride + hk * p.k_head_stride;
    const float x = Elem<T>::to_float(src[xi]), y = Elem<T>::to_float(src[yi]);
    const int64_t dst = ((static_cast<int64_t>(b) * p.seqlen_k + j) * p.heads_kv + hk) * p.head_dim;
    uint16_t *rot = static_cast<uint16_t *>(const_cast<void *>(r.k_rot)) + dst;
    uint16_t *alt = r.k_alt ? static_cast<uint16_t *>(const_cast<void *>(r.k_alt)) + dst : nullptr;
    float x0 = x, y0 = y, x1 = x, y1 = y;
    if (f < r.rotary_dim / 2) {
        const double pos = static_cast<double>(rope_key_position(r, b, j));
        const double freq = r.inv_freq[f];
        const float af = r.attention_factor;
        float c, s;
        rope_cos_sin(pos, freq, c, s);
        x0 = af * (x * c - y * s);
        y0 = af * (x * s + y * c);
        if (r.mode == 1) { // R_0: no rotation, the attention factor only
            x1 = af * x;
            y1 = af * y;
        } else if (r.mode == 2) {
            rope_cos_sin(pos * r.inv_leak, freq, c, s);
            x1 = af * (x * c - y * s);
            y1 = af * (x * s + y * c);
        }
    }
    rot[xi] = Elem<T>::to_bits(x0);
    rot[yi] = Elem<T>::to_bits(y0);
    if (alt) {
        alt[xi] = Elem<T>::to_bits(x1);
        alt[yi] = Elem<T>::to_bits(y1);
    }
}

} // namespace lf

#define LF_DEFINE_ROPE_KERNEL(NAME, T, D)                                                         \
    using NAME##_traits = lf::FwdTraits<T, D, LF_FWD_BR_D##D, LF_FWD_BC_D##D, LF_FWD_WARPS, 2>;  \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfRopeFwdParams p) {                                         \
        lf::rope_fwd<NAME##_traits, false>(p);                                                    \
    }

// The same over a block mask's listed blocks.
#define LF_DEFINE_ROPE_SPARSE_KERNEL(NAME, T, D)                                                  \
    using NAME##_traits = lf::FwdTraits<T, D, LF_FWD_BR_D##D, LF_FWD_BC_D##D, LF_FWD_WARPS, 2>;  \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads)                         \
        NAME(const __grid_constant__ LfRopeFwdParams p) {                                         \
        lf::rope_fwd<NAME##_traits, true>(p);                                                     \
    }

#define LF_DEFINE_ROPE_KEYS_KERNEL(NAME, T)                                                       \
    extern "C" __global__ void __launch_bounds__(256) NAME(const __grid_constant__ LfRopeKeysParams p) { \
        lf::rope_keys<T>(p);                                                                      \
    }
