// The key-rotation pass of a packed (variable-length) batch, bf16.
#include "../varlen_rope.cuh"
LF_DEFINE_ROPE_KEYS_VARLEN_KERNEL(lf_rope_keys_varlen_bf16, __nv_bfloat16)
