// Decoding attention over a KV cache, f16, head dimension 64.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_f16_d64, __half, 64, false)
