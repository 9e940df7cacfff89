// Memory buffer append into a bf16 buffer, from bf16 or f32 windows.
#include "../memory_append.cuh"
LF_DEFINE_MEMORY_APPEND_KERNEL(lf_memory_append_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
LF_DEFINE_MEMORY_APPEND_KERNEL(lf_memory_append_f32_bf16, float, __nv_bfloat16)
