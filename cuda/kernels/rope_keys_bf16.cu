// The key-rotation pass of the RoPE forward, bf16.
#include "../rope.cuh"
LF_DEFINE_ROPE_KEYS_KERNEL(lf_rope_keys_bf16, __nv_bfloat16)
