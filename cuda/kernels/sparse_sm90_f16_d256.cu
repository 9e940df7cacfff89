// Block-sparse forward attention on Hopper (sm_90a only), f16, head dimension 256.
#include "../fwd_sm90.cuh"
LF_DEFINE_SPARSE_SM90_KERNEL(lf_sparse_sm90_f16_d256, __half, 256)
