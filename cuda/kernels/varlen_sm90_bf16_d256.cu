// Variable-length (packed) forward on Hopper (sm_90a only), bf16, head dimension 256.
#include "../varlen_sm90.cuh"
LF_DEFINE_VARLEN_SM90_KERNEL(lf_varlen_sm90_bf16_d256, __nv_bfloat16, 256)
