/* longflash kernel ABI: the one declaration of the structs passed from Rust to the kernels.
 *
 * The Rust mirror (src/sys.rs) is generated from this file by bindgen and committed; the test
 * `bindings_are_up_to_date` regenerates it and fails when it differs. Both sides assert the
 * size and field offsets below, so a change here that is not mirrored fails to compile.
 *
 * Plain C (no C++), so that bindgen, gcc and nvcc read the same text.
 */
#ifndef LONGFLASH_PARAMS_H
#define LONGFLASH_PARAMS_H

#include <stddef.h>
#include <stdint.h>

/* The element (token-level) attention mask of one launch.
 *
 * Query row i in [0, seqlen_q) may attend key j in [0, seqlen_k) iff
 *     (window_left  < 0 || j >= i + diag_offset - window_left || j < sink_tokens)
 *  && (window_right < 0 || j <= i + diag_offset + window_right)
 * where diag_offset = seqlen_k - seqlen_q aligns the diagonal bottom-right (the last query
 * sees the last key), as FlashAttention >= 2.1 does. Causal attention is window_right = 0.
 * A negative window side is unbounded. The first sink_tokens keys stay visible left of the
 * window (StreamingLLM's attention sinks); the dense kernel takes sink_tokens = 0 and a block
 * mask lists the sink blocks. */
typedef struct LfMask {
    int32_t seqlen_q;
    int32_t seqlen_k;
    int32_t window_left;  /* < 0: unbounded */
    int32_t window_right; /* < 0: unbounded; 0 for causal */
    int32_t sink_tokens;  /* >= 0 */
    int32_t reserved;     /* 0 */
} LfMask;

/* A block-sparse layout in CSR form, on the device: for each (batch, head, query block) row, the
 * sorted key blocks to compute, and for each of them whether it is full (no element of it is
 * masked by LfMask, so no element mask is applied) or partial. Row r of (b, h, qb) is
 * r = b * batch_stride + h * head_stride + qb (a stride of 0 shares the rows across batch or
 * heads); its key blocks are col_indices[row_offsets[r] .. row_offsets[r + 1]]. Query blocks
 * span q_block rows and key blocks k_block keys (LF_SPARSE_Q_BLOCK x LF_SPARSE_K_BLOCK). Unused
 * (all NULL) for dense launches. */
typedef struct LfBlockSparse {
    const int32_t *row_offsets;
    const int32_t *col_indices;
    const uint8_t *full;
    int64_t batch_stride;
    int64_t head_stride;
    int32_t q_block;
    int32_t k_block;
    int32_t num_q_blocks;
    int32_t num_k_blocks;
} LfBlockSparse;

/* Forward attention: O = softmax(scale * Q K^T + mask) V, per (batch, query head).
 * Q, K, V, O are 16-bit (f16 or bf16, chosen by the kernel name), last dimension contiguous;
 * all other strides are in elements. Key/value head of query head h is h / (heads_q / heads_kv). */
typedef struct LfFwdParams {
    const void *q;
    const void *k;
    const void *v;
    void *o;
    float *lse; /* optional, NULL or [batch, heads_q, seqlen_q] contiguous f32 (natural log) */

    int64_t q_batch_stride;
    int64_t q_head_stride;
    int64_t q_row_stride;
    int64_t k_batch_stride;
    int64_t k_head_stride;
    int64_t k_row_stride;
    int64_t v_batch_stride;
    int64_t v_head_stride;
    int64_t v_row_stride;
    int64_t o_batch_stride;
    int64_t o_head_stride;
    int64_t o_row_stride;

    LfMask mask;

    int32_t batch;
    int32_t heads_q;
    int32_t heads_kv;
    int32_t head_dim;

    float softmax_scale;      /* applied to Q K^T */
    float softmax_scale_log2; /* softmax_scale * log2(e), so the kernel can use exp2 */

    LfBlockSparse sparse; /* block-sparse kernels only */
} LfFwdParams;

/* Rotary position embedding applied inside the causal forward (RoPE, ReRoPE, Leaky ReRoPE).
 *
 * Positions: key j of batch b sits at off_b + j and query i at off_b + (seqlen_k - seqlen_q) + i
 * (the causal diagonal's alignment); off_b = position_offsets[b], or 0 when NULL. R_p rotates the
 * first rotary_dim elements of a head vector by the angles p * inv_freq[f] (pairs (f, f + r/2)
 * for the half-split layout, (2f, 2f + 1) for interleaved) and multiplies them by
 * attention_factor. With rel = pos(i) - pos(j) and window w:
 *   RoPE                 s = (R_pos(i) q) . (R_pos(j) k)
 *   ReRoPE, rel >= w     s = (R_w q) . (R_0 k)
 *   Leaky,  rel >= w     s = (R_{pos(i)/leak + w - w/leak} q) . (R_{pos(j)/leak} k)
 * and the RoPE score inside the window. Q is rotated in the kernel; the keys' rotations are
 * written once by the lf_rope_keys kernel into k_rot (R_pos(j) k) and k_alt (the outside-window
 * keys), contiguous [batch, seqlen_k, heads_kv, head_dim] workspaces. */
