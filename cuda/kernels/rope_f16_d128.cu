// Causal forward with RoPE / ReRoPE / Leaky ReRoPE applied inside, f16, head dimension 128.
#include "../rope.cuh"
LF_DEFINE_ROPE_KERNEL(lf_rope_f16_d128, __half, 128)
