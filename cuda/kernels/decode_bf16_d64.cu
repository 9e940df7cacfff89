// Decoding attention over a KV cache, bf16, head dimension 64.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_bf16_d64, __nv_bfloat16, 64, false)
