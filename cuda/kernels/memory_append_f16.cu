// Memory buffer append into an f16 buffer, from f16 or f32 windows.
#include "../memory_append.cuh"
LF_DEFINE_MEMORY_APPEND_KERNEL(lf_memory_append_f16_f16, __half, __half)
LF_DEFINE_MEMORY_APPEND_KERNEL(lf_memory_append_f32_f16, float, __half)
