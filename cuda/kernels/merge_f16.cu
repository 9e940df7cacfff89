// Log-sum-exp merge of two attention results, f16.
#include "../merge.cuh"
LF_DEFINE_MERGE_KERNEL(lf_merge_f16, __half)