typedef struct LfRope {
    const double *inv_freq;          /* rotary_dim / 2 angular frequencies */
    const int32_t *position_offsets; /* [batch] or NULL */
    const void *k_rot;
    const void *k_alt;               /* NULL for plain RoPE */
    int32_t mode;                    /* 0 RoPE, 1 ReRoPE, 2 Leaky ReRoPE */
    int32_t rotary_dim;
    int32_t interleaved;             /* 0 half-split (LLaMA/NeoX), 1 interleaved (GPT-J) */
    int32_t window;
    double inv_leak;                 /* 1 / leak (Leaky ReRoPE) */
    float attention_factor;          /* YaRN's mscale; 1 otherwise */
    float log_n_inv_ln_train;        /* 1 / ln(L_train) for log-n query scaling, 0 = off */
} LfRope;

/* A TMA tensor map (the driver's CUtensorMap, written by cuTensorMapEncodeTiled): 128 opaque
 * bytes, 128-byte aligned (CUDA 13 declares CUtensorMap so; Hopper needs 64). */
#if defined(__GNUC__) || defined(__clang__) || defined(__CUDACC__)
#define LF_ALIGN128 __attribute__((aligned(128)))
#else
#define LF_ALIGN128
#endif
typedef struct LF_ALIGN128 LfTensorMap {
    uint64_t opaque[16];
} LfTensorMap;

/* The Hopper (sm_90a) forward: LfFwdParams plus TMA tensor maps of Q, K and V. Each map is 4-D,
 * (head_dim, seqlen, heads, batch) with the layout's strides, boxes of 64 columns by the kernel's
 * tile rows (LF_FWD_SM90_BR for Q, LF_FWD_SM90_BC_D<d> for K and V), 128-byte swizzle and zero
 * fill outside the tensor. */
typedef struct LfFwdSm90Params {
    LfFwdParams fwd;
    LfTensorMap tma_q;
    LfTensorMap tma_k;
    LfTensorMap tma_v;
} LfFwdSm90Params;

/* The Hopper forward with a per-key mask (the memory pass of a masked memory layer,
 * cuda/fwd_sm90.cuh, keymask_fwd): key j of batch entry b is attended only where
 * key_mask[b * key_mask_batch_stride + j] is not 0 (u8, read for keys below fwd.mask.seqlen_k),
 * besides fwd.mask. */
typedef struct LfFwdKeyMaskSm90Params {
    LfFwdSm90Params base;
    const uint8_t *key_mask;
    int64_t key_mask_batch_stride;
} LfFwdKeyMaskSm90Params;

typedef struct LfRopeFwdParams {
    LfFwdParams fwd; /* mask must be causal (window_right = 0) */
    LfRope rope;
} LfRopeFwdParams;

/* The RoPE forward on Hopper: the Hopper parameters (tma_k maps the rotated keys k_rot), a tensor
 * map of the outside-window keys k_alt (unused for plain RoPE), and the rotation. The workspace
 * maps are over contiguous [batch, seqlen_k, heads_kv, head_dim]. */
typedef struct LfRopeFwdSm90Params {
    LfFwdSm90Params base; /* base.fwd.mask must be causal */
    LfTensorMap tma_k_alt;
    LfRope rope;
} LfRopeFwdSm90Params;

/* The key-rotation pass: reads K (strides as in LfFwdParams) and writes k_rot and k_alt. */
typedef struct LfRopeKeysParams {
    const void *k;
    int64_t k_batch_stride;
    int64_t k_head_stride;
    int64_t k_row_stride;
    int32_t batch;
    int32_t seqlen_k;
    int32_t heads_kv;
    int32_t head_dim;
    LfRope rope; /* k_rot and k_alt are written (cast away const) */
} LfRopeKeysParams;

/* Memory attention (Focused Transformer / LongLLaMA memory layers): the local causal window of
 * `fwd` (queries and local keys rotated with plain RoPE at their positions when `rotate` is set:
 * rope.k_rot then holds the rotated local keys, written by lf_rope_keys; otherwise no rotation)
 * plus an external memory of mem_len (key, value) pairs per batch entry, un-rotated, sharing the
 * local keys' heads, in one softmax. mem_k / mem_v: [batch, mem_len, heads_kv, head_dim] with the
 * strides below (head dim contiguous); mem_mask: [batch, mem_len] bytes, 0 for an entry no query
 * sees, or NULL for every entry visible. */
typedef struct LfMemoryFwdParams {
    LfFwdParams fwd; /* fwd.mask: causal, optionally with a left window; no sink */
    LfRope rope;     /* mode 0 (plain RoPE); unused when rotate is 0 */
    const void *mem_k;
    const void *mem_v;
    const uint8_t *mem_mask;
    int64_t mem_k_batch_stride;
    int64_t mem_k_row_stride;
    int64_t mem_k_head_stride;
    int64_t mem_v_batch_stride;
    int64_t mem_v_row_stride;
    int64_t mem_v_head_stride;
    int32_t mem_len;
    int32_t rotate;
} LfMemoryFwdParams;

