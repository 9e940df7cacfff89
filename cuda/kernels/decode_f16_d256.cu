// Decoding attention over a KV cache, f16, head dimension 256.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_f16_d256, __half, 256, false)
