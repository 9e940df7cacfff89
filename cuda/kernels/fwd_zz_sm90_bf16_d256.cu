// Forward attention on Hopper (sm_90a only), bf16, head dimension 256: dense, causal and sliding-window masks, 128-row tiles, a persistent grid in zigzag slots.
#include "../fwd_sm90.cuh"
LF_DEFINE_FWD_ZZ_SM90_KERNEL(lf_fwd_zz_sm90_bf16_d256, __nv_bfloat16, 256)
