// Variable-length (packed) forward attention, f16, head dimension 64.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_f16_d64, __half, 64, false)
