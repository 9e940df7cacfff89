// Top-k memory selection, f16, head dim 64.
#include "../topk.cuh"
LF_DEFINE_TOPK_SELECT_KERNEL(lf_topk_select_f16_d64, __half, 64, false)
