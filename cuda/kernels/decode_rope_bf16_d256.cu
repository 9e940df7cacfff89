// Decoding attention with RoPE / ReRoPE / Leaky ReRoPE over an un-rotated KV cache, bf16,
// head dimension 256.
#include "../decode.cuh"
LF_DEFINE_DECODE_ROPE_KERNEL(lf_decode_rope_bf16_d256, __nv_bfloat16, 256, false)