/* Top-k memory attention (cuda/topk.cuh): each query row attends its local part (computed before
 * into o and lse) and the top_k memory entries with the largest scores q . k (ties to the lower
 * entry index; +0 and -0 equal), the memory part merged into o and lse by log-sum-exp.
 *
 * The selection kernel (one CTA of LF_TOPK_ROWS query rows per (query tile, query head, batch
 * entry)) streams the memory's key tiles in order, keeps each row's candidates in its own
 * LF_TOPK_CAP slots of `cand` (8-byte keys: the score's order bits over the complement of the
 * index) and, when they near the slots' end, keeps the top_k of them and raises the row's
 * threshold to the k-th score, so a later entry is a candidate only when it beats that score. It
 * writes each row's selection by descending score (equal scores: ascending index) to `indices`
 * [batch, heads_q, seqlen_q, top_k] (-1 after the row's count, when fewer entries are visible). The attention kernel (one warp per row)
 * gathers the selected keys and values, and merges its softmax into o and lse (o and lse NULL:
 * selection only).
 *
 * q: the (rotated) queries [batch, seqlen_q, heads_q, head_dim]; mem_k / mem_v: [batch, mem_len,
 * heads_kv, head_dim]; mem_mask: [batch, mem_len] bytes, 0 for an entry never selected, or NULL;
 * o: [batch, seqlen_q, heads_q, head_dim]; lse: f32 [batch, heads_q, seqlen_q]. Strides are in
 * elements, the head dim contiguous. */
#define LF_TOPK_ROWS 64
#define LF_TOPK_KEYS 64
#define LF_TOPK_CAP 512
#define LF_TOPK_MAX_K 256
typedef struct LfMemoryTopkParams {
    const void *q;
    const void *mem_k;
    const void *mem_v;
    const uint8_t *mem_mask;
    unsigned long long *cand;
    int32_t *indices;
    void *o;
    float *lse;
    int64_t q_batch_stride;
    int64_t q_row_stride;
    int64_t q_head_stride;
    int64_t mem_k_batch_stride;
    int64_t mem_k_row_stride;
    int64_t mem_k_head_stride;
    int64_t mem_v_batch_stride;
    int64_t mem_v_row_stride;
    int64_t mem_v_head_stride;
    int64_t o_batch_stride;
    int64_t o_row_stride;
    int64_t o_head_stride;
    float softmax_scale_log2;
    int32_t batch;
    int32_t heads_q;
    int32_t heads_kv;
    int32_t seqlen_q;
    int32_t head_dim;
    int32_t mem_len;
    int32_t top_k;
} LfMemoryTopkParams;

/* The selection on Hopper (cuda/topk_sm90.cuh, sm_90a): one CTA of LF_TOPK_SM90_ROWS query rows
 * (LF_TOPK_SM90_THREADS threads: a producer warpgroup and two consumer warpgroups), scores from
 * wgmma over key tiles of LF_TOPK_SM90_KEYS entries in a ring of LF_TOPK_SM90_STAGES stages;
 * otherwise as the sm_80 selection kernel. tma_q: a 4-D map (head_dim, seqlen_q, heads_q, batch)
 * of the queries, tma_k of the memory's keys (head_dim, mem_len, heads_kv, batch); boxes of 64
 * columns by the tile's rows, 128-byte swizzle, zero fill outside the tensor. */
#define LF_TOPK_SM90_ROWS 128
#define LF_TOPK_SM90_KEYS 128
#define LF_TOPK_SM90_STAGES 4
#define LF_TOPK_SM90_THREADS 384
typedef struct LfMemoryTopkSm90Params {
    LfMemoryTopkParams topk;
    LfTensorMap tma_q;
    LfTensorMap tma_k;
} LfMemoryTopkSm90Params;

/* Dynamic block selection (cuda/select.cuh). The pooling pass writes the f32 mean of each block of
 * `block` rows (the last block may be shorter) of a [batch, seqlen, heads, head_dim] tensor with
 * the given element strides, as contiguous [batch, heads, ceil(seqlen / block), head_dim]. */
typedef struct LfBlockMeansParams {
    const void *x;
    float *means;
    int64_t batch_stride;
    int64_t row_stride;
    int64_t head_stride;
    int32_t batch;
    int32_t seqlen;
    int32_t heads;
    int32_t head_dim;
    int32_t block;
    int32_t reserved; /* 0 */
} LfBlockMeansParams;

/* The selection pass: CSR row r = (b * heads_q + h) * num_q_blocks + qb keeps, of its universe
 * row qb (uni_*: the element mask's visible key blocks of query block qb, ascending, with their
 * full flags, uni_len entries in all; shared by every batch entry and head, at most max_row a row),
 * every partial block and the top_k full blocks by dot(q_means row r, k_means[b][h / group][kb])
 * (larger first, ties to the lower block), written ascending with their flags at
 * out_cols/out_full[out_offsets[r] ..] (out_len entries in all). Offsets outside the lists, block
 * indices outside [0, num_k_blocks) and a row whose kept count differs from its out_offsets room
 * set *error_flag (when not NULL); nothing is read or written outside the lists. */
