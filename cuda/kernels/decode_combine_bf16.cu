// The split merge of the decoding kernel, bf16.
#include "../decode.cuh"
LF_DEFINE_DECODE_COMBINE_KERNEL(lf_decode_combine_bf16, __nv_bfloat16)
