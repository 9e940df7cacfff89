// The RoPE backward's query and gradient passes, bf16.
#include "../rope_bwd.cuh"
LF_DEFINE_ROPE_BWD_KERNELS(bf16, __nv_bfloat16)
