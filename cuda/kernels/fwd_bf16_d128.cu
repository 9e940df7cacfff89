// Forward attention, bf16, head dimension 128: dense, causal and sliding-window masks.
#include "../fwd.cuh"
LF_DEFINE_FWD_KERNEL(lf_fwd_bf16_d128, __nv_bfloat16, 128, false)
