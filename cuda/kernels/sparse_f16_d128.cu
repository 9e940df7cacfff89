// Block-sparse forward attention, f16, head dimension 128.
#include "../fwd.cuh"
LF_DEFINE_SPARSE_KERNEL(lf_sparse_f16_d128, __half, 128)
