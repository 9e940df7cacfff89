// Top-k memory selection on Hopper (sm_90a only), bf16, head dims up to 64 (wgmma scores).
#include "../topk_sm90.cuh"
LF_DEFINE_TOPK_SELECT_SM90_KERNEL(lf_topk_select_sm90_bf16_d64, __nv_bfloat16, 64)
