// Variable-length forward with RoPE / ReRoPE / Leaky ReRoPE inside, f16, head dimension 256.
#include "../varlen_rope.cuh"
LF_DEFINE_VARLEN_ROPE_KERNEL(lf_varlen_rope_f16_d256, __half, 256)
