// Causal RoPE / ReRoPE / Leaky ReRoPE forward over a block mask, f16, head dimension 64.
#include "../rope.cuh"
LF_DEFINE_ROPE_SPARSE_KERNEL(lf_rope_sparse_f16_d64, __half, 64)
