// Variable-length (packed) forward attention, f16, head dimension 256.
#include "../varlen.cuh"
LF_DEFINE_VARLEN_KERNEL(lf_varlen_f16_d256, __half, 256, false)
