// Block-sparse forward attention on Hopper (sm_90a only), bf16, head dimension 64.
#include "../fwd_sm90.cuh"
LF_DEFINE_SPARSE_SM90_KERNEL(lf_sparse_sm90_bf16_d64, __nv_bfloat16, 64)
