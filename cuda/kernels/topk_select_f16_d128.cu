// Top-k memory selection, f16, head dim 128.
#include "../topk.cuh"
LF_DEFINE_TOPK_SELECT_KERNEL(lf_topk_select_f16_d128, __half, 128, false)
