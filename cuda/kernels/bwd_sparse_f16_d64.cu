// Block-sparse backward, f16, head dimension 64: dK / dV (and atomic dQ) over the key-major mask, deterministic dQ over its rows.
#include "../bwd.cuh"
LF_DEFINE_BWD_SPARSE_KERNELS(lf_bwd_sparse_f16_d64, __half, 64)
