// Forward attention, bf16, head dimension 256: dense, causal and sliding-window masks.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_bf16_d256, __nv_bfloat16, 256, false)
