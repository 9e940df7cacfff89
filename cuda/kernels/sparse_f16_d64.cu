// Block-sparse forward attention, f16, head dimension 64.
#include "../fwd.cuh"
LF_DEFINE_SPARSE_KERNEL(lf_sparse_f16_d64, __half, 64)
