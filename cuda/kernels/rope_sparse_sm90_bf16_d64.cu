// The RoPE forward over a block mask, on Hopper (sm_90a only), bf16, head dimension 64.
#include "../rope_sm90.cuh"
LF_DEFINE_ROPE_SPARSE_SM90_KERNEL(lf_rope_sparse_sm90_bf16_d64, __nv_bfloat16, 64)