typedef struct LfBlockSelectParams {
    const float *q_means;
    const float *k_means;
    const int32_t *uni_offsets;
    const int32_t *uni_cols;
    const uint8_t *uni_full;
    const int32_t *out_offsets;
    int32_t *out_cols;
    uint8_t *out_full;
    int32_t *error_flag;
    int32_t batch;
    int32_t heads_q;
    int32_t heads_kv;
    int32_t head_dim;
    int32_t num_q_blocks;
    int32_t num_k_blocks;
    int32_t top_k;
    int32_t max_row;
    int32_t uni_len;
    int32_t out_len;
} LfBlockSelectParams;

/* Memory buffer append (cuda/memory_append.cuh): rows [src_row0, src_row0 + rows) of a window's
 * keys and values ([batch, window, heads, head_dim], element strides, type S) go, cast to the
 * buffer's type, to rows (dst_row0 + t) % dst_rows of the buffer's keys and values ([batch,
 * dst_rows, heads, head_dim], element strides). */
typedef struct LfMemoryAppendParams {
    const void *src_k;
    const void *src_v;
    void *dst_k;
    void *dst_v;
    int64_t src_k_batch_stride;
    int64_t src_k_row_stride;
    int64_t src_k_head_stride;
    int64_t src_v_batch_stride;
    int64_t src_v_row_stride;
    int64_t src_v_head_stride;
    int64_t dst_batch_stride;
    int64_t dst_row_stride;
    int64_t dst_head_stride;
    int32_t batch;
    int32_t rows;
    int32_t heads;
    int32_t head_dim;
    int32_t src_row0;
    int32_t dst_row0;
    int32_t dst_rows;
    int32_t reserved; /* 0 */
} LfMemoryAppendParams;

/* The RoPE backward's passes (cuda/rope_bwd.cuh), around two calls of the exact backward (one over
 * the pairs inside the ReRoPE window, one over those outside). The query pass writes each side's
 * rotated queries as the forward's Q preparation computes them: q_in = m_i A_{p_i} q_i and, unless
 * plain RoPE, q_out = m_i A_{a_i} q_i (a_i the outside position), contiguous [batch, seqlen_q,
 * heads_q, head_dim]. Memory decoding uses the same pass for its memory pass's queries, at
 * positions from the cache's lengths on the device. */
typedef struct LfRopeQueriesParams {
    const void *q;
    int64_t q_batch_stride;
    int64_t q_head_stride;
    int64_t q_row_stride;
    void *q_in;
    void *q_out; /* NULL for plain RoPE */
    /* [batch] key counts on the device (a decoding cache's lengths), each clamped into
     * [0, seqlen_k]; NULL: seqlen_k keys per sequence. Query i of sequence b sits at position
     * len_b - seqlen_q + i (plus the rotation's offsets). */
    const int32_t *seqlens_k;
    int32_t batch;
    int32_t seqlen_q;
    int32_t seqlen_k;
    int32_t heads_q;
    int32_t head_dim;
    int32_t reserved; /* 0 */
    LfRope rope;
} LfRopeQueriesParams;

/* The gradient pass: g holds the inside half's gradient with respect to the rotated queries
 * (queries = 1: dq of q_in) or keys (queries = 0: dk of k_rot), in place; g_out the outside half's
 * (contiguous [batch, rows_out, heads, head_dim], rows_out <= rows; NULL when the outside half
 * saw nothing). Each pair is turned back through its side's transposed rotation (and the log-n
 * factor, for queries), the two added and rounded once into g. For keys, dv += dv_out over the
 * first rows_out rows. */
typedef struct LfRopeGradsParams {
    void *g;
    int64_t g_batch_stride;
    int64_t g_head_stride;
    int64_t g_row_stride;
    const void *g_out;
    void *dv;           /* keys only, NULL otherwise */
    const void *dv_out; /* contiguous like g_out */
    int64_t dv_batch_stride;
    int64_t dv_head_stride;
    int64_t dv_row_stride;
    int32_t batch;
    int32_t rows;
    int32_t rows_out;
    int32_t heads;
    int32_t head_dim;
    int32_t queries;
    int32_t seqlen_q;
    int32_t seqlen_k;
    LfRope rope;
} LfRopeGradsParams;

/* Merges a partial attention result into an accumulated one by their log-sum-exps, in place:
 *   lse = ln(exp(acc_lse) + exp(part_lse)),
 *   acc_o = exp(acc_lse - lse) * acc_o + exp(part_lse - lse) * part_o.
 * Two passes over disjoint key sets merged this way equal one pass over their union (LongNet,
 * MoBA). O tensors are 16-bit [batch, seqlen, heads, head_dim] with element strides; LSEs are f32
 * [batch, heads, seqlen] with unit stride along seqlen and acc_lse_stride / part_lse_stride
 * elements between consecutive (batch, head) rows (seqlen when contiguous; larger for a range of
 * rows of a longer tensor). */
