// Decoding attention over a KV cache, bf16, head dimension 256.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_bf16_d256, __nv_bfloat16, 256, false)
