// The RoPE backward's query and gradient passes, f16.
#include "../rope_bwd.cuh"
LF_DEFINE_ROPE_BWD_KERNELS(f16, __half)
