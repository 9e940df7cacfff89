// Appends keys and values to a KV cache, f16.
#include "../append.cuh"
LF_DEFINE_APPEND_KERNEL(lf_append_kv_f16, __half)
