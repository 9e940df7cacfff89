// Variable-length (packed) forward attention, bf16, head dims below 128 (multiples of 8) in
// 128-wide tiles.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_bf16_d128p, __nv_bfloat16, 128, true)
