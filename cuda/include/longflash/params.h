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

/* The attention mask of one launch, in token coordinates.
 *
 * Query row i in [0, seqlen_q) may attend key j in [0, seqlen_k) iff
 *     (window_left  < 0 || j >= i + diag_offset - window_left)
 *  && (window_right < 0 || j <= i + diag_offset + window_right)
 * where diag_offset = seqlen_k - seqlen_q aligns the diagonal bottom-right (the last query
 * sees the last key), as FlashAttention >= 2.1 does. Causal attention is window_right = 0.
 * A negative window side is unbounded. */
typedef struct LfMask {
    int32_t seqlen_q;
    int32_t seqlen_k;
    int32_t window_left;  /* < 0: unbounded */
    int32_t window_right; /* < 0: unbounded; 0 for causal */
} LfMask;

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
} LfFwdParams;

#define LF_ASSERT_LAYOUT(cond, name) typedef char lf_layout_assert_##name[(cond) ? 1 : -1]
LF_ASSERT_LAYOUT(sizeof(LfMask) == 16, mask_size);
LF_ASSERT_LAYOUT(sizeof(LfFwdParams) == 176, fwd_size);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, lse) == 32, fwd_lse);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, q_batch_stride) == 40, fwd_q_batch_stride);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, o_row_stride) == 128, fwd_o_row_stride);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, mask) == 136, fwd_mask);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, batch) == 152, fwd_batch);
LF_ASSERT_LAYOUT(offsetof(LfFwdParams, softmax_scale_log2) == 172, fwd_scale_log2);

#endif
