// RoPE / ReRoPE / Leaky ReRoPE decoding over an un-rotated KV cache, f16, head dims below 64
// (multiples of 8) in 64-wide tiles.
#include "../decode.cuh"
LF_DEFINE_DECODE_ROPE_KERNEL(lf_decode_rope_f16_d64p, __half, 64, true)
