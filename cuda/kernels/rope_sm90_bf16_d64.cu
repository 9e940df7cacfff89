// Causal forward with RoPE / ReRoPE / Leaky ReRoPE inside, on Hopper (sm_90a only), bf16, head dimension 64.
#include "../rope_sm90.cuh"
LF_DEFINE_ROPE_SM90_KERNEL(lf_rope_sm90_bf16_d64, __nv_bfloat16, 64)
