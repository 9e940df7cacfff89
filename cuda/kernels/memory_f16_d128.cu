// Memory attention (local window + external memory in one softmax), f16, head dimension 128.
#include "../memory.cuh"
LF_DEFINE_MEMORY_KERNEL(lf_memory_f16_d128, __half, 128, false)
