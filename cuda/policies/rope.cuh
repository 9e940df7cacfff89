// RoPE / ReRoPE / Leaky ReRoPE policies (LfRope): angles, the inside/outside/straddling tile
// iterator that wraps a base iterator, the element mask narrowed to one side of the window, the
// rotated-key sources, and the Q preparation that rotates the loaded Q tile into its two
// variants. See rope.cuh for how they make the kernel.
#pragma once

#include "../common.cuh"
#include "iterators.cuh"
#include "longflash/params.h"
#include "longflash/tile_plan.h"

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

// A forward turn of one pair (x, y) to `pos`: the rotation by pos * freq, scaled by af.
__device__ __forceinline__ void rope_turn(double pos, double freq, float af, float x, float y,
                                          float &xo, float &yo) {
    float c, s;
    rope_cos_sin(pos, freq, c, s);
    xo = af * (x * c - y * s);
    yo = af * (x * s + y * c);
}

// The log-n factor of a query at `pos` (1 when log-n scaling is off or pos <= 0).
__device__ __forceinline__ float rope_log_n(const LfRope &r, double pos) {
    return r.log_n_inv_ln_train > 0.f
               ? fmaxf(1.f, logf(static_cast<float>(pos) + 1.f) * r.log_n_inv_ln_train)
               : 1.f;
}

// Where a query at `pos` is turned to on the outside of the window: w (ReRoPE) or
// pos / k + w - w / k (Leaky ReRoPE).
__device__ __forceinline__ double rope_outside_q_pos(const LfRope &r, double pos) {
    return r.mode == 1 ? static_cast<double>(r.window)
                       : pos * r.inv_leak + r.window - r.window * r.inv_leak;
}

