// Backward of exact attention, bf16, head dimension 64: pre-pass, dK / dV (and atomic dQ), deterministic dQ, dQ conversion.
#include "../bwd.cuh"
LF_DEFINE_BWD_KERNELS(lf_bwd_bf16_d64, __nv_bfloat16, 64)
