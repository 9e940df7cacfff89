// The key-rotation pass of the RoPE forward, f16.
#include "../rope.cuh"
LF_DEFINE_ROPE_KEYS_KERNEL(lf_rope_keys_f16, __half)
