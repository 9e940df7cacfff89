// The backward of the exact forward (dense, causal, sliding window): the pre-pass, the dK / dV
// kernel over the dense plan's transpose, the deterministic mode's dQ pass and the conversion of
// the f32 dQ accumulator. A call runs
//   atomic dQ:      pre (D, LSE in log2 units, dq_accum cleared) -> main (dK, dV, dq_accum += ...)
//                   -> convert (dq = scale * dq_accum in the element type)
//   deterministic:  pre (D, LSE) -> main without dQ -> dq (one CTA per query tile writes dq)
#pragma once

#include "policies/iterators.cuh"
#include "policies/masks.cuh"
#include "sm80/backward.cuh"

namespace lf {

// Warp grids of the three products of attention_bwd_kv per head dim (see BwdTraits): chosen so
// that each warp loads as few operands per mma as the tile allows.
template <int D> struct BwdWarpGrid;
template <> struct BwdWarpGrid<64> {
    static constexpr int kWM1 = 8, kWM2 = 4, kWM3 = 4;
};
template <> struct BwdWarpGrid<128> {
    static constexpr int kWM1 = 4, kWM2 = 4, kWM3 = 2;
};
// The main kernels with taller query steps (LF_BWD_TALL_BR_D<D>, where the device has the shared
// memory): at head dim 64 the 128 x 128 tile's products split 4 x 2, each warp a 32 x 64 (S^T,
// dP^T) or 32 x 32 (dK, dV, dQ) block; at head dim 256 the 64 x 64 tile's S^T and dP^T split
// 4 x 2 (16 x 32 per warp), dK, dV and dQ 2 x 4 (32 x 64). (-DLF_BWD_TALL_WM1=.. etc. build other
// grids at head dim 64, for timing them against this one.)
#ifndef LF_BWD_TALL_WM1
#define LF_BWD_TALL_WM1 4
#endif
#ifndef LF_BWD_TALL_WM2
#define LF_BWD_TALL_WM2 4
#endif
#ifndef LF_BWD_TALL_WM3
#define LF_BWD_TALL_WM3 4
#endif
template <int D> struct BwdTallWarpGrid;
template <> struct BwdTallWarpGrid<64> {
    static constexpr int kWM1 = LF_BWD_TALL_WM1, kWM2 = LF_BWD_TALL_WM2, kWM3 = LF_BWD_TALL_WM3;
};
template <> struct BwdTallWarpGrid<256> {
    static constexpr int kWM1 = 4, kWM2 = 2, kWM3 = 2;
};
template <> struct BwdWarpGrid<256> {
    static constexpr int kWM1 = 4, kWM2 = 2, kWM3 = 2;
};

// Pre-pass, one CTA per (LF_BWD_ROW_PAD workspace rows, query head, batch entry): D_i = dO_i . O_i
// in f32, the LSE in log2 units (+inf for a row that sees no key, and for padding rows, so their
// P is exactly 0 wherever it is recomputed), and the dQ accumulator's rows cleared when there is
// one. A row of the head is read by head_dim / 8 threads (16 bytes each), reduced by shuffles.
template <typename T> __device__ __forceinline__ void bwd_pre(const LfBwdParams &p) {
    using Elt = Elem<T>;
    constexpr float kLog2e = 1.4426950408889634f;
    const int rb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x;
    const int chunks = p.head_dim / 8; // 8, 16 or 32: divides a warp
    const int per_pass = LF_BWD_AUX_THREADS / chunks;
    const int r0 = tid / chunks;
    const int c = (tid % chunks) * 8;
    const int seqlen_q = p.mask.seqlen_q;
    const int64_t ws_row0 = (static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad;
    const uint16_t *o = static_cast<const uint16_t *>(p.o) + b * p.o_batch_stride +
                        h * p.o_head_stride;
    const uint16_t *dout = static_cast<const uint16_t *>(p.dout) + b * p.do_batch_stride +
                           h * p.do_head_stride;
    // Every thread runs the same number of passes, so the shuffles see the whole warp.
    for (int r = r0; r < LF_BWD_ROW_PAD; r += per_pass) {
        const int i = rb * LF_BWD_ROW_PAD + r;
        float acc = 0.f;
        if (i < seqlen_q) {
            const uint4 ov = *reinterpret_cast<const uint4 *>(o + i * p.o_row_stride + c);
            const uint4 dv = *reinterpret_cast<const uint4 *>(dout + i * p.do_row_stride + c);
            const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const float2 a = Elt::unpack(ow[x]), d = Elt::unpack(dw[x]);
                acc = fmaf(a.x, d.x, acc);
                acc = fmaf(a.y, d.y, acc);
            }
        }
        for (int off = chunks / 2; off > 0; off >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, off);
        const int64_t ws = ws_row0 + i;
        if (c == 0) {
            p.dsum[ws] = acc;
            float l2 = INFINITY;
            if (i < seqlen_q) {
                const float l = p.lse[(static_cast<int64_t>(b) * p.heads_q + h) * seqlen_q + i];
                if (l > -INFINITY) l2 = l * kLog2e;
            }
            p.lse_log2[ws] = l2;
        }
        if (p.dq_accum != nullptr) {
            float4 *a = reinterpret_cast<float4 *>(p.dq_accum + ws * p.head_dim + c);
            a[0] = make_float4(0.f, 0.f, 0.f, 0.f);
            a[1] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
}

// dq = scale * dq_accum in the element type, with dq's strides; grid as bwd_pre.
template <typename T> __device__ __forceinline__ void bwd_convert(const LfBwdParams &p) {
    using Elt = Elem<T>;
    const int rb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x;
    const int chunks = p.head_dim / 8;
    const int per_pass = LF_BWD_AUX_THREADS / chunks;
    const int c = (tid % chunks) * 8;
    const float scale = p.softmax_scale;
    const int64_t ws_row0 = (static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad;
    uint16_t *dq = static_cast<uint16_t *>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
    for (int r = tid / chunks; r < LF_BWD_ROW_PAD; r += per_pass) {
        const int i = rb * LF_BWD_ROW_PAD + r;
        if (i >= p.mask.seqlen_q) continue;
        const float4 *a = reinterpret_cast<const float4 *>(p.dq_accum + (ws_row0 + i) * p.head_dim + c);
        const float4 x = a[0], y = a[1];
        uint4 out;
        out.x = Elt::pack(x.x * scale, x.y * scale);
        out.y = Elt::pack(x.z * scale, x.w * scale);
        out.z = Elt::pack(y.x * scale, y.y * scale);
        out.w = Elt::pack(y.z * scale, y.w * scale);
        *reinterpret_cast<uint4 *>(dq + i * p.dq_row_stride + c) = out;
    }
}

// dK and dV (and the atomic dQ) of the dense plan: one CTA per (key tile, key/value head, batch
// entry), the query tiles that see the key tile visited first to last for each head of the group.
template <class Tr> __device__ __forceinline__ void window_bwd(const LfBwdParams &p) {
    const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const WindowMask mask{p.mask};
    attention_bwd_kv<Tr>(p, kt, hk, b, mask,
                         [&](int) { return WindowQueryIter(p.mask, kt, Tr::BR, Tr::BC); });
}

// The deterministic mode's dQ over the forward's dense plan (key tiles last to first, as the
// forward visits them), one CTA per (query tile, query head, batch entry).
template <class Tr> __device__ __forceinline__ void window_bwd_dq(const LfBwdParams &p) {
    const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const WindowIter iter(p.mask, qt, Tr::BR, Tr::BC);
    attention_bwd_dq<Tr>(p, iter, WindowMask{p.mask}, qt, h, b);
}

// The block-sparse backward's main kernel tiles: one key block of 64 keys per CTA, against the
// dense kernel's 128 at head dims 64 and 128; warp grids for 64-key tiles.
template <int D> struct BwdSparseWarpGrid {
    static constexpr int kWM1 = 4, kWM2 = 2, kWM3 = 2;
};

// dK and dV (and the atomic dQ) of a block mask: one CTA per (key block, key/value head, batch
// entry), over the query tiles of the query blocks that list the key block (its key-major
// column), for each query head of the group.
template <class Tr> __device__ __forceinline__ void sparse_bwd(const LfBwdSparseParams &p) {
    static_assert(Tr::BC == LF_SPARSE_K_BLOCK, "one key block per CTA");
    const int kb = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const WindowMask mask{p.bwd.mask};
    const int seqlen_q = p.bwd.mask.seqlen_q;
    attention_bwd_kv<Tr>(p.bwd, kb, hk, b, mask, [&](int h) {
        return CscQueryIter<Tr::BR>(p.cols, kb, b, h, seqlen_q);
    });
}

// The deterministic mode's dQ over a block mask's CSR rows (key tiles last to first, as the
// sparse forward visits them), one CTA per (query tile, query head, batch entry).
template <class Tr> __device__ __forceinline__ void sparse_bwd_dq(const LfBwdSparseParams &p) {
    const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const CsrTileIter<Tr::BC> iter(p.rows, qt, Tr::BR, b, h, p.bwd.mask.seqlen_k);
    attention_bwd_dq<Tr>(p.bwd, iter, WindowMask{p.bwd.mask}, qt, h, b);
}

} // namespace lf

// Defines NAME, the dense backward's main kernel (dK, dV and the atomic dQ; grid: key tiles,
// heads_kv, batch; LF_BWD_WARPS warps) at head dim D with query steps of BR rows and the warp
// grid GRID (BwdWarpGrid<D> or BwdTallWarpGrid<D>), checked against the host's sizes.
#define LF_DEFINE_BWD_MAIN_KERNEL(NAME, T, D, BR, GRID)                                          \
    using NAME##_traits = lf::BwdTraits<T, D, LF_BWD_BC_D##D, BR, LF_BWD_WARPS, GRID::kWM1,      \
                                        GRID::kWM2, GRID::kWM3>;                                  \
    static_assert(LF_BWD_ROW_PAD % (BR) == 0 &&                                                   \
                      NAME##_traits::kSmemBytes == LF_BWD_SMEM_BYTES(D, BR, LF_BWD_BC_D##D),      \
                  "workspace rows and shared memory as the host sizes them (tile_plan.h)");       \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads, 1)                      \
        NAME(const __grid_constant__ LfBwdParams p) {                                             \
        lf::window_bwd<NAME##_traits>(p);                                                         \
    }

// Defines the backward kernels of element type T at head dim D (64, 128 or 256):
//   NAME_pre      pre-pass (grid: rows_pad / LF_BWD_ROW_PAD, heads_q, batch; LF_BWD_AUX_THREADS)
//   NAME          the main kernel (LF_DEFINE_BWD_MAIN_KERNEL, query steps of LF_BWD_BR_D<D>)
//   NAME_dq       deterministic dQ (grid: query tiles of LF_BWD_DQ_BR, heads_q, batch;
//                 LF_BWD_DQ_WARPS warps)
//   NAME_convert  dq_accum -> dq (grid as NAME_pre)
// At head dims 64 and 256 a second main kernel, with taller query steps, has a module of its own
// (LF_DEFINE_BWD_TALL_KERNEL below).
#define LF_DEFINE_BWD_KERNELS(NAME, T, D)                                                         \
    LF_DEFINE_BWD_MAIN_KERNEL(NAME, T, D, LF_BWD_BR_D##D, lf::BwdWarpGrid<D>)                     \
    using NAME##_dq_traits = lf::FwdTraits<T, D, LF_BWD_DQ_BR, LF_BWD_DQ_BC_D##D, LF_BWD_DQ_WARPS>; \
    static_assert(LF_BWD_ROW_PAD % LF_BWD_DQ_BR == 0 &&                                           \
                      2 * NAME##_dq_traits::kQBytes + 4 * NAME##_dq_traits::kKVBytes ==           \
                          LF_BWD_DQ_SMEM_BYTES(D, LF_BWD_DQ_BR, LF_BWD_DQ_BC_D##D),               \
                  "the dQ pass's rows and shared memory as the host sizes them (tile_plan.h)");   \
    extern "C" __global__ void __launch_bounds__(LF_BWD_AUX_THREADS)                              \
        NAME##_pre(const __grid_constant__ LfBwdParams p) {                                       \
        lf::bwd_pre<T>(p);                                                                        \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(NAME##_dq_traits::kThreads)                      \
        NAME##_dq(const __grid_constant__ LfBwdParams p) {                                        \
        lf::window_bwd_dq<NAME##_dq_traits>(p);                                                   \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(LF_BWD_AUX_THREADS)                              \
        NAME##_convert(const __grid_constant__ LfBwdParams p) {                                   \
        lf::bwd_convert<T>(p);                                                                    \
    }

// Defines NAME, the main kernel at head dim D (64 or 256) with query steps of LF_BWD_TALL_BR_D<D>
// rows (grid and parameters as the main kernel of LF_DEFINE_BWD_KERNELS), for devices with the
// shared memory.
#define LF_DEFINE_BWD_TALL_KERNEL(NAME, T, D)                                                     \
    LF_DEFINE_BWD_MAIN_KERNEL(NAME, T, D, LF_BWD_TALL_BR_D##D, lf::BwdTallWarpGrid<D>)

// Defines the block-sparse backward's kernels of element type T at head dim D; the pre-pass and
// the conversion are the exact backward's (NAME_pre, NAME_convert of LF_DEFINE_BWD_KERNELS, run
// on p.bwd):
//   NAME     dK, dV and the atomic dQ (grid: key blocks, heads_kv, batch; LF_BWD_WARPS warps)
//   NAME_dq  deterministic dQ (grid: query tiles of LF_BWD_DQ_BR, heads_q, batch;
//            LF_BWD_DQ_WARPS warps)
#define LF_DEFINE_BWD_SPARSE_KERNELS(NAME, T, D)                                                  \
    using NAME##_traits =                                                                         \
        lf::BwdTraits<T, D, LF_BWD_SPARSE_BC, LF_BWD_BR_D##D, LF_BWD_WARPS,                       \
                      lf::BwdSparseWarpGrid<D>::kWM1, lf::BwdSparseWarpGrid<D>::kWM2,             \
                      lf::BwdSparseWarpGrid<D>::kWM3>;                                            \
    using NAME##_dq_traits = lf::FwdTraits<T, D, LF_BWD_DQ_BR, LF_BWD_DQ_BC_D##D, LF_BWD_DQ_WARPS>; \
    static_assert(LF_BWD_SPARSE_BC == LF_SPARSE_K_BLOCK &&                                        \
                      LF_SPARSE_Q_BLOCK % LF_BWD_BR_D##D == 0 &&                                  \
                      LF_SPARSE_Q_BLOCK % LF_BWD_DQ_BR == 0 &&                                    \
                      LF_SPARSE_K_BLOCK % LF_BWD_DQ_BC_D##D == 0,                                 \
                  "sparse blocks are whole kernel tiles");                                        \
    static_assert(NAME##_traits::kSmemBytes ==                                                    \
                      LF_BWD_SMEM_BYTES(D, LF_BWD_BR_D##D, LF_BWD_SPARSE_BC),                     \
                  "shared memory as the host sizes it (tile_plan.h)");                           \
    extern "C" __global__ void __launch_bounds__(NAME##_traits::kThreads, 1)                      \
        NAME(const __grid_constant__ LfBwdSparseParams p) {                                       \
        lf::sparse_bwd<NAME##_traits>(p);                                                         \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(NAME##_dq_traits::kThreads)                      \
        NAME##_dq(const __grid_constant__ LfBwdSparseParams p) {                                  \
        lf::sparse_bwd_dq<NAME##_dq_traits>(p);                                                   \
    }
