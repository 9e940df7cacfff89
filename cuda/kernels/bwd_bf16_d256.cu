// Backward of exact attention, bf16, head dimension 256: pre-pass, dK / dV (and atomic dQ), deterministic dQ, dQ conversion.
#include "../bwd.cuh"
LF_DEFINE_BWD_KERNELS(lf_bwd_bf16_d256, __nv_bfloat16, 256)
