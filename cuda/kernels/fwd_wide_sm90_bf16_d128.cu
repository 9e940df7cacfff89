// Forward attention on Hopper (sm_90a only), bf16, head dimension 128, calls without a mask: 176-key tiles.
#include "../fwd_sm90.cuh"
LF_DEFINE_FWD_SM90_KERNEL_BC(lf_fwd_wide_sm90_bf16_d128, __nv_bfloat16, 128, LF_FWD_SM90_BC_WIDE_D128)
