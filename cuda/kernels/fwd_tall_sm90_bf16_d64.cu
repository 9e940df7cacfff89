// Forward attention on Hopper (sm_90a only), bf16, head dimension 64: dense, causal and sliding-window masks, 192-row tiles (three consumer warpgroups).
#include "../fwd_sm90.cuh"
LF_DEFINE_FWD_TALL_SM90_KERNEL(lf_fwd_tall_sm90_bf16_d64, __nv_bfloat16, 64)
