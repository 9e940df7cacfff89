// Decoding attention over a KV cache, bf16, head dims below 256 (multiples of 8) in 256-wide tiles.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_bf16_d256p, __nv_bfloat16, 256, true)