typedef struct LfMergeParams {
    void *acc_o;
    float *acc_lse;
    const void *part_o;
    const float *part_lse;
    int64_t acc_batch_stride;
    int64_t acc_head_stride;
    int64_t acc_row_stride;
    int64_t part_batch_stride;
    int64_t part_head_stride;
    int64_t part_row_stride;
    int32_t batch;
    int32_t heads;
    int32_t seqlen;
    int32_t head_dim;
    int64_t acc_lse_stride;
    int64_t part_lse_stride;
} LfMergeParams;

/* Variable-length (packed) forward. `fwd` describes the packed tensors as one batch entry: q and
 * o [total_q, heads_q, head_dim], k and v [total_k, heads_kv, head_dim] with their row and head
 * strides, lse [heads_q, total_q]; fwd.batch is the number of sequences and fwd.mask.seqlen_q /
 * seqlen_k their maximum lengths (the grid covers max_seqlen_q query rows). Sequence b owns rows
 * cu_seqlens_q[b]..cu_seqlens_q[b + 1] of q, o and lse and cu_seqlens_k[b]..cu_seqlens_k[b + 1]
 * of k and v, its masks aligned bottom-right at its own lengths. The prefix sums live on the
 * device: the kernel clamps a sequence's start into [0, total] and its end into [start, total]
 * (and its queries to max_seqlen_q), so it never reads or writes outside the tensors, and ORs 1
 * into *error_flag (when not NULL) for sums that do not start at 0, decrease, pass the totals, or
 * give a sequence more than max_seqlen_q queries or max_seqlen_k keys. With the flag set the
 * output is unspecified (decreasing sums make sequences share rows). */
typedef struct LfVarlenParams {
    LfFwdParams fwd;
    const int32_t *cu_seqlens_q;
    const int32_t *cu_seqlens_k;
    int32_t *error_flag;
    int32_t total_q;
    int32_t total_k;
} LfVarlenParams;

/* The variable-length forward on Hopper: LfVarlenParams plus tensor maps of the packed Q, K and V
 * as batch 1 (head_dim, total, heads, 1), boxes and swizzle as in LfFwdSm90Params; a sequence's
 * tiles are read from its prefix-sum offsets on. */
typedef struct LfVarlenSm90Params {
    LfVarlenParams vp;
    LfTensorMap tma_q;
    LfTensorMap tma_k;
    LfTensorMap tma_v;
} LfVarlenSm90Params;

/* Attention of a few query tokens per sequence over a KV cache (flash_attn_with_kvcache), paged
 * or contiguous: the decoding kernels lf_decode_*.
 *
 * q and o are [batch, seqlen_q, heads_q, head_dim] with element strides (mask.seqlen_q query
 * tokens per sequence, the last ones of the sequence); lse, when not NULL, f32 [batch, heads_q,
 * seqlen_q]. With a block table, k and v are pages [num_pages, page_size, heads_kv, head_dim]
 * in the memory order their page, row and head strides give: key j of sequence b is row
 * j % page_size of page block_table[b * block_table_stride + j / page_size] (page_size a power of
 * two, at least 16; page_shift its log2). Without one (block_table NULL), batch entry b of k and
 * v holds sequence b's keys at page_stride (its batch stride), page_size being its capacity.
 * Sequence b has cache_seqlens[b] keys (mask.seqlen_k when cache_seqlens is NULL), attended with
 * the mask aligned bottom-right at that length; sink_tokens is 0.
 *
 * The keys [0, mask.seqlen_k) are cut into num_splits ranges of keys_per_split (a multiple of
 * LF_DECODE_SPLIT_ALIGN); mask.seqlen_k is at most the capacity (block_table_stride * page_size
 * with a table: the table's columns are the pages one sequence may use). One split writes o and lse directly; more write each split's rows, normalized, to
 * partial_o (f32 [num_splits, batch, seqlen_q, heads_q, head_dim]) and partial_lse (f32
 * [num_splits, batch, heads_q, seqlen_q]); the last CTA of each (row block, sequence and KV head)
 * to finish merges them into o and lse. It knows it is last from split_counters (i32
 * [batch * heads_kv, row blocks], zero at launch), which every CTA increments and the last one
 * sets back to zero.
 *
 * key_mask, when not NULL, hides keys besides the mask: key j of sequence b is attended only where
 * key_mask[b * key_mask_batch_stride + j] is not 0 (u8; read for keys below the sequence's
 * length only). The memory part of memory decoding passes the memory's mask this way. Only the
 * plain decoding kernels (lf_decode_*) read it: the RoPE decoding and chunked-prefill kernels
 * take none (NULL).
 *
 * Device-side values are clamped, never trusted: a cache length into [0, mask.seqlen_k], a
 * table entry into [0, num_pages); either ORs 1 into *error_flag when not NULL (the output of
 * such a sequence is then unspecified). */
