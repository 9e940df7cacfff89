/* longflash tile plan: which key tiles a query tile visits, and which of those need an element mask.
 *
 * Shared verbatim by the kernels (nvcc, device code) and the host (gcc, through cuda/host/plan.c),
 * so the CPU tests of the plan test the very arithmetic the kernels run.
 *
 * Query tile qt covers rows [qt*br, min((qt+1)*br, seqlen_q)); key tile t covers keys
 * [t*bc, min((t+1)*bc, seqlen_k)). Visibility of (i, j) is defined in params.h (LfMask).
 *
 * Row i sees the key interval [i + a, i + b) clipped to [0, seqlen_k), with a = off - window_left
 * and b = off + window_right + 1 (off = seqlen_k - seqlen_q). Consecutive rows' intervals overlap
 * or touch (b - a >= 1), so the keys seen by a query tile form one interval, and every key tile
 * that intersects it holds at least one visible element: the plan visits exactly those tiles and
 * loads nothing outside the window.
 */
#ifndef LONGFLASH_TILE_PLAN_H
#define LONGFLASH_TILE_PLAN_H

#include "params.h"

/* Tile shape (query rows br x key columns bc) of the forward kernel per head dimension. The
 * kernels' traits and the host plan both read these. Shared memory per CTA is
 * (br + 2 bc) * head_dim * 2 bytes (a Q tile and one K and one V tile). */
#define LF_FWD_WARPS 4
#define LF_FWD_BR_D64 128
#define LF_FWD_BC_D64 64
#define LF_FWD_BR_D128 128
#define LF_FWD_BC_D128 64
#define LF_FWD_BR_D256 64
#define LF_FWD_BC_D256 64

/* Tile shape of the Hopper (sm_90a) forward: 128 query rows (two consumer warpgroups of 64 rows
 * and one producer warpgroup, 384 threads) by LF_FWD_SM90_BC_D<D> keys, with a ring of
 * LF_FWD_SM90_STAGES K/V stages. Shared memory per CTA is (br + 2 * stages * bc) * head_dim * 2
 * bytes, plus 1 KiB of alignment and barriers. */
#define LF_FWD_SM90_BR 128
#define LF_FWD_SM90_BC_D64 128
#define LF_FWD_SM90_BC_D128 128
#define LF_FWD_SM90_BC_D256 64
#define LF_FWD_SM90_STAGES 2
#define LF_FWD_SM90_THREADS 384
/* Head dim 64: 192 query rows (three consumer warpgroups, 512 threads), as FlashAttention-3 takes
 * for it: a tile's matrix products are short at head dim 64, so each warpgroup's softmax has two
 * others' tensor-core work to hide behind. */
#define LF_FWD_SM90_BR_TALL 192
#define LF_FWD_SM90_THREADS_TALL 512
/* The Hopper schedule: up to this head dimension the consumer warpgroups overlap S of one tile
 * with P V of the one before and take turns (ping-pong): on an H200 (2026-12-02) 5-7% faster
 * than one tile at a time at head dim 128, and 2-8% at 256. */
#define LF_FWD_SM90_PINGPONG_MAX_D 256
/* The Hopper block-sparse kernel visits the 64-key blocks of a mask one at a time. */
#define LF_FWD_SM90_BC_SPARSE 64

/* Block size of block-sparse masks (LfBlockSparse): query blocks of 128 rows, key blocks of 64
 * keys, for every head dimension. A kernel whose query tile is smaller (head dim 256: 64 rows)
 * runs each query block as several tiles over the same row of the mask. */
#define LF_SPARSE_Q_BLOCK 128
#define LF_SPARSE_K_BLOCK 64

#if defined(__CUDACC__)
#define LF_HD __host__ __device__ __forceinline__
#else
#define LF_HD static inline
#endif

/* Half-open range of key tiles [begin, end); empty when begin >= end. */
typedef struct LfTileRange {
    int32_t begin;
    int32_t end;
} LfTileRange;

