// Decoding attention over a KV cache, f16, head dims below 128 (multiples of 8) in 128-wide tiles.
#include "../decode.cuh"
LF_DEFINE_DECODE_KERNEL(lf_decode_f16_d128p, __half, 128, true)
