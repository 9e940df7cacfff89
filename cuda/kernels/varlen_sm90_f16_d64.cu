// Variable-length (packed) forward on Hopper (sm_90a only), f16, head dimension 64.
#include "../varlen_sm90.cuh"
LF_DEFINE_VARLEN_SM90_KERNEL(lf_varlen_sm90_f16_d64, __half, 64)
