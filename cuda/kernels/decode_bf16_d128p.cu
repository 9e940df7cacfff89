// Decoding attention over a KV cache, bf16, head dims below 128 (multiples of 8) in 128-wide tiles.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_bf16_d128p, __nv_bfloat16, 128, true)