LF_HD int64_t lf_min64(int64_t x, int64_t y) { return x < y ? x : y; }
LF_HD int64_t lf_max64(int64_t x, int64_t y) { return x > y ? x : y; }

LF_HD int64_t lf_diag_offset(LfMask m) { return (int64_t)m.seqlen_k - (int64_t)m.seqlen_q; }

/* Whether query row i may attend key j. */
LF_HD int lf_visible(LfMask m, int64_t i, int64_t j) {
    int64_t off = lf_diag_offset(m);
    if (i < 0 || i >= m.seqlen_q || j < 0 || j >= m.seqlen_k) return 0;
    if (m.window_left >= 0 && j < i + off - m.window_left && j >= m.sink_tokens) return 0;
    if (m.window_right >= 0 && j > i + off + m.window_right) return 0;
    return 1;
}

/* The keys row i sees: [0, *sink_hi) and [*lo, *hi) (each empty when its end is not past its
 * start), clipped to [0, seqlen_k); a row outside [0, seqlen_q) sees nothing. Equivalent to
 * lf_visible for every j, but one computation per row instead of one per element. */
LF_HD void lf_row_key_bounds(LfMask m, int64_t i, int64_t *lo, int64_t *hi, int64_t *sink_hi) {
    int64_t off = lf_diag_offset(m);
    int64_t l = 0, h = m.seqlen_k;
    if (m.window_left >= 0) l = lf_max64(l, i + off - m.window_left);
    if (m.window_right >= 0) h = lf_min64(h, i + off + m.window_right + 1);
    if (i < 0 || i >= m.seqlen_q) h = 0;
    *lo = l;
    *hi = h;
    *sink_hi = lf_min64(m.sink_tokens, h);
}

/* Key tiles visited by query tile qt of the dense plan (dense, causal, sliding window). Sinks
 * are ignored here: a block mask lists the sink blocks, and the dense API rejects sinks. */
LF_HD LfTileRange lf_key_tile_range(LfMask m, int32_t qt, int32_t br, int32_t bc) {
    LfTileRange r;
    int64_t off = lf_diag_offset(m);
    int64_t row0 = (int64_t)qt * br;
    int64_t row1 = lf_min64(row0 + br, m.seqlen_q) - 1; /* last real row of the tile */
    int64_t lo = 0, hi = m.seqlen_k;                    /* keys [lo, hi) */
    if (m.window_left >= 0) lo = lf_max64(lo, row0 + off - m.window_left);
    if (m.window_right >= 0) hi = lf_min64(hi, row1 + off + m.window_right + 1);
    if (row0 > row1 || lo >= hi) {
        r.begin = 0;
        r.end = 0;
        return r;
    }
    r.begin = (int32_t)(lo / bc);
    r.end = (int32_t)((hi + bc - 1) / bc);
    return r;
}

/* Whether every (row, key) of query tile qt and key tile t is visible, so no element mask is
 * needed; a tile that holds the end of the key sequence, the causal diagonal or a window edge is
 * partial. Exact for any key tile, visited or not (block masks classify their listed blocks,
 * sink blocks included, with it). */
LF_HD int lf_tile_is_full(LfMask m, int32_t qt, int32_t t, int32_t br, int32_t bc) {
    int64_t off = lf_diag_offset(m);
    int64_t row0 = (int64_t)qt * br;
    int64_t row1 = lf_min64(row0 + br, m.seqlen_q) - 1;
    int64_t c0 = (int64_t)t * bc, c1 = c0 + bc; /* keys [c0, c1) */
    if (c1 > m.seqlen_k) return 0;
    /* Keys below sink_tokens are visible whatever the left window; the others must be inside it. */
    if (m.window_left >= 0 && c1 > m.sink_tokens &&
        lf_max64(c0, m.sink_tokens) < row1 + off - m.window_left)
        return 0;
    if (m.window_right >= 0 && c1 - 1 > row0 + off + m.window_right) return 0;
    return 1;
}

