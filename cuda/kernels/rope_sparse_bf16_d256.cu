// Causal RoPE / ReRoPE / Leaky ReRoPE forward over a block mask, bf16, head dimension 256.
#include "../rope.cuh"
LF_DEFINE_ROPE_SPARSE_KERNEL(lf_rope_sparse_bf16_d256, __nv_bfloat16, 256)
