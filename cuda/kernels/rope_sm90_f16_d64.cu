// Causal forward with RoPE / ReRoPE / Leaky ReRoPE inside, on Hopper (sm_90a only), f16, head dimension 64.
#include "../rope_sm90.cuh"
LF_DEFINE_ROPE_SM90_KERNEL(lf_rope_sm90_f16_d64, __half, 64)
