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
#include "policies/rope.cuh"

namespace lf {

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

// Rotates pair f of one key (at `pos`) from `src` into `rot` (R_pos k) and, when not null,
// `alt` (the outside-window key: R_0 k for ReRoPE, R_{pos / leak} k for Leaky ReRoPE).
template <typename T>
__device__ __forceinline__ void rope_key_pair(const LfRope &r, const uint16_t *src, uint16_t *rot,
                                              uint16_t *alt, int f, int64_t pos_i) {
    int xi, yi;
    rope_pair(r, f, xi, yi);
    const float x = Elem<T>::to_float(src[xi]), y = Elem<T>::to_float(src[yi]);
    float x0 = x, y0 = y, x1 = x, y1 = y;
    if (f < r.rotary_dim / 2) {
        const double pos = static_cast<double>(pos_i);
        const double freq = r.inv_freq[f];
        const float af = r.attention_factor;
        rope_turn(pos, freq, af, x, y, x0, y0);
        if (r.mode == 1) { // R_0: no rotation, the attention factor only
            x1 = af * x;
            y1 = af * y;
        } else if (r.mode == 2) {
            rope_turn(pos * r.inv_leak, freq, af, x, y, x1, y1);
        }
    }
    rot[xi] = Elem<T>::to_bits(x0);
    rot[yi] = Elem<T>::to_bits(y0);
    if (alt) {
        alt[xi] = Elem<T>::to_bits(x1);
        alt[yi] = Elem<T>::to_bits(y1);
    }
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
    const uint16_t *src = static_cast<const uint16_t *>(p.k) + b * p.k_batch_stride +
                          j * p.k_row_stride + hk * p.k_head_stride;
    const int64_t dst = ((static_cast<int64_t>(b) * p.seqlen_k + j) * p.heads_kv + hk) * p.head_dim;
    uint16_t *rot = static_cast<uint16_t *>(const_cast<void *>(r.k_rot)) + dst;
    uint16_t *alt = r.k_alt ? static_cast<uint16_t *>(const_cast<void *>(r.k_alt)) + dst : nullptr;
    rope_key_pair<T>(r, src, rot, alt, f, rope_key_position(r, b, j));
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
