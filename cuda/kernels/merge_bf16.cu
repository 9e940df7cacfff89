// Log-sum-exp merge of two attention results, bf16.
#include "../merge.cuh"
LF_DEFINE_MERGE_KERNEL(lf_merge_bf16, __nv_bfloat16)
