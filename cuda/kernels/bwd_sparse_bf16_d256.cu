// Block-sparse backward, bf16, head dimension 256: dK / dV (and atomic dQ) over the key-major mask, deterministic dQ over its rows.
#include "../bwd.cuh"
LF_DEFINE_BWD_SPARSE_KERNELS(lf_bwd_sparse_bf16_d256, __nv_bfloat16, 256)
