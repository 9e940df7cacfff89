// Block-sparse forward attention, f16, head dimension 256.
#include "../fwd.cuh"
LF_DEFINE_SPARSE_KERNEL(lf_sparse_f16_d256, __half, 256)