/* The backward (cuda/bwd.cuh, cuda/sm80/backward.cuh). The main kernel runs one CTA of
 * LF_BWD_WARPS warps per (key tile of LF_BWD_BC_D<D> keys, key/value head, batch entry): K and V
 * stay in shared memory, dK and dV in registers, while it walks the query tiles of
 * LF_BWD_BR_D<D> rows that see the key tile (lf_query_tile_range), for every query head of the
 * group. Shared memory per CTA is 2 bc d + 4 br d (Q and dO, two stages) + 2 bc br (P and dS)
 * 16-bit elements plus 16 br bytes (LSE and D, two stages): 97 KiB at head dim 64, 161 KiB at
 * 128 (under the 163 KiB an sm_80 block may have), 137 KiB at 256; dK and dV take
 * 2 bc d / (32 warps) f32 registers per thread (64, 128 and 128). At head dim 128, 128-key tiles
 * instead of 64 halve the dQ atomics and the Q / dO reloads per key: 1.30x to 1.38x faster on an
 * H200 (2026-12-05).
 * At head dims 64 and 256, on devices whose blocks may have LF_BWD_SMEM_BYTES(d,
 * LF_BWD_TALL_BR_D<D>, LF_BWD_BC_D<D>) bytes (162 KiB at 64: sm_80 and sm_90; 209 KiB at 256:
 * sm_90), the dense main kernel takes query steps of LF_BWD_TALL_BR_D<D> rows instead (module
 * bwd_<dtype>_d<D>_tall): each warp then reuses the operands it loads from shared memory for
 * more products (2.2 mma.sync per ldmatrix against 1.7 at head dim 64, 1.9 against 1.5 at 256:
 * counted in the SASS), where the shorter steps look bound by shared-memory reads; devices with less (sm_86 and sm_89:
 * 99 KiB) keep the shorter steps. (The host takes them only with LONGFLASH_BWD_TALL=1 until they
 * have run on a GPU: src/attention/backward.rs.)
 * The deterministic mode's dQ pass runs one CTA of LF_BWD_DQ_WARPS warps per (query tile of
 * LF_BWD_DQ_BR rows, query head, batch entry) over the forward's plan with key tiles of
 * LF_BWD_DQ_BC_D<D> keys (double-buffered K and V): 48, 96 and 128 KiB of shared memory.
 * Workspace rows are padded per (batch, head) to a multiple of LF_BWD_ROW_PAD, which every query
 * tile divides, so that the kernels read whole tiles of the f32 workspace without bounds checks. */
#define LF_BWD_WARPS 8
#define LF_BWD_BC_D64 128
#define LF_BWD_BR_D64 64
#define LF_BWD_TALL_BR_D64 128
#define LF_BWD_BC_D128 128
#define LF_BWD_BR_D128 64
#define LF_BWD_BC_D256 64
#define LF_BWD_BR_D256 32
#define LF_BWD_TALL_BR_D256 64
#define LF_BWD_DQ_WARPS 4
#define LF_BWD_DQ_BR 64
#define LF_BWD_DQ_BC_D64 64
#define LF_BWD_DQ_BC_D128 64
#define LF_BWD_DQ_BC_D256 32
#define LF_BWD_ROW_PAD 128
/* The block-sparse backward's main kernel runs one CTA per key block (LF_SPARSE_K_BLOCK keys)
 * at every head dim, over query tiles of LF_BWD_BR_D<D> rows of the query blocks that list it: at
 * head dims 64 and 128 a tile of 64 keys instead of the dense kernel's 128 (65 and 113 KiB of
 * shared memory); at 256 the dense kernel's tiles. Its deterministic dQ pass is the dense one's over the CSR
 * rows (key blocks split into tiles of LF_BWD_DQ_BC_D<D> keys). */
