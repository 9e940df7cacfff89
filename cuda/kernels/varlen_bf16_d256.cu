// Variable-length (packed) forward attention, bf16, head dimension 256.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_bf16_d256, __nv_bfloat16, 256, false)
