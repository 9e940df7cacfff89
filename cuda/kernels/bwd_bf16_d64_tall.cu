// Backward of exact attention, bf16, head dimension 64, 128-row query steps: the dK / dV (and atomic dQ) kernel for devices with the shared memory (tile_plan.h).
#include "../bwd.cuh"
LF_DEFINE_BWD_TALL_KERNEL(lf_bwd_bf16_d64_tall, __nv_bfloat16, 64)