#define LF_BWD_SPARSE_BC 64 /* LF_SPARSE_K_BLOCK */
/* The pre-pass (D and the LSE in log2 units, the dQ accumulator cleared) and the conversion of
 * the dQ accumulator run LF_BWD_ROW_PAD rows per CTA of 256 threads. */
#define LF_BWD_AUX_THREADS 256
/* Dynamic shared memory of the main kernel and of the dQ pass, in bytes, for head dim d and tiles
 * of br query rows by bc keys (the kernels' traits compute the same and their instantiations check
 * it; the host sizes its launches with these formulas). */
#define LF_BWD_SMEM_BYTES(d, br, bc) \
    ((((2 * (bc)) + 4 * (br)) * (d) + 2 * (bc) * (br)) * 2 + 16 * (br))
#define LF_BWD_DQ_SMEM_BYTES(d, br, bc) ((2 * (br) + 4 * (bc)) * (d) * 2)

/* Query tiles that see key tile kt (the backward's transpose of the dense plan): the query rows
 * whose key interval (see lf_key_tile_range) meets the tile's keys [kt * bc, min((kt + 1) * bc,
 * seqlen_k)) form one interval, [max(0, c0 - off - right), min(seqlen_q, c1 - off + left)) with an
 * unbounded side dropping its bound, and every query tile that intersects it holds a row that sees a
 * key of the tile: the backward visits exactly those tiles. Empty for a key tile past seqlen_k. */
LF_HD LfTileRange lf_query_tile_range(LfMask m, int32_t kt, int32_t br, int32_t bc) {
    LfTileRange r;
    int64_t off = lf_diag_offset(m);
    int64_t c0 = (int64_t)kt * bc;
    int64_t c1 = lf_min64(c0 + bc, m.seqlen_k); /* keys [c0, c1) */
    int64_t lo = 0, hi = m.seqlen_q;             /* query rows [lo, hi) */
    if (m.window_right >= 0) lo = lf_max64(lo, c0 - off - m.window_right);
    if (m.window_left >= 0) hi = lf_min64(hi, c1 - off + m.window_left);
    if (c0 >= c1 || lo >= hi) {
        r.begin = 0;
        r.end = 0;
        return r;
    }
    r.begin = (int32_t)(lo / br);
    r.end = (int32_t)((hi + br - 1) / br);
    return r;
}

/* The decoding kernel (cuda/decode.cuh): LF_DECODE_WARPS warps per CTA over one tile of
 * LF_DECODE_ROWS packed (query token, head) rows, each warp taking LF_DECODE_KEYS keys per step
 * through its own ring of LF_DECODE_STAGES_D<D> K/V stages; key splits start at multiples of
 * LF_DECODE_SPLIT_ALIGN. Shared memory per CTA is (1 + 2 * warps * stages) * keys * head_dim * 2
 * bytes: 98 KiB at head dim 64, 100 KiB at 128 (two CTAs per SM on Hopper), 136 KiB at 256. */
#define LF_DECODE_WARPS 4
#define LF_DECODE_ROWS 16
#define LF_DECODE_KEYS 16
#define LF_DECODE_STAGES_D64 6
#define LF_DECODE_STAGES_D128 3
#define LF_DECODE_STAGES_D256 2
#define LF_DECODE_SPLIT_ALIGN 64
/* From this many query tokens per sequence a plain decoding call (no fixed split count) runs the
 * chunked-prefill kernel (cuda/paged.cuh): query tiles of the dense forward over rows gathered
 * from the cache, where the decoding kernel's 16-row tiles would read the cache once per 16
 * packed rows. */
#define LF_DECODE_PREFILL_QUERIES 64
/* With RoPE in the kernel, a second Q tile and a scratch tile per warp come on top, and fewer
 * stages keep two CTAs per SM at head dims 64 and 128 (76 and 88 KiB; 176 KiB at 256). */
#define LF_DECODE_ROPE_STAGES_D64 4
#define LF_DECODE_ROPE_STAGES_D128 2
#define LF_DECODE_ROPE_STAGES_D256 2

#endif
