// Block-sparse forward attention, bf16, head dimension 64.
#include "../fwd.cuh"
LF_DEFINE_SPARSE_KERNEL(lf_sparse_bf16_d64, __nv_bfloat16, 64)
