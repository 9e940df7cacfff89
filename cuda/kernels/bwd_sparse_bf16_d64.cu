// Block-sparse backward, bf16, head dimension 64: dK / dV (and atomic dQ) over the key-major mask, deterministic dQ over its rows.
#include "../bwd.cuh"
LF_DEFINE_BWD_SPARSE_KERNELS(lf_bwd_sparse_bf16_d64, __nv_bfloat16, 64)
