// Decoding attention with RoPE / ReRoPE / Leaky ReRoPE over an un-rotated KV cache, bf16,
// head dimension 64.
#include "../decode.cuh"
LF_DEFINE_DECODE_ROPE_KERNEL(lf_decode_rope_bf16_d64, __nv_bfloat16, 64, false)
