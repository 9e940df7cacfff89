// Forward attention, f16, head dimension 256: dense, causal and sliding-window masks.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_f16_d256, __half, 256, false)
