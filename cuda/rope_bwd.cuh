// The RoPE / ReRoPE / Leaky ReRoPE backward's own passes. The backward splits the forward's score
// set at the window: the pairs inside it (rel < w) are plain attention over the inside-rotated
// queries and keys, those outside (rel >= w) plain attention over the outside-rotated ones, which
// is causal attention over the first seqlen_k - w keys. Given the forward's LSE each half is one
// call of the exact backward (cuda/bwd.cuh); these passes prepare its rotated queries and turn
// the halves' gradients back to the un-rotated inputs (src/attention/rope_backward.rs).
#pragma once

#include "common.cuh"
#include "policies/rope.cuh"

namespace lf {

// The query pass: one thread per (batch, query, head, pair), as the forward's Q preparation.
template <typename T> __device__ __forceinline__ void rope_queries(const LfRopeQueriesParams &p) {
    const LfRope &r = p.rope;
    const int pairs = p.head_dim / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.heads_q * pairs;
    if (idx >= total) return;
    const int f = static_cast<int>(idx % pairs);
    int64_t rest = idx / pairs;
    const int h = static_cast<int>(rest % p.heads_q);
    rest /= p.heads_q;
    const int i = static_cast<int>(rest % p.seqlen_q);
    const int b = static_cast<int>(rest / p.seqlen_q);
    int xi, yi;
    rope_pair(r, f, xi, yi);
    const uint16_t *src = static_cast<const uint16_t *>(p.q) + b * p.q_batch_stride +
                          i * p.q_row_stride + h * p.q_head_stride;
    int len = p.seqlen_k;
    if (p.seqlens_k != nullptr) len = min(max(p.seqlens_k[b], 0), p.seqlen_k);
    const double pos =
        static_cast<double>(rope_key_position(r, b, static_cast<int64_t>(len) - p.seqlen_q + i));
    float x0, y0, x1, y1;
    rope_query_pair(r, f, pos, Elem<T>::to_float(src[xi]), Elem<T>::to_float(src[yi]), x0, y0, x1,
                    y1);
    const int64_t dst = ((static_cast<int64_t>(b) * p.seqlen_q + i) * p.heads_q + h) * p.head_dim;
    uint16_t *in = static_cast<uint16_t *>(p.q_in) + dst;
    in[xi] = Elem<T>::to_bits(x0);
    in[yi] = Elem<T>::to_bits(y0);
    if (p.q_out) {
        uint16_t *out = static_cast<uint16_t *>(p.q_out) + dst;
        out[xi] = Elem<T>::to_bits(x1);
        out[yi] = Elem<T>::to_bits(y1);
    }
}

// The transpose of a forward turn to `pos` (af R_pos): af R_-pos, on one pair, added to (x, y).
__device__ __forceinline__ void rope_turn_back_add(double pos, double freq, float af, float gx,
                                                   float gy, float &x, float &y) {
    float c, s;
    rope_cos_sin(pos, freq, c, s);
    x += af * (gx * c + gy * s);
    y += af * (gy * c - gx * s);
}

// The gradient pass: one thread per (batch, row, head, pair) of g.
template <typename T> __device__ __forceinline__ void rope_grads(const LfRopeGradsParams &p) {
    const LfRope &r = p.rope;
    const int pairs = p.head_dim / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t total = static_cast<int64_t>(p.batch) * p.rows * p.heads * pairs;
    if (idx >= total) return;
    const int f = static_cast<int>(idx % pairs);
    int64_t rest = idx / pairs;
    const int h = static_cast<int>(rest % p.heads);
    rest /= p.heads;
    const int j = static_cast<int>(rest % p.rows);
    const int b = static_cast<int>(rest / p.rows);
    int xi, yi;
    rope_pair(r, f, xi, yi);
    uint16_t *g = static_cast<uint16_t *>(p.g) + b * p.g_batch_stride + j * p.g_row_stride +
                  h * p.g_head_stride;
    const float gx = Elem<T>::to_float(g[xi]), gy = Elem<T>::to_float(g[yi]);
    const bool has_out = p.g_out != nullptr && j < p.rows_out;
    float ox = 0.f, oy = 0.f;
    int64_t o_at = 0;
    if (has_out) {
        o_at = ((static_cast<int64_t>(b) * p.rows_out + j) * p.heads + h) * p.head_dim;
        const uint16_t *go = static_cast<const uint16_t *>(p.g_out) + o_at;
        ox = Elem<T>::to_float(go[xi]);
        oy = Elem<T>::to_float(go[yi]);
    }
    // Positions: a query at off + seqlen_k - seqlen_q + j, a key at off + j; the outside side's
    // as in the forward (queries: rope_outside_q_pos; keys: 0 for ReRoPE, pos / k for Leaky).
    const double pos = static_cast<double>(rope_key_position(
        r, b, p.queries ? static_cast<int64_t>(p.seqlen_k) - p.seqlen_q + j : j));
    float x = 0.f, y = 0.f;
    if (f < r.rotary_dim / 2) {
        const double freq = r.inv_freq[f];
        const float af = r.attention_factor;
        rope_turn_back_add(pos, freq, af, gx, gy, x, y);
        if (has_out) {
            const double pos_out = p.queries ? rope_outside_q_pos(r, pos)
                                             : (r.mode == 1 ? 0.0 : pos * r.inv_leak);
            rope_turn_back_add(pos_out, freq, af, ox, oy, x, y);
        }
    } else {
        x = gx + ox;
        y = gy + oy;
    }
    if (p.queries) {
        const float m = rope_log_n(r, pos);
        x *= m;
        y *= m;
    }
    g[xi] = Elem<T>::to_bits(x);
    g[yi] = Elem<T>::to_bits(y);
    if (p.dv && has_out) {
        // dV: the halves' sums, pair by pair (the same elements as the gradient's pair).
        uint16_t *dv = static_cast<uint16_t *>(p.dv) + b * p.dv_batch_stride +
                       j * p.dv_row_stride + h * p.dv_head_stride;
        const uint16_t *dvo = static_cast<const uint16_t *>(p.dv_out) + o_at;
        dv[xi] = Elem<T>::to_bits(Elem<T>::to_float(dv[xi]) + Elem<T>::to_float(dvo[xi]));
        dv[yi] = Elem<T>::to_bits(Elem<T>::to_float(dv[yi]) + Elem<T>::to_float(dvo[yi]));
    }
}

} // namespace lf

#define LF_DEFINE_ROPE_BWD_KERNELS(DT, T)                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        lf_rope_bwd_##DT##_queries(const __grid_constant__ LfRopeQueriesParams p) {               \
        lf::rope_queries<T>(p);                                                                   \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        lf_rope_bwd_##DT##_grads(const __grid_constant__ LfRopeGradsParams p) {                   \
        lf::rope_grads<T>(p);                                                                     \
    }
