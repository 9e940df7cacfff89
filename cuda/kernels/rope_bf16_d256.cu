// Causal forward with RoPE / ReRoPE / Leaky ReRoPE applied inside, bf16, head dimension 256.
#include "../rope.cuh"
LF_DEFINE_ROPE_KERNEL(lf_rope_bf16_d256, __nv_bfloat16, 256)
