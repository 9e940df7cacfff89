// Backward of exact attention, bf16, head dimension 128: pre-pass, dK / dV (and atomic dQ), deterministic dQ, dQ conversion.
#include "../bwd.cuh"
LF_DEFINE_BWD_KERNELS(lf_bwd_bf16_d128, __nv_bfloat16, 128)
