// Causal forward with RoPE / ReRoPE / Leaky ReRoPE applied inside, bf16, head dimension 128.
#include "../rope.cuh"
LF_DEFINE_ROPE_KERNEL(lf_rope_bf16_d128, __nv_bfloat16, 128)
