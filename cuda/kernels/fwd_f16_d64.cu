// Forward attention, f16, head dimension 64: dense, causal and sliding-window masks.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_f16_d64, __half, 64, false)