typedef struct LfDecodeParams {
    const void *q;
    const void *k;
    const void *v;
    void *o;
    float *lse;
    float *partial_o;
    float *partial_lse;
    const int32_t *block_table;
    const int32_t *cache_seqlens;
    int32_t *error_flag;
    int32_t *split_counters;
    const uint8_t *key_mask;

    int64_t q_batch_stride;
    int64_t q_row_stride;
    int64_t q_head_stride;
    int64_t k_page_stride;
    int64_t k_row_stride;
    int64_t k_head_stride;
    int64_t v_page_stride;
    int64_t v_row_stride;
    int64_t v_head_stride;
    int64_t o_batch_stride;
    int64_t o_row_stride;
    int64_t o_head_stride;
    int64_t block_table_stride;
    int64_t key_mask_batch_stride;

    LfMask mask;

    int32_t batch;
    int32_t heads_q;
    int32_t heads_kv;
    int32_t head_dim;
    int32_t num_pages;
    int32_t page_size;
    int32_t page_shift;
    int32_t reserved; /* 0 */
    int32_t num_splits;
    int32_t keys_per_split;
    float softmax_scale;
    float softmax_scale_log2;
} LfDecodeParams;

/* The decoding kernel with rotary positions applied inside, over an un-rotated cache
 * (lf_decode_rope_*): key j of sequence b at position off_b + j and query token t at
 * off_b + cache_seqlens[b] - seqlen_q + t (off_b = rope.position_offsets[b], or 0); scores as in
 * LfRope, the mask causal (window_right = 0). rope.k_rot and rope.k_alt are unused (NULL): the
 * kernel turns each step's keys in shared memory. */
typedef struct LfDecodeRopeParams {
    LfDecodeParams base;
    LfRope rope;
} LfDecodeRopeParams;

/* Appends new tokens' keys and values to a KV cache (lf_append_kv_*): token t of sequence b goes
 * to slot s = cache_seqlens[b] + t of the sequence, i.e. row s % page_size of page
 * block_table[b * block_table_stride + s / page_size] (or row s of batch entry b without a
 * table), for t < seqlen_new; cache_seqlens itself is not updated. k_new and v_new are
 * [batch, seqlen_new, heads_kv, head_dim] with element strides; the caches are laid out as in
 * LfDecodeParams. With rotate = 1 the keys are written rotated to their positions
 * (rope.position_offsets[b] + s) as LfRope's R_pos (the attention factor on the rotated part), for
 * caches that store rotated keys; rope.k_rot, rope.k_alt and rope.mode are unused.
 *
 * Device values are checked, never trusted: a token whose slot falls outside [0, capacity) (a
 * negative length, or past block_table_stride * page_size, or past the contiguous cache's length)
 * or whose page entry falls outside [0, num_pages) is not written, and ORs 1 into *error_flag
 * when not NULL. */
typedef struct LfAppendParams {
    const void *k_new;
    const void *v_new;
    void *k_cache;
    void *v_cache;
    const int32_t *block_table;
    const int32_t *cache_seqlens;
    int32_t *error_flag;

    int64_t k_new_batch_stride;
    int64_t k_new_row_stride;
    int64_t k_new_head_stride;
    int64_t v_new_batch_stride;
    int64_t v_new_row_stride;
    int64_t v_new_head_stride;
    int64_t k_page_stride;
    int64_t k_row_stride;
    int64_t k_head_stride;
    int64_t v_page_stride;
    int64_t v_row_stride;
    int64_t v_head_stride;
    int64_t block_table_stride;

    int32_t batch;
    int32_t seqlen_new;
    int32_t heads_kv;
    int32_t head_dim;
    int32_t num_pages;
    int32_t page_size;
    int32_t page_shift;
    int32_t capacity;
    int32_t rotate;
    int32_t reserved;
    LfRope rope;
} LfAppendParams;

/* Many queries per sequence over a KV cache (chunked prefill; lf_paged_fwd_*): the sm_80
 * mainloop with key and value rows gathered from the cache. `fwd` holds Q, O and the LSE as the
 * exact forward does ([batch, seqlen_q, heads_q, head_dim], the last seqlen_q positions of each
 * sequence), the caches in k and v with their page strides in k_batch_stride / v_batch_stride,
 * and the mask with seqlen_k the keys the launch covers (at most the capacity). The cache is
 * described as in LfDecodeParams (block table or contiguous, cache_seqlens or NULL for
 * mask.seqlen_k keys); a length is clamped into [0, mask.seqlen_k] and a table entry into
 * [0, num_pages), either reported through *error_flag when not NULL. */
typedef struct LfPagedFwdParams {
    LfFwdParams fwd;
    const int32_t *block_table;
    const int32_t *cache_seqlens;
    int32_t *error_flag;
    int64_t block_table_stride;
    int32_t num_pages;
    int32_t page_size;
    int32_t page_shift;
    int32_t reserved;
} LfPagedFwdParams;

