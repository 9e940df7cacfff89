// Forward attention, bf16, head dimension 64: dense, causal and sliding-window masks.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_bf16_d64, __nv_bfloat16, 64, false)
