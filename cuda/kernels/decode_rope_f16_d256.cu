// Decoding attention with RoPE / ReRoPE / Leaky ReRoPE over an un-rotated KV cache, f16,
// head dimension 256.
#include "../decode.cuh"
LF_DEFINE_DECODE_ROPE_KERNEL(lf_decode_rope_f16_d256, __half, 256, false)
