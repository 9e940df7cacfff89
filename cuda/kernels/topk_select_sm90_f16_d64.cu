// Top-k memory selection on Hopper (sm_90a only), f16, head dims up to 64 (wgmma scores).
#include "../topk_sm90.cuh"
LF_DEFINE_TOPK_SELECT_SM90_KERNEL(lf_topk_select_sm90_f16_d64, __half, 64)
