// Dynamic block selection: the f32 mean of each block of rows, bf16 input.
#include "../select.cuh"
LF_DEFINE_BLOCK_MEANS_KERNEL(lf_block_means_bf16, __nv_bfloat16)
