// Forward attention on Hopper (sm_90a only), bf16, head dimension 256: dense, causal and sliding-window masks, 80-key tiles.
#include "../fwd_sm90.cuh"
LF_DEFINE_FWD_SM90_KERNEL_BC(lf_fwd_wide_sm90_bf16_d256, __nv_bfloat16, 256, LF_FWD_SM90_BC_WIDE_D256)
