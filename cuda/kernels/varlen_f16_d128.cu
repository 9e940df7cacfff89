// Variable-length (packed) forward attention, f16, head dimension 128.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_f16_d128, __half, 128, false)
