// Top-k memory attention over the selected entries, merged into the local result, bf16.
#include "../topk.cuh"
LF_DEFINE_TOPK_ATTEND_KERNEL(lf_topk_attend_bf16, __nv_bfloat16)
