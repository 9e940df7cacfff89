// Top-k memory selection, bf16, head dim 128.
#include "../topk.cuh"
LF_DEFINE_TOPK_SELECT_KERNEL(lf_topk_select_bf16_d128, __nv_bfloat16, 128, false)
