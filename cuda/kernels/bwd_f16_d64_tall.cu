// Backward of exact attention, f16, head dimension 64, 128-row query steps: the dK / dV (and atomic dQ) kernel for devices with the shared memory (tile_plan.h).
#include "../bwd.cuh"
LF_DEFINE_BWD_TALL_KERNEL(lf_bwd_f16_d64_tall, __half, 64)
