// Variable-length (packed) forward attention, bf16, head dims below 256 (multiples of 8) in
// 256-wide tiles.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_bf16_d256p, __nv_bfloat16, 256, true)
