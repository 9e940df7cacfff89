// Variable-length (packed) forward attention, bf16, head dimension 64.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_bf16_d64, __nv_bfloat16, 64, false)
