// Memory attention (local window + external memory in one softmax), bf16, head dimension 128.
#include "../memory.cuh"
LF_DEFINE_MEMORY_KERNEL(lf_memory_bf16_d128, __nv_bfloat16, 128, false)
