// Decoding attention over a KV cache, f16, head dimension 128.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_f16_d128, __half, 128, false)
