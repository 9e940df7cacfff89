// Memory attention (local window + external memory in one softmax), bf16, head dimension 64.
#include "../memory.cuh"
LF_DEFINE_MEMORY_KERNEL(lf_memory_bf16_d64, __nv_bfloat16, 64, false)
