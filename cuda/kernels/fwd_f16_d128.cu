// Forward attention, f16, head dimension 128: dense, causal and sliding-window masks.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_f16_d128, __half, 128, false)
