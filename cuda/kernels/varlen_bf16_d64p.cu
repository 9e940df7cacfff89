// Variable-length (packed) forward attention, bf16, head dims below 64 (multiples of 8) in
// 64-wide tiles.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_bf16_d64p, __nv_bfloat16, 64, true)