// Pair f (elements x, y) of a query at `pos`, as each side of the window sees it: times the log-n
// factor, then turned to pos (x0, y0) and, unless plain RoPE, to the outside position (x1, y1),
// the rotated part scaled by the attention factor; a tail pair only takes the log-n factor. The
// forward's Q preparation and the backward's query pass both compute queries so.
__device__ __forceinline__ void rope_query_pair(const LfRope &r, int f, double pos, float x,
                                                float y, float &x0, float &y0, float &x1,
                                                float &y1) {
    const float m = rope_log_n(r, pos);
    x *= m;
    y *= m;
    x0 = x1 = x;
    y0 = y1 = y;
    if (f < r.rotary_dim / 2) {
        const double freq = r.inv_freq[f];
        rope_turn(pos, freq, r.attention_factor, x, y, x0, y0);
        if (r.mode != 0) rope_turn(rope_outside_q_pos(r, pos), freq, r.attention_factor, x, y, x1, y1);
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
    static constexpr bool kKeyBytes = false; // no per-key mask
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
#if defined(LF_ROPE_Q_STEPS) && LF_ROPE_Q_STEPS
// Built with LF_ROPE_Q_STEPS=1: each lane keeps its pairs (f = lane, lane + 32, ...) for all the
// warp's rows, reads each frequency once, takes the angle of the first row from rope_cos_sin
// (f64 reduction) and steps to the next rows by one rotation of the per-row angle (four FMAs; the
// step's own error, about 4e-7 rad from __sincosf, adds up over the warp's rows: about 1e-5 rad
// after 31 steps, far below 16-bit rounding). The default computes every element's
// angle from scratch, with a global load of its frequency.
template <class Tr> struct RopeQPrep {
    static constexpr bool kActive = true;
    const LfRope *r;
    int seqlen_q, seqlen_k, batch_index;
    __device__ __forceinline__ void operator()(uint32_t sQ, int warp_row0, int lane, int q0) const {
        using Tile = typename Tr::Tile;
        using T = typename Tr::T;
        const LfRope &rp = *r;
        const int64_t base = rope_key_position(rp, batch_index, seqlen_k - seqlen_q);
        constexpr int kPairs = Tr::D / 2;
        static_assert(kPairs % 32 == 0, "whole pairs per lane");
        const double pos0 = static_cast<double>(base + q0 + warp_row0);
        const float af = rp.attention_factor;
#pragma unroll
        for (int fi = 0; fi < kPairs / 32; ++fi) {
            const int f = lane + 32 * fi;
            int xi, yi;
            rope_pair(rp, f, xi, yi);
            const bool rotary = f < rp.rotary_dim / 2;
            const double freq = rotary ? rp.inv_freq[f] : 0.0;
            // Variant 0 at pos0 + row; variant 1 at w (ReRoPE) or (pos0 + row) / k + w - w / k
            // (Leaky ReRoPE): both linear in the row, so both step by a fixed rotation.
            float c0, s0, dc0, ds0, c1 = 1.f, s1 = 0.f, dc1 = 1.f, ds1 = 0.f;
            rope_cos_sin(pos0, freq, c0, s0);
            rope_cos_sin(1.0, freq, dc0, ds0);
            if (rp.mode == 1) {
                rope_cos_sin(static_cast<double>(rp.window), freq, c1, s1);
            } else if (rp.mode != 0) {
                rope_cos_sin(pos0 * rp.inv_leak + rp.window - rp.window * rp.inv_leak, freq, c1, s1);
                rope_cos_sin(static_cast<double>(rp.inv_leak), freq, dc1, ds1);
            }
            for (int row_i = 0; row_i < Tr::kWarpRows; ++row_i) {
                const int row = warp_row0 + row_i;
                const uint32_t ax = sQ + Tile::offset(row, xi), ay = sQ + Tile::offset(row, yi);
                uint16_t hx, hy;
                asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hx) : "r"(ax));
                asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(hy) : "r"(ay));
                float x = Elem<T>::to_float(hx), y = Elem<T>::to_float(hy);
                if (rp.log_n_inv_ln_train > 0.f) {
                    const float pos = static_cast<float>(pos0 + row_i);
                    const float sc = fmaxf(1.f, logf(pos + 1.f) * rp.log_n_inv_ln_train);
                    x *= sc;
                    y *= sc;
                }
                float x0 = x, y0 = y, x1 = x, y1 = y;
                if (rotary) {
                    x0 = af * (x * c0 - y * s0);
                    y0 = af * (x * s0 + y * c0);
                    if (rp.mode != 0) {
                        x1 = af * (x * c1 - y * s1);
                        y1 = af * (x * s1 + y * c1);
                    }
                }
                const uint32_t o1 = Tr::kQBytes;
                asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ax), "h"(Elem<T>::to_bits(x0)));
                asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ay), "h"(Elem<T>::to_bits(y0)));
                if (rp.mode != 0) {
                    asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ax + o1), "h"(Elem<T>::to_bits(x1)));
                    asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ay + o1), "h"(Elem<T>::to_bits(y1)));
                }
                // Next row: the angles grow by freq (and freq / k for Leaky's variant 1).
                const float c0n = c0 * dc0 - s0 * ds0, s0n = s0 * dc0 + c0 * ds0;
                c0 = c0n;
                s0 = s0n;
                const float c1n = c1 * dc1 - s1 * ds1, s1n = s1 * dc1 + c1 * ds1;
                c1 = c1n;
                s1 = s1n;
            }
        }
        __syncwarp();
    }
};
#else
template <class Tr> struct RopeQPrep {
    static constexpr bool kActive = true;
    const LfRope *r;
    int seqlen_q, seqlen_k, batch_index;
    __device__ __forceinline__ void operator()(uint32_t sQ, int warp_row0, int lane, int q0) const {
        using Tile = typename Tr::Tile;
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
            float x0, y0, x1, y1;
            rope_query_pair(rp, f, pos, Elem<T>::to_float(hx), Elem<T>::to_float(hy), x0, y0, x1, y1);
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
#endif

} // namespace lf
