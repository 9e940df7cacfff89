// Variable-length forward with RoPE / ReRoPE / Leaky ReRoPE inside, bf16, head dimension 128.
#include "../varlen_rope.cuh"
LF_DEFINE_VARLEN_ROPE_KERNEL(lf_varlen_rope_bf16_d128, __nv_bfloat16, 128)
