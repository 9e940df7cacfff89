// Top-k memory selection, bf16, head dim 64.
#include "../topk.cuh"
LF_DEFINE_TOPK_SELECT_KERNEL(lf_topk_select_bf16_d64, __nv_bfloat16, 64, false)
