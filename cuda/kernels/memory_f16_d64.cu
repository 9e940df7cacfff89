// Memory attention (local window + external memory in one softmax), f16, head dimension 64.
#include "../memory.cuh"
LF_DEFINE_MEMORY_KERNEL(lf_memory_f16_d64, __half, 64, false)