/* The variable-length forward with RoPE / ReRoPE / Leaky ReRoPE inside (lf_varlen_rope_*): the
 * packed batch of LfVarlenParams, with each sequence's positions as in LfRope (key j of sequence
 * b at position_offsets[b] + j, its queries bottom-right aligned), the mask causal. rope.k_rot
 * and rope.k_alt are packed like K, [total_k, heads_kv, head_dim] contiguous, written by
 * lf_rope_keys_varlen_* (LfRopeKeysVarlenParams) first. */
typedef struct LfVarlenRopeParams {
    LfVarlenParams varlen;
    LfRope rope;
} LfVarlenRopeParams;

/* The key-rotation pass of a packed batch: `keys` describes the packed K as one batch entry
 * (batch 1, seqlen_k = total_k); each row's sequence is found in cu_seqlens_k (sequences + 1
 * entries, read clamped: a bad sum moves positions, never memory accesses). */
typedef struct LfRopeKeysVarlenParams {
    LfRopeKeysParams keys;
    const int32_t *cu_seqlens_k;
    int32_t sequences;
    int32_t reserved;
} LfRopeKeysVarlenParams;

/* The backward of the exact forward (dense, causal, sliding window): dQ, dK and dV of
 * O = softmax(scale * Q K^T + mask) V for the upstream gradient dout, given Q, K, V, the forward's
 * O and its log-sum-exp (natural log, [batch, heads_q, seqlen_q] contiguous f32, -inf for a row
 * that sees no key). Q, O, dout, dq share Q's shape, K, V, dk, dv K's; 16-bit elements, last
 * dimension contiguous, strides in elements; query head h reads key/value head
 * h / (heads_q / heads_kv), and dk, dv sum over the query heads of a group.
 *
 * The f32 workspace holds, per (batch, query head), rows_pad rows (seqlen_q rounded up to
 * LF_BWD_ROW_PAD; rows past seqlen_q are padding the kernels never let contribute):
 *   dsum      [batch, heads_q, rows_pad]            D_i = dout_i . o_i (the pre-pass writes it)
 *   lse_log2  [batch, heads_q, rows_pad]            lse_i * log2(e); +inf for a row that sees no
 *                                                   key and for padding, so that its P is 0
 *   dq_accum  [batch, heads_q, rows_pad, head_dim]  dQ / scale in f32, added to atomically by the
 *                                                   main kernel and cleared by the pre-pass; NULL
 *                                                   in the deterministic mode, where a separate
 *                                                   pass over query tiles writes dq itself. */
typedef struct LfBwdParams {
    const void *q;
    const void *k;
    const void *v;
    const void *o;
    const void *dout;
    const float *lse;
    void *dq;
    void *dk;
    void *dv;
    float *dq_accum;
    float *dsum;
    float *lse_log2;

    int64_t q_batch_stride;
    int64_t q_head_stride;
    int64_t q_row_stride;
    int64_t k_batch_stride;
    int64_t k_head_stride;
    int64_t k_row_stride;
    int64_t v_batch_stride;
    int64_t v_head_stride;
    int64_t v_row_stride;
    int64_t o_batch_stride;
    int64_t o_head_stride;
    int64_t o_row_stride;
    int64_t do_batch_stride;
    int64_t do_head_stride;
    int64_t do_row_stride;
    int64_t dq_batch_stride;
    int64_t dq_head_stride;
    int64_t dq_row_stride;
    int64_t dk_batch_stride;
    int64_t dk_head_stride;
    int64_t dk_row_stride;
    int64_t dv_batch_stride;
    int64_t dv_head_stride;
    int64_t dv_row_stride;

    LfMask mask; /* sink_tokens = 0 */

    int32_t batch;
    int32_t heads_q;
    int32_t heads_kv;
    int32_t head_dim;
    int32_t rows_pad; /* seqlen_q rounded up to a multiple of LF_BWD_ROW_PAD */

    float softmax_scale;
    float softmax_scale_log2;
    int32_t reserved; /* 0 */
} LfBwdParams;

/* The block-sparse backward: the exact backward's parameters (bwd.mask is the block mask's
 * element mask, sinks included) and the block mask in both orders. `rows` is the forward's CSR
 * form (LfBlockSparse: per (batch, query head, query block) the key blocks, last to first in the
 * deterministic dQ pass); `cols` is its key-major transpose in the same struct: per (batch, query
 * head, key block) c = b * cols.batch_stride + h * cols.head_stride + kb, the query blocks that
 * list key block kb, ascending, at cols.col_indices[cols.row_offsets[c] .. cols.row_offsets[c + 1]]
 * with the same flags in cols.full. Both come from one validated mask (BlockMask::key_major); the
 * kernels read them as given, as the sparse forward reads its CSR. */
typedef struct LfBwdSparseParams {
    LfBwdParams bwd;
    LfBlockSparse rows;
    LfBlockSparse cols;
} LfBwdSparseParams;

