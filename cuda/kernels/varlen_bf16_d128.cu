// Variable-length (packed) forward attention, bf16, head dimension 128.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_bf16_d128, __nv_bfloat16, 128, false)
