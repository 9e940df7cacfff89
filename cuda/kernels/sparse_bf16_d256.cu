// Block-sparse forward attention, bf16, head dimension 256.
#include "../fwd.cuh"
LF_DEFINE_SPARSE_KERNEL(lf_sparse_bf16_d256, __nv_bfloat16, 256)