#define LF_ASSERT_LAYOUT(cond, name) typedef char lf_layout_assert_##name[(cond) ? 1 : -1]
LF_ASSERT_LAYOUT(sizeof(LfMask) == 24, mask_size);
LF_ASSERT_LAYOUT(sizeof(LfBlockSparse) == 56, sparse_size);
LF_ASSERT_LAYOUT(sizeof(LfFwdParams) == 240, fwd_size);
LF_ASSERT_LAYOUT(sizeof(LfMergeParams) == 112, merge_size);
LF_ASSERT_LAYOUT(offsetof(LfMergeParams, acc_lse_stride) == 96, merge_acc_lse_stride);
LF_ASSERT_LAYOUT(sizeof(LfRope) == 64, rope_size);
LF_ASSERT_LAYOUT(sizeof(LfRopeFwdParams) == 304, rope_fwd_size);
LF_ASSERT_LAYOUT(sizeof(LfRopeKeysParams) == 112, rope_keys_size);
LF_ASSERT_LAYOUT(sizeof(LfMemoryFwdParams) == 384, memory_fwd_size);
LF_ASSERT_LAYOUT(offsetof(LfMemoryFwdParams, mem_k) == 304, memory_fwd_mem_k);
LF_ASSERT_LAYOUT(sizeof(LfMemoryTopkParams) == 192, memory_topk_size);
LF_ASSERT_LAYOUT(offsetof(LfRope, inv_leak) == 48, rope_inv_leak);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, lse) == 32, fwd_lse);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, q_batch_stride) == 40, fwd_q_batch_stride);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, o_row_stride) == 128, fwd_o_row_stride);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, mask) == 136, fwd_mask);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, batch) == 160, fwd_batch);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, softmax_scale_log2) == 180, fwd_scale_log2);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, sparse) == 184, fwd_sparse);
LF_ASSERT_LAYOUT(offsetof(LfBlockSparse, batch_stride) == 24, sparse_batch_stride);
LF_ASSERT_LAYOUT(offsetof(LfMergeParams, batch) == 80, merge_batch);
LF_ASSERT_LAYOUT(sizeof(LfVarlenParams) == 272, varlen_size);
LF_ASSERT_LAYOUT(offsetof(LfVarlenParams, cu_seqlens_q) == 240, varlen_cu_q);
LF_ASSERT_LAYOUT(sizeof(LfDecodeParams) == 280, decode_size);
LF_ASSERT_LAYOUT(offsetof(LfDecodeParams, q_batch_stride) == 96, decode_q_batch_stride);
LF_ASSERT_LAYOUT(offsetof(LfDecodeParams, mask) == 208, decode_mask);
LF_ASSERT_LAYOUT(offsetof(LfDecodeParams, batch) == 232, decode_batch);
LF_ASSERT_LAYOUT(offsetof(LfDecodeParams, softmax_scale_log2) == 276, decode_scale_log2);
LF_ASSERT_LAYOUT(sizeof(LfDecodeRopeParams) == 344, decode_rope_size);
LF_ASSERT_LAYOUT(sizeof(LfAppendParams) == 264, append_size);
LF_ASSERT_LAYOUT(offsetof(LfAppendParams, rope) == 200, append_rope);
LF_ASSERT_LAYOUT(sizeof(LfPagedFwdParams) == 288, paged_fwd_size);
LF_ASSERT_LAYOUT(sizeof(LfVarlenRopeParams) == 336, varlen_rope_size);
LF_ASSERT_LAYOUT(sizeof(LfRopeKeysVarlenParams) == 128, rope_keys_varlen_size);
LF_ASSERT_LAYOUT(sizeof(LfTensorMap) == 128, tensor_map_size);
LF_ASSERT_LAYOUT(sizeof(LfFwdSm90Params) == 640, fwd_sm90_size);
LF_ASSERT_LAYOUT(offsetof(LfFwdSm90Params, tma_q) == 256, fwd_sm90_tma_q);
LF_ASSERT_LAYOUT(offsetof(LfFwdKeyMaskSm90Params, key_mask) == 640, keymask_sm90_mask);
LF_ASSERT_LAYOUT(sizeof(LfFwdKeyMaskSm90Params) == 768, keymask_sm90_size);
LF_ASSERT_LAYOUT(offsetof(LfRopeFwdSm90Params, tma_k_alt) == 640, rope_sm90_k_alt);
LF_ASSERT_LAYOUT(offsetof(LfRopeFwdSm90Params, rope) == 768, rope_sm90_rope);
LF_ASSERT_LAYOUT(sizeof(LfRopeFwdSm90Params) == 896, rope_sm90_size);
LF_ASSERT_LAYOUT(offsetof(LfBwdParams, q_batch_stride) == 96, bwd_q_batch_stride);
LF_ASSERT_LAYOUT(offsetof(LfBwdParams, mask) == 288, bwd_mask);
LF_ASSERT_LAYOUT(offsetof(LfBwdParams, batch) == 312, bwd_batch);
LF_ASSERT_LAYOUT(sizeof(LfBwdParams) == 344, bwd_size);
LF_ASSERT_LAYOUT(sizeof(LfBwdSparseParams) == 456, bwd_sparse_size);
LF_ASSERT_LAYOUT(offsetof(LfBwdSparseParams, cols) == 400, bwd_sparse_cols);

#endif
