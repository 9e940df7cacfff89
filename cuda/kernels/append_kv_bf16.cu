// Appends keys and values to a KV cache, bf16.
#include "../append.cuh"
LF_DEFINE_APPEND_KERNEL(lf_append_kv_bf16, __nv_bfloat16)
