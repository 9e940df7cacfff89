// Decoding attention over a KV cache, bf16, head dimension 128.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_bf16_d128, __nv_bfloat16, 128, false)
