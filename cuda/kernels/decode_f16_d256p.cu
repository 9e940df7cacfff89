// Decoding attention over a KV cache, f16, head dims below 256 (multiples of 8) in 256-wide tiles.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_f16_d256p, __half, 256, true)
